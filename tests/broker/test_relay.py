"""The chunk relay: one pattern subscription per process, events routed by job id, reconnect after outages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.relay import ChunkRelay
from contract import keys
from contract.messages import TokenEvent, parse_event
from infra.embedded_redis import EmbeddedRedis
from infra.redis import async_connect

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def started_relay(url: str, **kwargs) -> ChunkRelay:
    relay = ChunkRelay(lambda: async_connect(url), **kwargs)
    relay.start()
    assert await relay.wait_connected(5)
    return relay


async def test_events_reach_their_own_job_in_order(redis_url: str, redis_client) -> None:
    relay = await started_relay(redis_url)
    publisher = async_connect(redis_url)
    try:
        subs = {job: relay.register(job) for job in ("a", "b")}
        for i in range(20):
            for job in ("a", "b", "nobody"):
                await publisher.publish(
                    keys.chunks(job), TokenEvent(job_id=job, text=f"{job}{i}", seq=i).model_dump_json()
                )
        for job, sub in subs.items():
            got = [parse_event(await sub.get(5)) for _ in range(20)]
            assert [e.text for e in got] == [f"{job}{i}" for i in range(20)]
            assert await sub.get(0.05) is None
            sub.close()
        assert relay.active_streams == 0
    finally:
        await publisher.aclose()
        await relay.stop()


async def test_a_thousand_streams_share_one_subscription(redis_url: str, redis_client) -> None:
    relay = await started_relay(redis_url)
    publisher = async_connect(redis_url)
    try:
        subs = [relay.register(f"job{i}") for i in range(1000)]
        assert await publisher.execute_command("PUBSUB", "NUMPAT") == 1
        async with publisher.pipeline(transaction=False) as pipe:
            for sub in subs:
                pipe.publish(keys.chunks(sub.job_id), TokenEvent(job_id=sub.job_id, text="x").model_dump_json())
            await pipe.execute()
        for sub in subs:
            assert parse_event(await sub.get(5)).job_id == sub.job_id
    finally:
        await publisher.aclose()
        await relay.stop()


async def test_register_twice_is_refused(redis_url: str, redis_client) -> None:
    relay = await started_relay(redis_url)
    try:
        with relay.register("same"):
            with pytest.raises(ValueError, match="already"):
                relay.register("same")
        relay.register("same").close()  # free again once closed
    finally:
        await relay.stop()


async def test_relay_reconnects_after_redis_restarts(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    relay = None
    try:
        relay = await started_relay(server.url, poll_timeout=0.2, backoff_max=0.3)
        sub = relay.register("j")
        assert not sub.missed_messages()
        server.stop()
        for _ in range(100):
            if not relay.connected:
                break
            await asyncio.sleep(0.05)
        assert not relay.connected
        server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=False).start()
        assert await relay.wait_connected(10)
        assert sub.missed_messages()  # the stream learns that events may have been lost meanwhile
        assert not sub.missed_messages()
        publisher = async_connect(server.url)
        await publisher.publish(keys.chunks("j"), TokenEvent(job_id="j", text="again").model_dump_json())
        await publisher.aclose()
        assert parse_event(await sub.get(5)).text == "again"
    finally:
        if relay is not None:
            await relay.stop()
        server.stop()
