"""Riding out a short Redis outage: a request or a stream waits for Redis to come back, up to an allowance.

`OutageClock` measures how long Redis has been unreachable as seen by one request or stream: `failed()` marks the
start of an outage (and raises RedisUnavailable, naming the allowance, once it has lasted longer), `answered()`
ends it whenever Redis answers, so two short outages are never added up. `ride_out_outage()` retries one step of
a job's start (a read, storing images, admission, enqueueing) with back-off while the outage lasts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import redis

from contract.errors import RedisUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Redis did not answer (or the controller's subscription is not up): an outage that may end. A reply that is an
# error (READONLY, a script error) is not one: it fails the request at once.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, RedisUnavailable)
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 1.0


class OutageClock:
    """How long Redis has been unreachable for one request or stream, against `allowance_s`."""

    def __init__(self, allowance_s: float) -> None:
        self.allowance_s = allowance_s
        self.down_since: float | None = None

    def failed(self, exc: BaseException) -> None:
        """Redis did not answer: the outage starts now (or goes on); RedisUnavailable once it outlasts the
        allowance."""
        now = time.monotonic()
        self.down_since = self.down_since or now
        if now - self.down_since >= self.allowance_s:
            raise RedisUnavailable(
                f"Redis stayed unreachable for longer than the controller's outage allowance of "
                f"{self.allowance_s:g} s (redis_outage_s; {type(exc).__name__}: {exc}); retry shortly"
            ) from exc

    def answered(self) -> None:
        """Redis answered: any outage is over."""
        self.down_since = None


async def ride_out_outage(call: Callable[[], Awaitable[T]], allowance_s: float) -> T:
    """`await call()`, retried with back-off while Redis is unreachable, for up to `allowance_s` seconds; then
    RedisUnavailable (503) naming the allowance. Other errors propagate at once."""
    clock = OutageClock(allowance_s)
    backoff = BACKOFF_INITIAL_S
    while True:
        try:
            return await call()
        except OUTAGE_ERRORS as exc:
            clock.failed(exc)
            log.info("Redis unreachable (%s: %s); retrying in %.1f s", type(exc).__name__, exc, backoff)
        await anyio.sleep(backoff)
        backoff = min(BACKOFF_MAX_S, backoff * 2)
