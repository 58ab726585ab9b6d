"""A Redis outage mid-generation: the worker keeps generating, then delivers and records the result by itself."""

from __future__ import annotations

import signal
import threading
import time

from contract import jobs, keys, liveness, sweeper
from contract.messages import ErrorEvent, JobRequest
from infra.embedded_redis import EmbeddedRedis
from infra.redis import connect
from tests.workers.harness import MODEL, RunningWorker, make_worker, status, submit, wait_for
from tests.workers.test_worker_process import _start_worker_process


def test_worker_survives_a_redis_restart(tmp_path):
    server = EmbeddedRedis(tmp_path, persist=True).start()
    client = connect(server.url)
    try:
        running = RunningWorker(make_worker(client, reply_tokens=60, step_delay_s=0.02)).__enter__()
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


def test_a_stopped_workers_streaming_job_fails_within_the_death_bound(redis_client, redis_url):
    """SIGSTOP (a frozen or partitioned worker): its heartbeat stops with it, and the sweeper fails its streaming job
    with worker_lost within `liveness.DEATH_TO_ERROR_S`."""
    stop_sweeper = threading.Event()
    sweeping = threading.Thread(
        target=sweeper.run_sweeper, args=(redis_url, liveness.SWEEP_INTERVAL_S, stop_sweeper), daemon=True
    )
    sweeping.start()
    process = _start_worker_process(redis_url, "frozen")
    try:
        long = submit(redis_client, "long", "talk [[tokens=100000]]")
        long.wait_tokens(2, timeout=60)
        process.send_signal(signal.SIGSTOP)
        events = long.read_until_final(timeout=liveness.DEATH_TO_ERROR_S)
        assert isinstance(events[-1], ErrorEvent) and events[-1].code == "worker_lost", events[-1]
        assert "frozen" in events[-1].message
        assert status(redis_client, "long") == "failed"
    finally:
        stop_sweeper.set()
        sweeping.join(5)
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)
