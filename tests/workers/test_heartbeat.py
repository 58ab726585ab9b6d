"""The heartbeat thread: one pipelined write of the worker key (with TTL), the registry and the job table TTL."""

from __future__ import annotations

import threading
import time

from contract import keys, liveness, sweeper
from contract.messages import DoneEvent, WorkerInfo
from tests.workers.harness import RunningWorker, make_worker, submit, wait_for
from workers.heartbeat import Heartbeat
from workers.scripted import ScriptedEngine


def _info() -> WorkerInfo:
    now = time.time()
    return WorkerInfo(
        worker_id="hb", models=["m"], max_batch=2, busy_slots=1, device="cpu", host="h", pid=1,
        software_version="0", started_at=now, heartbeat_at=now,
    )  # fmt: skip


def test_heartbeat_refreshes_the_worker_key_registry_and_table(redis_client):
    redis_client.hset(keys.worker_jobs("hb"), "job", "started")
    beat = Heartbeat(redis_client, _info, interval_s=0.05)
    beat.start()
    try:
        wait_for(lambda: redis_client.exists(keys.worker("hb")), what="the first beat")
        assert 0 < redis_client.ttl(keys.worker("hb")) <= keys.WORKER_TTL_S
        assert redis_client.sismember(keys.workers(), "hb")
        assert 0 < redis_client.ttl(keys.worker_jobs("hb")) <= keys.WORKER_JOBS_TTL_S
        assert WorkerInfo.model_validate_json(redis_client.get(keys.worker("hb"))).busy_slots == 1
        assert not beat.lost.is_set()
        redis_client.delete(keys.worker("hb"))  # as if it had expired while the worker was unreachable
        wait_for(beat.lost.is_set, what="the lost flag")
    finally:
        beat.stop()
    assert not beat.is_alive()


def test_unregister_keeps_the_id_while_jobs_remain(redis_client):
    redis_client.set(keys.worker("hb"), "{}")
    redis_client.sadd(keys.workers(), "hb")
    redis_client.hset(keys.worker_jobs("hb"), "job", "streaming")
    assert liveness.unregister(redis_client, "hb") is False
    assert not redis_client.exists(keys.worker("hb"))  # so the sweeper settles the job at once
    assert redis_client.sismember(keys.workers(), "hb")
    redis_client.delete(keys.worker_jobs("hb"))
    assert liveness.unregister(redis_client, "hb") is True
    assert not redis_client.exists(keys.workers())


class BusyStepEngine:
    """The scripted engine, but each decode step first spins the CPU in Python for `busy_s` seconds (holding the
    GIL but for the interpreter's switches): a worker whose main loop is blocked in a long step or a compile."""

    def __init__(self, inner: ScriptedEngine, busy_s: float) -> None:
        self.inner = inner
        self.busy_s = busy_s

    def step(self):  # noqa: ANN201 - the inner engine's updates
        end = time.monotonic() + self.busy_s
        while time.monotonic() < end:
            pass
        return self.inner.step()

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the inner engine's
        return getattr(self.inner, name)


def test_a_worker_busy_longer_than_its_ttl_keeps_its_key_and_its_jobs(redis_client, redis_url):
    busy_s = keys.WORKER_TTL_S + 1.0  # one step outlasts the TTL: only the heartbeat thread keeps the key
    worker = make_worker(redis_client)
    worker.engine = BusyStepEngine(worker.engine, busy_s)
    reports: list[sweeper.SweepReport] = []
    stop = threading.Event()
    sweeping = threading.Thread(
        target=sweeper.run_sweeper, args=(redis_url, 0.05, stop), kwargs={"on_sweep": reports.append}
    )
    sweeping.start()
    try:
        with RunningWorker(worker):
            stream = submit(redis_client, "busy", "slow [[tokens=2]]")
            final = stream.read_until_final(timeout=60)[-1]
    finally:
        stop.set()
        sweeping.join(5)
    assert isinstance(final, DoneEvent)
    assert any(not (r.paused or r.locked_out) for r in reports)  # the sweeper did judge meanwhile
    assert [r.dead_workers for r in reports if r.dead_workers] == []
