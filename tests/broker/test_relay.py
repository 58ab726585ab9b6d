"""The chunk relay: one connection per process subscribed to its own jobs' channels only, events routed by job
id, reconnect after outages."""

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


async def pubsub_connections(client) -> int:
    """Connections of the server in subscribe mode (CLIENT LIST: sub or psub counts above zero)."""
    listing = await client.client_list()
    return sum(1 for c in listing if int(c.get("sub", 0)) or int(c.get("psub", 0)))


async def channel_count(client) -> int:
    return len(await client.pubsub_channels(keys.chunks("*")))


async def wait_until(read, expected, timeout_s: float = 5.0) -> bool:
    """Poll `await read()` until it equals `expected` or `timeout_s` passes; whether it did."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await read() == expected:
            return True
        await asyncio.sleep(0.02)
    return False


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
        for sub in subs.values():
            assert await sub.wait_subscribed(5)
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
        commands_before = relay.subscribe_commands
        subs = [relay.register(f"job{i}") for i in range(1000)]
        for sub in subs:
            assert await sub.wait_subscribed(5)
        # Streams that start together are subscribed together, on the relay's one connection, and no pattern.
        assert relay.subscribe_commands - commands_before == 1
        assert await publisher.execute_command("PUBSUB", "NUMPAT") == 0
        assert len(await publisher.pubsub_channels(keys.chunks("*"))) == 1000
        assert await pubsub_connections(publisher) == 1
        async with publisher.pipeline(transaction=False) as pipe:
            for sub in subs:
                pipe.publish(keys.chunks(sub.job_id), TokenEvent(job_id=sub.job_id, text="x").model_dump_json())
            await pipe.execute()
        for sub in subs:
            assert parse_event(await sub.get(5)).job_id == sub.job_id
        for sub in subs:
            sub.close()
        assert await wait_until(lambda: channel_count(publisher), 0)
        assert relay.unsubscribe_commands == 1
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
        relay = await started_relay(server.url, poll_timeout_s=0.2, backoff_max_s=0.3)
        sub = relay.register("j")
        assert await sub.wait_subscribed(5)
        assert not sub.missed_messages()
        server.stop()
        for _ in range(100):
            if not relay.connected:
                break
            await asyncio.sleep(0.05)
        assert not relay.connected
        server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=False).start()
        assert await relay.wait_connected(10)
        assert await sub.wait_subscribed(10)
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


async def test_two_relays_each_receive_only_their_own_jobs(redis_url: str, redis_client) -> None:
    first, second = await started_relay(redis_url), await started_relay(redis_url)
    publisher = async_connect(redis_url)
    pairs = ((first, "a"), (second, "b"))
    try:
        mine = {relay: [relay.register(f"{name}-{i}") for i in range(5)] for relay, name in pairs}
        for subs in mine.values():
            for sub in subs:
                assert await sub.wait_subscribed(5)
        every_job = [sub.job_id for subs in mine.values() for sub in subs]
        receivers = []
        for seq in range(1, 11):
            for job in every_job:
                event = TokenEvent(job_id=job, text="x", seq=seq).model_dump_json()
                receivers.append(await publisher.publish(keys.chunks(job), event))
        assert set(receivers) == {1}  # Redis sent each message to one connection: the relay streaming that job
        for subs in mine.values():
            for sub in subs:
                assert [parse_event(await sub.get(5)).seq for _ in range(10)] == list(range(1, 11))
        # Each relay was sent its own jobs' 50 messages, not the 100 of both, and routed all it was sent.
        assert (first.messages_received, second.messages_received) == (50, 50)
        assert (first.messages_relayed, second.messages_relayed) == (50, 50)
        channels = [keys.chunks(job) for job in every_job]
        assert [n for _, n in await publisher.pubsub_numsub(*channels)] == [1] * 10
    finally:
        await publisher.aclose()
        await first.stop()
        await second.stop()


async def test_a_dropped_connection_resubscribes_every_stream(redis_url: str, redis_client) -> None:
    relay = await started_relay(redis_url, poll_timeout_s=0.2, backoff_max_s=0.3)
    publisher = async_connect(redis_url)
    try:
        subs = [relay.register(f"live{i}") for i in range(3)]
        for sub in subs:
            assert await sub.wait_subscribed(5)
            assert not sub.missed_messages()
        await publisher.client_kill_filter(_type="pubsub")
        assert await wait_until(lambda: channel_count(publisher), 3)
        for sub in subs:
            assert sub.missed_messages()  # events published while it was down are lost: the stream must check
            await publisher.publish(sub.channel, TokenEvent(job_id=sub.job_id, text="after").model_dump_json())
            assert parse_event(await sub.get(5)).text == "after"
        assert await pubsub_connections(publisher) == 1
    finally:
        await publisher.aclose()
        await relay.stop()


async def test_a_job_registered_again_right_after_close_is_subscribed(redis_url: str, redis_client) -> None:
    relay = await started_relay(redis_url)
    publisher = async_connect(redis_url)
    try:
        first = relay.register("again")
        assert await first.wait_subscribed(5)
        first.close()
        second = relay.register("again")  # before or after the UNSUBSCRIBE went out, it ends subscribed
        assert await second.wait_subscribed(5)
        assert await wait_until(lambda: channel_count(publisher), 1)
        await publisher.publish(second.channel, TokenEvent(job_id="again", text="ok").model_dump_json())
        assert parse_event(await second.get(5)).text == "ok"
        assert await first.get(0.05) is None
    finally:
        await publisher.aclose()
        await relay.stop()
