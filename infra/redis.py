"""The one way processes connect to Redis."""

from __future__ import annotations

import redis

from infra.settings import DEFAULT_REDIS_URL


def connect(url: str | None, *, decode_responses: bool = False) -> redis.Redis:
    """A client for `url` (default: the local Redis) that retries briefly and never blocks forever."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url or DEFAULT_REDIS_URL,
        decode_responses=decode_responses,
        socket_connect_timeout=2,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def async_connect(url: str | None):
    """An asyncio client for `url`, configured like `connect`."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    # redis-py (8.1 here) caps a pool at 100 connections and raises MaxConnectionsError past that; a controller with
    # hundreds of streams waits for a free connection instead (bounded: Redis never sees more than this).
    pool = aioredis.BlockingConnectionPool.from_url(
        url or DEFAULT_REDIS_URL,
        max_connections=128,
        timeout=10,
        socket_connect_timeout=2,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    return aioredis.Redis.from_pool(pool)
