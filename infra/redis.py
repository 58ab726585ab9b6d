"""The one way processes connect to Redis: a plain URL (`redis://`, `rediss://`, `unix://`) or a Sentinel URL.

    redis+sentinel://[[username]:password@]host1[:26379][,host2[:26379]...]/<service_name>[/<db>][?sentinel_password=...]

A Sentinel URL names the sentinels and the monitored service; every connection asks a sentinel for the current
master first, so clients follow a failover (a connection to a demoted or dead master fails and the next one goes to
the new master). The password (and username) are the data nodes' (`requirepass`/ACL); `sentinel_password` is the
sentinels' own, when they have one. The port defaults to 26379 and the database to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio import sentinel as aio_sentinel

from infra.settings import DEFAULT_REDIS_URL

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# Sentinel answers from memory: a sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `redis+sentinel://` URL."""

    sentinels: list[tuple[str, int]]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a `redis+sentinel://` URL; ValueError naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {url!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, has_password, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = []
    for node in netloc.split(","):
        host, has_port, port = node.strip().rpartition(":") if ":" in node else (node.strip(), "", "")
        if not host:
            raise ValueError(f"redis+sentinel URL: empty sentinel address in {netloc!r}")
        if has_port and not port.isdigit():
            raise ValueError(f"redis+sentinel URL: sentinel port {port!r} of {host!r} is not a number")
        sentinels.append((host.strip("[]"), int(port) if has_port else SENTINEL_PORT))
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"redis+sentinel URL: the path must be /<service_name>[/<db>], got /{path!r}")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"redis+sentinel URL: database {parts[1]!r} is not a number")
    options = parse_qs(query)
    unknown = set(options) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"redis+sentinel URL: unknown option(s) {sorted(unknown)}; only sentinel_password is known")
    sentinel_password = options["sentinel_password"][-1] if "sentinel_password" in options else None
    db = int(parts[1]) if len(parts) == 2 else 0
    return SentinelURL(sentinels, parts[0], db, username, password, sentinel_password)


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and url.startswith(f"{SENTINEL_SCHEME}://")  # type: ignore[union-attr]


def _client_options(retry_class: type) -> dict[str, Any]:
    """Options of every data connection: fail fast, retry briefly, never block forever."""
    from redis.backoff import ExponentialBackoff

    return {
        "socket_connect_timeout": 2,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def _sentinel_options(parsed: SentinelURL) -> dict[str, Any]:
    return {
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "password": parsed.sentinel_password,
    }


def _node_auth(parsed: SentinelURL) -> dict[str, Any]:
    return {"db": parsed.db, "username": parsed.username, "password": parsed.password}


class SentinelRedis(redis.Redis):
    """A master client from a Sentinel URL; `close()` also closes the connections to the sentinels."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            sentinel.close()


def connect(url: str | None, *, decode_responses: bool = False) -> redis.Redis:
    """A client for `url` (default: the local Redis) that retries briefly and never blocks forever."""
    from redis.retry import Retry

    url = url or DEFAULT_REDIS_URL
    if is_sentinel_url(url):
        from redis.sentinel import Sentinel

        parsed = parse_sentinel_url(url)
        manager = Sentinel(parsed.sentinels, sentinel_kwargs=_sentinel_options(parsed))
        return manager.master_for(
            parsed.service_name,
            redis_class=SentinelRedis,
            decode_responses=decode_responses,
            **_node_auth(parsed),
            **_client_options(Retry),
        )
    return redis.Redis.from_url(url, decode_responses=decode_responses, **_client_options(Retry))


def private_copy(client: redis.Redis) -> redis.Redis:
    """A client with its own connection pool (a stuck or busy pool is not shared), configured like `client`."""
    pool = client.connection_pool
    from redis.sentinel import SentinelConnectionPool

    if isinstance(pool, SentinelConnectionPool):
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
        copy = SentinelConnectionPool(
            pool.service_name,
            pool.sentinel_manager,
            connection_class=pool.connection_class,
            is_master=pool.is_master,
            check_connection=pool.check_connection,
            **kwargs,
        )
        return redis.Redis(connection_pool=copy)  # the sentinels stay the original client's to close
    return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **pool.connection_kwargs))


class BlockingSentinelConnectionPool(aio_sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's asyncio Sentinel pool, waiting for a free connection (like `BlockingConnectionPool`) at the cap."""


class AsyncSentinelRedis(aioredis.Redis):
    """An asyncio master client from a Sentinel URL; `aclose()` also closes the connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def async_connect(url: str | None) -> aioredis.Redis:
    """An asyncio client for `url`, configured like `connect`."""
    from redis.asyncio.retry import Retry

    url = url or DEFAULT_REDIS_URL
    options = _client_options(Retry)
    # redis-py (8.1 here) caps a pool at 100 connections and raises MaxConnectionsError past that; a controller with
    # hundreds of streams waits for a free connection instead (bounded: Redis never sees more than this).
    blocking = {"max_connections": 128, "timeout": 10}
    if is_sentinel_url(url):
        parsed = parse_sentinel_url(url)
        manager = aio_sentinel.Sentinel(parsed.sentinels, sentinel_kwargs=_sentinel_options(parsed))
        return manager.master_for(
            parsed.service_name,
            redis_class=AsyncSentinelRedis,
            connection_pool_class=BlockingSentinelConnectionPool,
            **_node_auth(parsed),
            **blocking,
            **options,
        )
    pool = aioredis.BlockingConnectionPool.from_url(url, **blocking, **options)
    return aioredis.Redis.from_pool(pool)
