"""The heartbeat thread: one pipelined write of the worker key (with TTL), the registry and the job table TTL."""

from __future__ import annotations

import time

from contract import keys, liveness
from contract.messages import WorkerInfo
from tests.workers.harness import wait_for
from workers.heartbeat import Heartbeat


def _info() -> WorkerInfo:
    now = time.time()
    return WorkerInfo(
        worker_id="hb", models=["m"], max_batch=2, busy_slots=1, device="cpu", host="h", pid=1,
        software_version="0", started_at=now, heartbeat_at=now,
    )  # fmt: skip


def test_heartbeat_refreshes_the_worker_key_registry_and_table(redis_client):
    redis_client.hset(keys.worker_jobs("hb"), "job", "started")
    beat = Heartbeat(redis_client, _info, interval=0.05)
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
