"""Turns the jobs of dead workers into re-queued jobs (nothing reached the client yet) or visible errors.

A worker is dead when its `keys.worker()` key expired while its id is still in `keys.workers()`. Both the
controller replicas and every worker process run the sweeper; `keys.sweep_lock()` makes one of them act at a time.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field

import redis as redis_lib
from redis import Redis
from rq.job import JobStatus

from broker import jobs
from contract import keys
from contract.errors import WorkerLost
from contract.messages import ClaimState, DoneEvent, ErrorEvent, FinishReason, JobOutcome, Timings

log = logging.getLogger(__name__)

# Extends the lock only while its holder still owns it.
_EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_FINAL = {JobStatus.FINISHED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value, JobStatus.STOPPED.value}


@dataclass
class SweepReport:
    locked_out: bool = False  # another process holds the sweep lock; nothing was done
    dead_workers: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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


def sweep_worker(redis: Redis, worker_id: str, report: SweepReport, *, lock_token: str | None = None) -> None:
    """Settle every job a dead worker held, then forget the worker (its job table, inbox and id)."""
    table = keys.worker_jobs(worker_id)
    held: dict[str, str] = {_text(k): _text(v) for k, v in redis.hgetall(table).items()}
    for job_id in redis.lrange(keys.worker_inbox(worker_id), 0, -1):
        held.setdefault(_text(job_id), ClaimState.claimed.value)
    to_requeue: list[tuple[float, str]] = []
    before = (len(report.requeued), len(report.canceled), len(report.failed))
    for job_id, state in held.items():
        if lock_token is not None and not redis.eval(
            _EXTEND_LOCK, 1, keys.sweep_lock(), lock_token, keys.SWEEP_LOCK_TTL_MS
        ):
            raise RuntimeError("lost the sweep lock while sweeping; another sweeper goes on")
        job = jobs.fetch_job(redis, job_id)
        if job is None or _status(job) in _FINAL:
            redis.hdel(table, job_id)
            continue
        if state == ClaimState.streaming.value:
            # The record first, so a client that reads it after the event sees the failure.
            error = worker_lost_error(job_id, worker_id)
            jobs.finish(redis, worker_id, _outcome(job, JobStatus.FAILED.value, error=error))
            redis.publish(keys.chunks(job_id), error.model_dump_json())
            report.failed.append(job_id)
        elif jobs.is_cancel_requested(redis, job_id):
            done = DoneEvent(job_id=job_id, finish_reason=FinishReason.cancelled, timings=_timings(job))
            jobs.finish(redis, worker_id, _outcome(job, JobStatus.CANCELED.value))
            redis.publish(keys.chunks(job_id), done.model_dump_json())
            report.canceled.append(job_id)
        else:
            to_requeue.append((_enqueued_at(job), job_id))
    # Each requeue pushes to the front: push the newest first so the oldest ends up first, as it was.
    for _, job_id in sorted(to_requeue, reverse=True):
        if jobs.requeue(redis, worker_id, job_id):
            report.requeued.append(job_id)
    with redis.pipeline(transaction=False) as pipe:
        pipe.delete(table, keys.worker_inbox(worker_id))
        pipe.srem(keys.workers(), worker_id)
        pipe.execute()
    report.dead_workers.append(worker_id)
    log.warning(
        "swept dead worker %s: %d requeued, %d canceled, %d failed (worker_lost)",
        worker_id, len(report.requeued) - before[0], len(report.canceled) - before[1], len(report.failed) - before[2],
    )  # fmt: skip


def _status(job: object) -> str:
    status = job.get_status(refresh=False)  # type: ignore[attr-defined]
    return status.value if isinstance(status, JobStatus) else str(status)


def _enqueued_at(job: object) -> float:
    try:
        return jobs.job_request(job).enqueued_at  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a record that is not ours still gets requeued, last
        return 0.0


def _timings(job: object) -> Timings:
    try:
        return Timings(enqueued_at=jobs.job_request(job).enqueued_at)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001
        return Timings()


def _outcome(job: object, status: str, *, error: ErrorEvent | None = None) -> JobOutcome:
    return JobOutcome(
        job_id=job.id,  # type: ignore[attr-defined]
        status=status,
        finish_reason=FinishReason.error if error else FinishReason.cancelled,
        text="",
        timings=_timings(job),
        error=error,
    )


def dead_workers(redis: Redis) -> list[str]:
    """Registered worker ids whose liveness key expired."""
    ids = sorted(_text(i) for i in redis.smembers(keys.workers()))
    if not ids:
        return []
    with redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.exists(keys.worker(worker_id))
        alive = pipe.execute()
    return [w for w, a in zip(ids, alive, strict=True) if not a]


def sweep_once(redis: Redis) -> SweepReport:
    """Sweep every dead worker once, unless another process holds the sweep lock."""
    report = SweepReport()
    token = uuid.uuid4().hex
    if not redis.set(keys.sweep_lock(), token, nx=True, px=keys.SWEEP_LOCK_TTL_MS):
        report.locked_out = True
        return report
    try:
        for worker_id in dead_workers(redis):
            if redis.exists(keys.worker(worker_id)):  # came back since the scan
                continue
            sweep_worker(redis, worker_id, report, lock_token=token)
    finally:
        redis.eval(_RELEASE_LOCK, 1, keys.sweep_lock(), token)
    return report


def run_sweeper(redis_url: str | None, interval: float, stop_event: threading.Event) -> None:
    """Sweep every `interval` seconds until `stop_event` is set; survives Redis outages. Run it in a thread."""
    from infra.redis import connect

    client = connect(redis_url)
    down = False
    try:
        while not stop_event.wait(interval):
            try:
                sweep_once(client)
                if down:
                    log.info("sweeper: Redis reachable again")
                down = False
            except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
                if not down:
                    log.warning("sweeper: Redis unreachable (%s); retrying every %.1f s", exc, interval)
                down = True
            except Exception:  # one bad record must not stop the sweeping of every later dead worker
                log.exception("sweeper: sweep failed")
    finally:
        client.close()
