"""A Redis outage mid-generation: the worker keeps generating, then delivers and records the result by itself."""

from __future__ import annotations

import time

from broker import jobs
from contract import keys
from contract.messages import JobRequest
from infra.embedded_redis import EmbeddedRedis
from infra.redis import connect
from tests.workers.harness import MODEL, RunningWorker, make_worker, wait_for


def test_worker_survives_a_redis_restart(tmp_path):
    server = EmbeddedRedis(tmp_path, persist=True).start()
    client = connect(server.url)
    try:
        running = RunningWorker(make_worker(client, reply_tokens=60, step_delay=0.02)).__enter__()
        try:
            request = JobRequest(job_id="a", model=MODEL, prompt="keep going")
            jobs.enqueue(client, request, max_queue=10, result_ttl=600)
            wait_for(lambda: client.hget(keys.worker_jobs("w1"), "a") == b"streaming", what="streaming")
            server.stop()
            time.sleep(1.0)  # an outage of several decode steps (not a timing assertion)
            server.start()
            view = wait_for(
                lambda: (v := jobs.view(client, "a")) and v.status == "finished" and v, timeout=60, what="the record"
            )
            assert view.outcome.usage.completion_tokens == 60
            assert view.outcome.text == " ".join(["keep", "going"] * 30)
            wait_for(lambda: client.exists(keys.worker("w1")), what="re-registration")
        finally:
            running.stop()
    finally:
        client.close()
        server.stop()
