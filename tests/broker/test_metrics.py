"""The controller's `/metrics` (per-process stream metrics, broker gauges read from Redis at scrape time) and
the per-minute counters each finished job adds to in Redis."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from broker.app import create_app
from broker.stats import read_rates
from contract import jobs, keys
from contract.messages import JobRequest
from infra.embedded_redis import free_port
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, read_sse, settings_for

MODEL = "tiny-llava"


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def generate(client: TestClient, body: dict) -> list[tuple[str, dict]]:
    with client.stream("POST", "/api/v1/generate", json=body) as response:
        return list(read_sse(response.iter_lines()))


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_finished_and_failed_requests_are_counted(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["a", "b", "c"]))
    generate(client, chat_body())
    script.result()
    script = worker.in_thread(lambda w: w.fail(w.claim(), "invalid_image", "bad image", 400))
    generate(client, chat_body())
    script.result()
    m = scrape(client)
    label = (("model_name", MODEL),)
    assert m[("llava_request_success_total", (("finished_reason", "eos"), ("model_name", MODEL)))] == 1
    assert m[("llava_request_failure_total", (("code", "invalid_image"), ("model_name", MODEL)))] == 1
    assert m[("llava_generation_tokens_total", label)] == 3
    assert m[("llava_prompt_tokens_total", label)] == 5
    assert m[("llava_time_to_first_token_seconds_count", label)] == 1
    assert m[("llava_inter_token_latency_seconds_count", label)] == 2
    assert m[("llava_e2e_request_latency_seconds_count", label)] == 1
    assert m[("llava_streams_active", ())] == 0


def test_refused_requests_are_counted_by_code(client: TestClient, worker: ScriptedWorker) -> None:
    assert client.post("/api/v1/generate", json=chat_body(model="nope")).status_code == 404
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 400
    m = scrape(client)
    assert m[("llava_request_rejected_total", (("code", "model_not_found"),))] == 1
    assert m[("llava_request_rejected_total", (("code", "invalid_request"),))] == 1


def test_broker_gauges_are_read_from_redis(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    for i in range(2):
        jobs.enqueue(redis_client, JobRequest(job_id=f"queued-{i}", model=MODEL), max_queue=10, result_ttl=60)
    m = scrape(client)
    label = (("model_name", MODEL),)
    assert m[("llava_redis_up", ())] == 1
    assert m[("llava_num_requests_waiting", label)] == 2
    assert m[("llava_queue_oldest_wait_seconds", label)] >= 0
    assert m[("llava_num_workers", label)] == 1
    assert m[("llava_batch_slots", label)] == 4
    assert m[("llava_num_requests_running", label)] == 0
    worker.unregister()
    m = scrape(client)
    assert m[("llava_num_workers", label)] == 0 and m[("llava_num_requests_waiting", label)] == 2


def test_scrape_answers_while_redis_is_down() -> None:
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as unreachable:
        m = scrape(unreachable)
    assert m[("llava_redis_up", ())] == 0
    assert not any(name == "llava_num_requests_waiting" for name, _ in m)


def test_each_finished_job_adds_to_the_minute_counters(client, worker: ScriptedWorker, redis_client) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["one", "two"]))
    generate(client, chat_body())
    script.result()
    wait_for(lambda: MODEL in read_rates(redis_client), "the stats write")
    rates = read_rates(redis_client)[MODEL]
    assert (rates.requests, rates.errors, rates.prompt_tokens, rates.completion_tokens) == (1, 0, 5, len("onetwo"))
    assert rates.requests_per_minute > 0 and rates.tokens_per_second > 0
    # One hash per minute, with its TTL; nothing else written by the counters.
    stats_keys = redis_client.keys(keys.stats_minute("*"))  # type: ignore[arg-type]
    assert len(stats_keys) == 1
    assert 0 < redis_client.ttl(stats_keys[0]) <= keys.STATS_TTL_S
