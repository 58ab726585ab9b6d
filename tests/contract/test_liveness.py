"""Worker liveness: the exact keys register/unregister write, on their own and on a caller's pipeline, and which
workers count as live or dead."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio

from contract import keys, liveness
from contract.messages import WorkerInfo


def _info(worker_id: str) -> WorkerInfo:
    now = time.time()
    return WorkerInfo(
        worker_id=worker_id, models=["m"], max_batch=2, busy_slots=0, device="cpu", host="h", pid=1,
        software_version="0", started_at=now, heartbeat_at=now,
    )  # fmt: skip


def test_register_writes_the_key_with_its_ttl_and_says_when_it_had_lapsed(redis_client):
    assert liveness.register(redis_client, _info("w")) is True
    assert liveness.heartbeat(redis_client, _info("w")) is False
    assert 0 < redis_client.ttl(keys.worker("w")) <= keys.WORKER_TTL_S
    assert redis_client.smembers(keys.workers()) == {b"w"}


def test_register_and_unregister_only_queue_on_a_given_pipeline(redis_client):
    with redis_client.pipeline(transaction=False) as pipe:
        assert liveness.register(redis_client, _info("w"), pipeline=pipe) is None
        assert not redis_client.exists(keys.worker("w"))  # nothing sent yet
        previous, _added, _ttl = pipe.execute()
    assert previous is None
    assert redis_client.exists(keys.worker("w"))
    with redis_client.pipeline(transaction=False) as pipe:
        assert liveness.unregister(redis_client, "w", pipeline=pipe) is None
        assert pipe.execute() == [1]
    assert redis_client.keys("*") == []


def test_live_and_dead_workers(redis_client, redis_url):
    liveness.register(redis_client, _info("a"))
    liveness.register(redis_client, _info("b"))
    redis_client.delete(keys.worker("b"))  # as if it had expired
    redis_client.set(keys.worker("c"), "not a WorkerInfo")  # another version's record: not judged
    redis_client.sadd(keys.workers(), "c")
    assert [w.worker_id for w in liveness.live_workers(redis_client)] == ["a"]
    assert liveness.dead_workers(redis_client) == ["b"]

    async def read_async() -> list[str]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return [w.worker_id for w in await liveness.live_workers_async(client)]
        finally:
            await client.aclose()

    assert asyncio.run(read_async()) == ["a"]
