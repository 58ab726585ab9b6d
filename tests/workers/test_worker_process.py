"""A real worker process (scripted engine): SIGKILL mid-stream gives the client worker_lost and another worker
serves the jobs it never started; SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from contract import keys, sweeper
from contract.messages import DoneEvent, ErrorEvent
from tests.workers.harness import MODEL, RunningWorker, make_worker, status, submit, wait_for
from workers.worker_lifecycle import EXIT_OK

ROOT = Path(__file__).resolve().parents[2]


def _start_worker_process(redis_url: str, worker_id: str) -> subprocess.Popen:
    code = (
        "import sys, logging; logging.basicConfig(level=logging.INFO);"
        "from infra.settings import WorkerSettings; from workers.cli import run_worker;"
        f"s = WorkerSettings(model_path={MODEL!r}, redis_url={redis_url!r}, worker_id={worker_id!r}, max_batch=1,"
        " drain_timeout_s=20);"
        "sys.exit(run_worker(s, engine_kind='scripted', scripted_step_delay_s=0.02))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE)


def test_sigkill_mid_stream_gives_worker_lost_and_unstarted_jobs_move_on(redis_client, redis_url):
    stop_sweeper = threading.Event()
    sweeping = threading.Thread(target=sweeper.run_sweeper, args=(redis_url, 0.5, stop_sweeper))
    process = _start_worker_process(redis_url, "doomed")
    try:
        long = submit(redis_client, "long", "talk [[tokens=100000]]")
        waiting = submit(redis_client, "waiting", "short [[tokens=3]]")
        long.wait_tokens(2, timeout=60)
        process.kill()
        process.wait(10)
        sweeping.start()
        # (in production the controller's or a peer worker's sweeper does this; TTL 10 s + sweep interval)
        final = long.read_until_final(timeout=keys.WORKER_TTL_S + 20)[-1]
        assert isinstance(final, ErrorEvent) and final.code == "worker_lost" and "doomed" in final.message
        assert status(redis_client, "long") == "failed"
        assert status(redis_client, "waiting") == "queued"
        with RunningWorker(make_worker(redis_client, worker_id="survivor")):
            assert isinstance(waiting.read_until_final()[-1], DoneEvent)
        assert not redis_client.sismember(keys.workers(), "doomed")
    finally:
        stop_sweeper.set()
        if sweeping.is_alive():
            sweeping.join(5)
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_sigterm_drains_the_running_job_and_exits_zero(redis_client, redis_url):
    process = _start_worker_process(redis_url, "polite")
    try:
        stream = submit(redis_client, "a", "bye [[tokens=40]]")
        stream.wait_tokens(1, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == EXIT_OK
        assert isinstance(stream.read_until_final()[-1], DoneEvent)
        wait_for(lambda: status(redis_client, "a") == "finished", what="the record")
        assert not redis_client.exists(keys.worker("polite"))
        assert not redis_client.sismember(keys.workers(), "polite")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
