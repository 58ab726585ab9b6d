import asyncio

import pytest

from infra.redis import async_connect, connect


def test_a_burst_past_the_pool_size_waits_for_connections_instead_of_failing(redis_url):
    # 300 commands that each hold a connection for 0.2 s: more than the pool's 128, fewer than would time out.
    async def burst() -> list:
        client = async_connect(redis_url)
        try:
            return await asyncio.gather(*(client.blpop([f"llava:test:burst:{i}"], timeout=0.2) for i in range(300)))
        finally:
            await client.aclose()

    assert asyncio.run(burst()) == [None] * 300


def test_sync_client_answers(redis_url):
    client = connect(redis_url, decode_responses=True)
    client.set("llava:test:key", "value", ex=5)
    assert client.get("llava:test:key") == "value"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0"])
def test_an_unreachable_redis_fails_fast(url):
    import redis

    async def ping() -> None:
        client = async_connect(url)
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(redis.ConnectionError):
        asyncio.run(asyncio.wait_for(ping(), timeout=10))
