"""Liveness, in one place: workers register, heartbeat, unregister, and which are live or dead; controllers hold a
lease (`keys.controller()`) while they stream jobs.

A worker is live while its `keys.worker()` key exists (TTL `keys.WORKER_TTL_S`, refreshed every
`keys.HEARTBEAT_INTERVAL_S` by a thread of its own); it is dead when that key expired while its id is still in
`keys.workers()`. Every writing helper takes an optional `pipeline` (as rq's `worker_registration` does): given one,
it only queues its commands there; without one, it runs them in one round trip of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterable
from typing import Any

import redis as redis_lib
from redis import Redis
from redis.client import Pipeline

from contract import keys
from contract.errors import WorkerLost
from contract.messages import ErrorEvent, WorkerInfo

log = logging.getLogger(__name__)

# After Redis was unreachable (or restarted), liveness is judged only once every live worker has had a full TTL,
# many heartbeats, to write its key again: keys expire during an outage whatever the workers do.
REREGISTER_GRACE_S = float(keys.WORKER_TTL_S)
# How often sweepers look for dead workers by default.
SWEEP_INTERVAL_S = 1.0
# The promise: a streaming job of a worker that died (or froze) gets its `worker_lost` error within this long. Its
# key expires WORKER_TTL_S after the last beat and the next sweep finds it; a second is left for the sweep itself.
DEATH_TO_ERROR_S = 5.0
if keys.WORKER_TTL_S + SWEEP_INTERVAL_S + 1.0 > DEATH_TO_ERROR_S:
    raise RuntimeError("WORKER_TTL_S and SWEEP_INTERVAL_S no longer fit DEATH_TO_ERROR_S")

# Drops a worker's key; forgets its id and empty job table/inbox only when it holds no job (else the sweeper must).
_UNREGISTER = """
redis.call('DEL', KEYS[1])
if redis.call('HLEN', KEYS[2]) > 0 or redis.call('LLEN', KEYS[3]) > 0 then return 0 end
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def register(client: Redis, info: WorkerInfo, *, pipeline: Pipeline | None = None) -> bool | None:
    """Write a worker's key (TTL WORKER_TTL_S), add its id to `keys.workers()` and refresh its job table's TTL.

    Without `pipeline`: returns True when the key had expired (or never existed) before this write. With one:
    returns None; the first of the three replies queued is the key's previous value (None when it had lapsed)."""
    pipe = pipeline if pipeline is not None else client.pipeline(transaction=False)
    pipe.set(keys.worker(info.worker_id), info.model_dump_json(), ex=keys.WORKER_TTL_S, get=True)
    pipe.sadd(keys.workers(), info.worker_id)
    pipe.expire(keys.worker_jobs(info.worker_id), keys.WORKER_JOBS_TTL_S)
    if pipeline is not None:
        return None
    previous, _added, _expired = pipe.execute()
    return previous is None


def heartbeat(client: Redis, info: WorkerInfo, *, pipeline: Pipeline | None = None) -> bool | None:
    """One beat: the same writes as `register` (a beat re-registers a worker whose key lapsed), same returns."""
    return register(client, info, pipeline=pipeline)


def unregister(client: Redis, worker_id: str, *, pipeline: Pipeline | None = None) -> bool | None:
    """Remove a stopping worker's key; drop its id and empty job table too. Without `pipeline`: False when jobs
    remain in its table or inbox (the sweeper then settles them, since the key is gone); with one, None."""
    pipe = pipeline if pipeline is not None else client.pipeline(transaction=False)
    worker_keys = (keys.worker(worker_id), keys.worker_jobs(worker_id), keys.worker_inbox(worker_id), keys.workers())
    pipe.eval(_UNREGISTER, len(worker_keys), *worker_keys, worker_id)
    if pipeline is not None:
        return None
    (forgotten,) = pipe.execute()
    return bool(forgotten)


def registered_ids(raw_ids: Iterable[bytes | str]) -> list[str]:
    """The members of `keys.workers()` as sorted text."""
    return sorted(_text(i) for i in raw_ids)


def parse_infos(raws: Iterable[bytes | str | None]) -> list[WorkerInfo]:
    """The `WorkerInfo` of each worker key read (MGET order); lapsed keys and records of another version are
    skipped, since they are not ours to judge."""
    infos = []
    for raw in raws:
        if not raw:
            continue
        try:
            infos.append(WorkerInfo.model_validate_json(raw))
        except ValueError:
            continue
    return infos


def live_workers(client: Redis) -> list[WorkerInfo]:
    """Workers whose key has not expired, by id."""
    ids = registered_ids(client.smembers(keys.workers()))
    return parse_infos(client.mget([keys.worker(i) for i in ids])) if ids else []


async def live_workers_async(client: Any) -> list[WorkerInfo]:
    """`live_workers` on a `redis.asyncio.Redis` client."""
    ids = registered_ids(await client.smembers(keys.workers()))
    return parse_infos(await client.mget([keys.worker(i) for i in ids])) if ids else []


def dead_workers(client: Redis) -> list[str]:
    """Registered worker ids whose key expired, sorted."""
    ids = registered_ids(client.smembers(keys.workers()))
    if not ids:
        return []
    with client.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.exists(keys.worker(worker_id))
        alive = pipe.execute()
    return [w for w, a in zip(ids, alive, strict=True) if not a]


def redis_uptime_s(client: Redis) -> float:
    """How long the Redis server has been up (a restart also ends an outage that a caller may not have seen)."""
    return float(client.info("server")["uptime_in_seconds"])


def worker_lost_error(job_id: str, worker_id: str, *, reason: str = "stopped responding") -> ErrorEvent:
    """The error a client sees when its job's worker died after the answer started streaming."""
    return ErrorEvent(
        job_id=job_id,
        code=WorkerLost.code,
        status_code=WorkerLost.status_code,
        message=(
            f"worker {worker_id} {reason} while generating this answer; the partial answer was lost. "
            "Please regenerate the response."
        ),
    )


def new_controller_id() -> str:
    """A controller process's id: host, pid and a random suffix (a restarted process gets a new one)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def queue_lease(pipe: Any, controller_id: str) -> None:
    """Queue, on a (sync or async) pipeline, the write of a controller's lease with its TTL."""
    pipe.set(keys.controller(controller_id), controller_id, ex=keys.CONTROLLER_LEASE_TTL_S)


async def hold_controller_lease(
    client: Any, controller_id: str, *, interval_s: float = keys.CONTROLLER_LEASE_INTERVAL_S
) -> None:
    """Refresh a controller's lease on a `redis.asyncio.Redis` client every `interval_s` until cancelled, then
    delete it (workers then cancel its jobs at once). Survives Redis outages: logs once and keeps trying."""
    down = False
    try:
        while True:
            try:
                async with client.pipeline(transaction=False) as pipe:
                    queue_lease(pipe, controller_id)
                    await pipe.execute()
                if down:
                    log.info("controller lease %s: Redis reachable again", controller_id)
                down = False
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError) as exc:
                if not down:
                    log.warning("controller lease %s: Redis unreachable (%s); retrying", controller_id, exc)
                down = True
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.delete(keys.controller(controller_id)), 1.0)
