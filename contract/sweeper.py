"""Turns the jobs of dead workers into re-queued jobs (nothing reached the client yet) or visible errors.

Which workers are dead is `contract.liveness.dead_workers`; what becomes of their jobs is `contract.jobs.settle_worker`.
Controller replicas (and worker processes, through `llava-serve worker`) run the sweeper; `keys.sweep_lock()` makes
one of them act at a time.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis as redis_lib
from redis import Redis

from contract import jobs, keys, liveness

log = logging.getLogger(__name__)

# rq removes expired entries from its finished, failed and canceled registries only when someone asks it to (its
# own workers do, every 10 minutes; ours do not): the sweeper asks, at most this often.
REGISTRY_PRUNE_INTERVAL_S = 60.0

# Extends the lock only while its holder still owns it.
_EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class SweepReport(jobs.Settled):
    locked_out: bool = False  # another process holds the sweep lock; nothing was done
    paused: bool = False  # Redis was unreachable moments ago: workers may not have re-registered yet; nothing done
    dead_workers: list[str] = field(default_factory=list)


def sweep_worker(redis: Redis, worker_id: str, report: SweepReport, *, lock_token: str | None = None) -> None:
    """Settle every job a dead worker held (`jobs.settle_worker`), holding the sweep lock throughout when given."""

    def still_mine() -> bool:
        return bool(redis.eval(_EXTEND_LOCK, 1, keys.sweep_lock(), lock_token, keys.SWEEP_LOCK_TTL_MS))

    before = (len(report.requeued), len(report.canceled), len(report.failed))
    jobs.settle_worker(redis, worker_id, report, still_mine=None if lock_token is None else still_mine)
    report.dead_workers.append(worker_id)
    log.warning(
        "swept dead worker %s: %d requeued, %d canceled, %d failed (worker_lost)",
        worker_id, len(report.requeued) - before[0], len(report.canceled) - before[1], len(report.failed) - before[2],
    )  # fmt: skip


def sweep_once(redis: Redis, *, reachable_for_s: float | None = None) -> SweepReport:
    """Sweep every dead worker once, unless another process holds the sweep lock or Redis came back less than
    REREGISTER_GRACE_S ago (`reachable_for_s`: how long since it was last unreachable, or since it restarted)."""
    report = SweepReport()
    grace_s = liveness.REREGISTER_GRACE_S
    if reachable_for_s is not None and reachable_for_s < grace_s:
        report.paused = True
        return report
    token = uuid.uuid4().hex
    if not redis.set(keys.sweep_lock(), token, nx=True, px=keys.SWEEP_LOCK_TTL_MS):
        report.locked_out = True
        return report
    try:
        for worker_id in liveness.dead_workers(redis):
            if redis.exists(keys.worker(worker_id)):  # came back since the scan
                continue
            sweep_worker(redis, worker_id, report, lock_token=token)
    finally:
        redis.eval(_RELEASE_LOCK, 1, keys.sweep_lock(), token)
    return report


def prune_registries(redis: Redis) -> int:
    """Remove expired entries (scores are expiry times) from every model queue's finished, failed and canceled rq
    registries: rq's own `cleanup` for the first two; rq's canceled registry has none, so its expired entries are
    removed the same way. The started registry is left to liveness. Returns how many entries went."""
    from rq.registry import FailedJobRegistry, FinishedJobRegistry

    removed = 0
    prefix = keys.rq_queue_prefix().encode()
    for raw in redis.smembers(keys.rq_queues()):
        queue_key = raw if isinstance(raw, bytes) else raw.encode()
        if not queue_key.startswith(prefix):
            continue
        model = queue_key[len(prefix) :].decode()
        for registry_class, kind in ((FinishedJobRegistry, "finished"), (FailedJobRegistry, "failed")):
            before = redis.zcard(keys.rq_registry(kind, model))
            registry_class(keys.queue_name(model), connection=redis).cleanup()
            removed += before - redis.zcard(keys.rq_registry(kind, model))
        removed += redis.zremrangebyscore(keys.rq_registry("canceled", model), 0, time.time())
    return removed


def run_sweeper(
    redis_url: str | None,
    interval_s: float,
    stop_event: threading.Event,
    *,
    on_sweep: Callable[[SweepReport], None] | None = None,
) -> None:
    """Sweep every `interval_s` seconds until `stop_event` is set; survives Redis outages. Run it in a thread.
    `on_sweep` gets the report of every sweep that reached Redis."""
    from infra.redis import connect

    client = connect(redis_url)
    down = False
    reachable_since: float | None = None  # when Redis answered again after this sweeper last saw it down
    pruned_at = -REGISTRY_PRUNE_INTERVAL_S  # monotonic time of the last registry pruning
    try:
        while not stop_event.wait(interval_s):
            try:
                if down:
                    client.ping()
                    reachable_since = time.monotonic()
                reachable_for_s = liveness.redis_uptime_s(client)  # a restart this sweeper did not see
                if reachable_since is not None:
                    reachable_for_s = min(reachable_for_s, time.monotonic() - reachable_since)
                report = sweep_once(client, reachable_for_s=reachable_for_s)
                if time.monotonic() - pruned_at >= REGISTRY_PRUNE_INTERVAL_S and not report.locked_out:
                    pruned_at = time.monotonic()
                    prune_registries(client)
                if on_sweep is not None:
                    on_sweep(report)
                if down:
                    log.info("sweeper: Redis reachable again")
                down = False
            except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
                if not down:
                    log.warning("sweeper: Redis unreachable (%s); retrying every %.1f s", exc, interval_s)
                down = True
            except Exception:  # one bad record must not stop the sweeping of every later dead worker
                log.exception("sweeper: sweep failed")
    finally:
        client.close()
