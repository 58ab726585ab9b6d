"""A worker's Prometheus metrics: fed by the real job loop (scripted engine, real Redis), served over HTTP."""

from __future__ import annotations

import argparse

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.workers.harness import MODEL, RunningWorker, make_worker, submit
from workers.cli import add_worker_arguments, worker_settings_from_args
from workers.metrics import WorkerMetrics


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_the_job_loop_feeds_the_metrics(redis_client: redis.Redis) -> None:
    worker = make_worker(redis_client, max_batch=4)
    metrics = WorkerMetrics(model=MODEL, max_batch=4)
    metrics.set_info(worker.worker_id, "cpu")
    worker.metrics = metrics
    streams = [submit(redis_client, f"job-{i}", max_new_tokens=5) for i in range(3)]
    with RunningWorker(worker):
        for stream in streams:
            stream.read_until_final()
    m = samples(metrics.exposition().decode())
    label = (("model_name", MODEL),)
    finished = sum(v for (name, _), v in m.items() if name == "llava_request_success_total")
    assert finished == 3
    assert m[("llava_generation_tokens_total", label)] == 15
    assert m[("llava_time_to_first_token_seconds_count", label)] == 3
    assert m[("llava_inter_token_latency_seconds_count", label)] >= 3
    assert m[("llava_request_queue_time_seconds_count", label)] == 3
    assert m[("llava_batch_size_count", label)] > 0
    assert m[("llava_num_requests_running", label)] == 0
    assert m[("llava_batch_slots", label)] == 4
    assert m[("llava_worker_info", (("device", "cpu"), ("model_name", MODEL), ("worker_id", worker.worker_id)))] == 1


def test_metrics_are_served_over_http() -> None:
    metrics = WorkerMetrics(model="m", max_batch=2)
    port, stop = metrics.serve("127.0.0.1", 0)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        stop()
    assert response.status_code == 200
    assert ("llava_batch_slots", (("model_name", "m"),)) in samples(response.text)


def test_metrics_flags() -> None:
    parser = add_worker_arguments(argparse.ArgumentParser())
    settings = worker_settings_from_args(parser.parse_args(["--model-path", "x", "--metrics-port", "9400"]))
    assert (settings.metrics_port, settings.metrics_host) == (9400, "127.0.0.1")
    assert worker_settings_from_args(parser.parse_args(["--model-path", "x"])).metrics_port is None
