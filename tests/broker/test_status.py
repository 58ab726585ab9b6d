"""`llava-serve status`: workers, queues and rates read from Redis."""

from __future__ import annotations

import io
import json
import time

import redis

from broker.stats import queue_job_counts, read_rates
from broker.status import render, run_status, snapshot
from cli.main import build_parser
from contract import jobs
from contract.messages import JobRequest
from contract.status_report import StatusReport
from infra.embedded_redis import free_port
from tests.broker.scripted_worker import ScriptedWorker


def enqueue(client: redis.Redis, model: str, job_id: str, enqueued_at: float) -> None:
    request = JobRequest(job_id=job_id, model=model, enqueued_at=enqueued_at)
    jobs.enqueue(client, request, max_queue=10, result_ttl=60)


def count_job(client: redis.Redis, model: str, ok: bool, completion: int, now: float) -> None:
    with client.pipeline() as pipe:
        queue_job_counts(pipe, model, ok=ok, prompt_tokens=10, completion_tokens=completion, now=now)
        pipe.execute()


def test_snapshot_and_table(redis_client: redis.Redis) -> None:
    now = time.time()
    ScriptedWorker(redis_client, model="tiny-llava", worker_id="gpu-0").register()
    enqueue(redis_client, "tiny-llava", "a", now - 30)
    enqueue(redis_client, "tiny-llava", "b", now - 5)
    enqueue(redis_client, "orphan-model", "c", now - 90)
    count_job(redis_client, "tiny-llava", True, 100, now)
    count_job(redis_client, "tiny-llava", False, 0, now - 60)

    report = snapshot(redis_client, now=now)
    assert [w.worker_id for w in report.workers] == ["gpu-0"]
    rows = {q.model: q for q in report.queues}
    assert set(rows) == {"tiny-llava", "orphan-model"}
    assert rows["tiny-llava"].depth == 2 and 29 <= rows["tiny-llava"].oldest_wait_s <= 31
    assert (rows["tiny-llava"].workers, rows["tiny-llava"].slots) == (1, 4)
    assert rows["orphan-model"].workers == 0 and rows["orphan-model"].oldest_wait_s >= 89
    rates = report.rates["tiny-llava"]
    assert (rates.requests, rates.errors, rates.completion_tokens) == (2, 1, 100)

    text = render(report)
    for expected in ("WORKERS (1 live)", "gpu-0", "0/4", "QUEUES", "orphan-model", "30.0s", "REQ/MIN", "TOKENS/S"):
        assert expected in text


def test_rates_window_leaves_out_old_minutes(redis_client: redis.Redis) -> None:
    now = time.time()
    count_job(redis_client, "m", True, 60, now - 3600)
    count_job(redis_client, "m", True, 60, now)
    assert read_rates(redis_client, minutes=5, now=now)["m"].requests == 1


def test_command_prints_once_json_and_watch(redis_client: redis.Redis, redis_url: str) -> None:
    ScriptedWorker(redis_client, worker_id="w1").register()
    parser = build_parser()
    out = io.StringIO()
    assert run_status(parser.parse_args(["status", "--redis-url", redis_url, "--json"]), out=out) == 0
    assert json.loads(out.getvalue())["workers"][0]["worker_id"] == "w1"
    assert StatusReport.model_validate_json(out.getvalue()).workers[0].worker_id == "w1"

    out = io.StringIO()
    args = parser.parse_args(["status", "--redis-url", redis_url, "--watch", "--interval", "0"])
    assert run_status(args, out=out, max_frames=2) == 0
    assert out.getvalue().count("llava-serve status at") == 2


def test_command_fails_clearly_without_redis(capsys) -> None:
    args = build_parser().parse_args(["status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    assert run_status(args, out=io.StringIO()) == 1
    assert "cannot reach Redis" in capsys.readouterr().err
