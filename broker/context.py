"""What the controller's routes share: settings, Redis clients, the relay, and async reads of the broker state."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
import redis as sync_redis

from broker.bodies import BodyParser
from broker.relay import ChunkRelay
from contract import keys, liveness
from contract.errors import ModelNotFound, NoWorker, RedisUnavailable
from contract.messages import WorkerInfo
from infra.settings import ControllerSettings

T = TypeVar("T")

# What a failed Redis call raises: every redis-py error (it wraps socket errors in its ConnectionError), and a raw
# OSError for safety on the stream paths. Routes let these propagate to the app's one handler (503).
REDIS_ERRORS = (sync_redis.RedisError, OSError)


@dataclass(frozen=True)
class StreamTimings:
    """How long a stream waits before checking on its job. Defaults suit production; tests shorten them."""

    stall_check_s: float = 3.0  # no event for this long: read the job record (covers lost pub/sub messages)
    no_worker_timeout_s: float = 30.0  # queued with no live worker serving the model this long: error no_worker
    relay_wait_s: float = 2.0  # how long a new request waits for the relay's subscription after an outage
    relay_backoff_max_s: float = 5.0  # longest pause between the relay's reconnect attempts
    redis_outage_s: float = 30.0  # a request or stream rides out a Redis outage this long, then redis_unavailable

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> StreamTimings:
        return cls(
            stall_check_s=settings.stall_check_interval_s,
            no_worker_timeout_s=settings.no_worker_timeout_s,
            redis_outage_s=settings.redis_outage_s,
        )


@dataclass
class ControllerContext:
    settings: ControllerSettings
    redis: Any  # redis.asyncio.Redis
    redis_sync: sync_redis.Redis
    relay: ChunkRelay
    timings: StreamTimings
    bodies: BodyParser
    workers_cache_s: float = 1.0
    # Called with the model as a stream starts; returns an observer (`on_event(event)`, `close()`): metrics.
    observe: Callable[[str], Any] | None = None
    # Awaited once as a stream ends: (job id, its done or error event or None when its client went away, text).
    on_job_end: Callable[[str, Any, str], Awaitable[None]] | None = None
    # Passes a job's events through reply moderation (events, job id, model) -> events; None when it is off.
    screen_reply: Callable[[AsyncIterator[Any], str, str], AsyncIterator[Any]] | None = None
    # This process's id: jobs carry it, and its lease (`keys.controller()`) ending cancels them.
    controller_id: str = field(default_factory=liveness.new_controller_id)
    _workers: tuple[float, list[WorkerInfo]] | None = field(default=None, repr=False)

    async def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a sync contract.jobs call off the event loop (its Redis errors propagate as raised)."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def live_workers(self, *, fresh: bool = False) -> list[WorkerInfo]:
        """Workers whose liveness key exists, cached for `workers_cache_s` (a thousand streams poll this)."""
        now = time.monotonic()
        if not fresh and self._workers is not None and now - self._workers[0] < self.workers_cache_s:
            return self._workers[1]
        infos = await liveness.live_workers_async(self.redis)
        self._workers = (time.monotonic(), infos)
        return infos

    async def serving(self, *, fresh: bool = False) -> dict[str, list[WorkerInfo]]:
        """Model name -> live, non-draining workers serving it."""
        models: dict[str, list[WorkerInfo]] = {}
        for info in await self.live_workers(fresh=fresh):
            if info.draining:
                continue
            for model in info.models:
                models.setdefault(model, []).append(info)
        return dict(sorted(models.items()))

    async def queue_depth(self, model: str) -> int:
        return int(await self.redis.llen(keys.rq_queue(model)))

    async def queue_position(self, model: str, job_id: str) -> int | None:
        position = await self.redis.lpos(keys.rq_queue(model), job_id)
        return None if position is None else int(position)

    async def has_queue(self, model: str) -> bool:
        """A model someone served or queued for: its rq queue is registered or holds jobs."""
        key = keys.rq_queue(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sismember(keys.rq_queues(), key)
            pipe.llen(key)
            registered, depth = await pipe.execute()
        return bool(registered) or int(depth) > 0

    async def require_model(self, model: str) -> list[WorkerInfo]:
        """The workers serving `model`; 404 naming the models there are, or 503 when it has no live worker."""
        serving = await self.serving(fresh=True)
        if model in serving:
            return serving[model]
        if await self.has_queue(model):
            raise NoWorker(
                f"model {model!r} has no live worker right now; start one with "
                f"`llava-serve worker --model-path ... --redis-url ...` or retry later"
            )
        available = ", ".join(repr(m) for m in serving) or "none (no live worker)"
        raise ModelNotFound(f"model {model!r} is not served here; models served: {available}")


def redis_unavailable(exc: BaseException) -> RedisUnavailable:
    """The 503 a failed Redis call stands for, naming the failure."""
    return RedisUnavailable(f"Redis is unavailable ({type(exc).__name__}: {exc}); retry shortly")
