"""A generation job's life in rq's records: enqueue, start, finish, cancel, requeue (claiming is `contract.claims`).

rq gives the per-model queues, job records and registries that `rq info` and `redis-cli` show; its worker classes
run one job at a time, so llava-serve workers claim jobs themselves through these functions, and every status
change goes through rq's own job and registry API so that the records tell the truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from redis import Redis, RedisError
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import DuplicateJobError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from contract import keys, liveness, ownership
from contract.errors import QueueFull
from contract.liveness import worker_lost_error
from contract.messages import ClaimState, DoneEvent, ErrorEvent, FinishReason, JobOutcome, JobRequest, JobView, Timings

_FINAL = {JobStatus.FINISHED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value, JobStatus.STOPPED.value}
# A started job's registry entry; liveness is judged by our worker keys, so rq's own expiry must never fire first.
STARTED_TTL_S = 24 * 3600

# Forgets a settled worker (job table, inbox, id) unless it came back meanwhile: what a woken worker claimed since
# is its own, and its heartbeat keeps its id registered.
_FORGET_WORKER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""


def run_outside_llava_worker(request: dict) -> None:
    """The rq function name of every llava-serve job; only `llava-serve worker` can run these jobs."""
    raise RuntimeError("llava-serve jobs are run by `llava-serve worker`, not by `rq worker`")


def queue_for(redis: Redis, model: str) -> Queue:
    """rq's queue of a model; its `.key` is `keys.rq_queue(model)`."""
    return Queue(keys.queue_name(model), connection=redis, serializer=JSONSerializer)


def fetch_job(redis: Redis, job_id: str) -> Job | None:
    """The job's rq record; None when there is none (or it is not ours). Redis errors propagate: an outage is
    never taken for a missing job."""
    try:
        return Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except RedisError:
        raise
    except Exception:  # rq raises NoSuchJobError, or a decode error for a record that is not ours
        return None


def queue_depth(redis: Redis, model: str) -> int:
    return int(redis.llen(keys.rq_queue(model)))


def queue_position(redis: Redis, model: str, job_id: str) -> int | None:
    """0 for the next job to be claimed; None once the job left the queue."""
    pos = redis.lpos(keys.rq_queue(model), job_id)
    return None if pos is None else int(pos)


def enqueue(redis: Redis, request: JobRequest, *, max_queue: int, result_ttl: int) -> Job:
    """Put a job at the back of its model's queue; QueueFull (429) when `max_queue` jobs already wait.

    Idempotent: saving the job and pushing its id is one script that does nothing when the job exists, so the same
    enqueue sent again after its reply was lost (redis-py resends on a dropped connection; the controller retries
    through an outage) never queues the job twice, which would run it twice into one stream."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.llen(keys.rq_queue(request.model))
        if request.controller_id:  # so that no worker finds the lease missing right after a controller reconnects
            liveness.queue_lease(pipe, request.controller_id)
        depth = pipe.execute()[0]
    if depth >= max_queue:
        raise QueueFull(
            f"the queue of model {request.model!r} is full ({depth} jobs waiting, limit {max_queue})",
            retry_after=max(1, min(60, depth // 8)),
        )
    queue = queue_for(redis, request.model)
    try:
        return queue.enqueue_call(
            run_outside_llava_worker,
            kwargs={"request": request.model_dump(mode="json")},
            job_id=request.job_id,
            result_ttl=result_ttl,
            failure_ttl=result_ttl,
            description=f"generate {request.model} ({request.params.max_new_tokens} tokens max)",
            meta={"model": request.model},
            unique=True,
        )
    except DuplicateJobError:  # an earlier send of this enqueue ran; ids are never reused
        return Job.fetch(request.job_id, connection=redis, serializer=queue.serializer)


def job_request(job: Job) -> JobRequest:
    return JobRequest.model_validate(job.kwargs["request"])


def mark_started(redis: Redis, worker_id: str, job_id: str) -> Execution | None:
    """Record that a claimed job was admitted into the worker's engine (rq status `started`)."""
    job = fetch_job(redis, job_id)
    if job is None:
        return None
    with redis.pipeline() as pipe:
        execution = Execution.create(job, STARTED_TTL_S, pipeline=pipe, worker_name=worker_id)
        job.prepare_for_execution(worker_id, pipeline=pipe)
        pipe.persist(job.key)
        pipe.hset(keys.worker_jobs(worker_id), job_id, ClaimState.started.value)
        pipe.execute()
    return execution


def start_claimed(redis: Redis, worker_id: str, request: JobRequest, *, judge_lease: bool = False) -> bool:
    """`mark_started` for a job this worker just claimed (its record is known to exist), unless it should not run:
    returns True, and marks nothing, when a cancel was requested or (with `judge_lease`) the lease of the controller
    that streams it is gone. Raises `ownership.NotOwned` when a sweeper took the job away since the claim."""
    job = Job(request.job_id, connection=redis, serializer=JSONSerializer)
    job.origin = keys.queue_name(request.model)
    lease = keys.controller(request.controller_id) if judge_lease and request.controller_id else None

    def should_not_run(pipe: Pipeline) -> bool | None:
        if pipe.exists(keys.cancel(request.job_id)):
            return True
        return True if lease is not None and not pipe.exists(lease) else None

    def start(pipe: Pipeline) -> None:
        Execution.create(job, STARTED_TTL_S, pipeline=pipe, worker_name=worker_id)
        job.prepare_for_execution(worker_id, pipeline=pipe)
        pipe.persist(job.key)
        pipe.hset(keys.worker_jobs(worker_id), request.job_id, ClaimState.started.value)

    return bool(ownership.write_if_owned(redis, worker_id, request.job_id, start, check=should_not_run))


def mark_streaming(pipe: Pipeline, worker_id: str, job_id: str) -> None:
    """Queue, on the caller's pipeline, the note that a job's first token went out (it can no longer be retried)."""
    pipe.hset(keys.worker_jobs(worker_id), job_id, ClaimState.streaming.value)


def is_cancel_requested(redis: Redis, job_id: str) -> bool:
    return bool(redis.exists(keys.cancel(job_id)))


def request_cancel(redis: Redis, job_id: str, model: str) -> bool:
    """Ask for a job to stop. A job still in the queue leaves it at once (returns True); a claimed or running
    job is stopped by its worker, which checks the flag between decode steps (returns False)."""
    redis.set(keys.cancel(job_id), "1", ex=keys.CANCEL_TTL_S)
    if redis.lrem(keys.rq_queue(model), 0, job_id):
        job = fetch_job(redis, job_id)
        if job is not None:
            _end(
                redis,
                job,
                JobOutcome(job_id=job_id, status=JobStatus.CANCELED.value, finish_reason="cancelled"),
            )
        return True
    return False


def _remove_executions(job: Job, pipe: Pipeline) -> None:
    for execution in ExecutionRegistry(job_id=job.id, connection=job.connection).get_executions():
        execution.delete(job=job, pipeline=pipe)


def _end(redis: Redis, job: Job, outcome: JobOutcome, *, worker_id: str | None = None) -> None:
    """Move a job to its final rq status and registry, with `outcome` in its meta, expiring after result_ttl."""
    with redis.pipeline() as pipe:
        _queue_end(pipe, redis, job, outcome, worker_id=worker_id)
        pipe.execute()


def _queue_end(pipe: Pipeline, redis: Redis, job: Job, outcome: JobOutcome, *, worker_id: str | None = None) -> None:
    """Queue `_end`'s writes on a transaction pipeline (in MULTI mode)."""
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else 600
    job.meta["outcome"] = outcome.model_dump(mode="json")
    job.ended_at = job.ended_at or rq_now()
    _remove_executions(job, pipe)
    # rq's public registry and result API, so that `rq info` and `job.latest_result()` tell the truth.
    if outcome.status == JobStatus.FINISHED.value:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        job.save(pipeline=pipe)
        Result.create(
            job, Result.Type.SUCCESSFUL, ttl, return_value=outcome.model_dump(mode="json"),
            worker_name=worker_id or "", pipeline=pipe,
        )  # fmt: skip
        FinishedJobRegistry(job.origin, connection=redis, serializer=JSONSerializer).add(job, ttl, pipeline=pipe)
    elif outcome.status == JobStatus.CANCELED.value:
        job.set_status(JobStatus.CANCELED, pipeline=pipe)
        job.save(pipeline=pipe)
        CanceledJobRegistry(job.origin, connection=redis, serializer=JSONSerializer).add(job, ttl, pipeline=pipe)
    else:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job.save(pipeline=pipe)
        message = outcome.error.message if outcome.error else "failed"
        code = outcome.error.code if outcome.error else "error"
        failure = f"{code}: {message}"
        registry = FailedJobRegistry(job.origin, connection=redis, serializer=JSONSerializer)
        registry.add(job, ttl=job.failure_ttl, exc_string=failure, pipeline=pipe)
        Result.create_failure(job, job.failure_ttl, failure, worker_name=worker_id or "", pipeline=pipe)
    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
    if worker_id:
        pipe.hdel(keys.worker_jobs(worker_id), job.id)
    pipe.expire(keys.cancel(job.id), 60)


def finish(redis: Redis, worker_id: str, outcome: JobOutcome, *, fenced: bool = False) -> bool:
    """Record a job's final outcome (finished, canceled or failed) and drop it from the worker's job table.

    With `fenced`, only while the job is still in that table (checked atomically with the write): False, and
    nothing written, when a sweeper took the job away meanwhile. True otherwise (also for a job with no record)."""
    job = fetch_job(redis, outcome.job_id)
    if job is None:
        redis.hdel(keys.worker_jobs(worker_id), outcome.job_id)
        return True
    outcome.worker_id = worker_id
    if not fenced:
        _end(redis, job, outcome, worker_id=worker_id)
        return True
    try:
        ownership.write_if_owned(
            redis, worker_id, job.id, lambda pipe: _queue_end(pipe, redis, job, outcome, worker_id=worker_id)
        )
    except ownership.NotOwned:
        return False
    return True


def requeue(redis: Redis, worker_id: str, job_id: str, *, fenced: bool = False) -> bool:
    """Put a job of a dead or stopping worker back at the front of its queue, as never started. With `fenced`, only
    while the job is still in the worker's job table (else False, nothing written)."""
    job = fetch_job(redis, job_id)
    if job is None:
        redis.hdel(keys.worker_jobs(worker_id), job_id)
        return False

    def write(pipe: Pipeline) -> None:
        _remove_executions(job, pipe)
        job.set_status(JobStatus.QUEUED, pipeline=pipe)
        pipe.hdel(job.key, "worker_name", "started_at")
        pipe.lpush(keys.rq_queue(keys.model_from_queue_name(job.origin)), job_id)
        pipe.hdel(keys.worker_jobs(worker_id), job_id)

    if not fenced:
        with redis.pipeline() as pipe:
            write(pipe)
            pipe.execute()
        return True
    try:
        ownership.write_if_owned(redis, worker_id, job_id, write)
    except ownership.NotOwned:
        return False
    return True


def view(redis: Redis, job_id: str) -> JobView | None:
    """What `GET /api/v1/jobs/{id}` returns; None for an unknown (or expired) job."""
    job = fetch_job(redis, job_id)
    if job is None:
        return None
    status_value = _status(job)
    model = job.meta.get("model")
    outcome = job.meta.get("outcome")
    position = queue_position(redis, model, job_id) if model and status_value == "queued" else None
    return JobView(
        job_id=job_id,
        model=model,
        status=status_value,
        position=position,
        outcome=JobOutcome.model_validate(outcome) if outcome else None,
    )


@dataclass
class Settled:
    """What settling gone workers' jobs did, by job id."""

    requeued: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def settle_worker(
    redis: Redis, worker_id: str, settled: Settled, *, still_mine: Callable[[], bool] | None = None
) -> None:
    """Settle every job a gone worker held, then forget the worker (its job table, inbox and id): jobs that sent
    nothing go back to the front of their queue in their old order, cancelled ones end cancelled, streaming ones
    fail with `worker_lost`. `still_mine` is asked before each job (a sweep lock); False raises RuntimeError."""
    table = keys.worker_jobs(worker_id)
    held: dict[str, str] = {text_of(k): text_of(v) for k, v in redis.hgetall(table).items()}
    in_table = set(held)  # writes for these are fenced: the worker may wake up and settle a job itself meanwhile
    for job_id in redis.lrange(keys.worker_inbox(worker_id), 0, -1):
        held.setdefault(text_of(job_id), ClaimState.claimed.value)
    to_requeue: list[tuple[float, str]] = []
    for job_id, state in held.items():
        if still_mine is not None and not still_mine():
            raise RuntimeError("lost the sweep lock while sweeping; another sweeper goes on")
        job = fetch_job(redis, job_id)
        if job is None or _status(job) in _FINAL:
            redis.hdel(table, job_id)
            continue
        if state == ClaimState.streaming.value:
            # The record first, so a client that reads it after the event sees the failure.
            error = worker_lost_error(job_id, worker_id)
            if finish(redis, worker_id, _settled_outcome(job, JobStatus.FAILED.value, error=error), fenced=True):
                redis.publish(keys.chunks(job_id), error.model_dump_json())
                settled.failed.append(job_id)
        elif is_cancel_requested(redis, job_id):
            done = DoneEvent(job_id=job_id, finish_reason=FinishReason.cancelled, timings=_timings(job))
            finish(redis, worker_id, _settled_outcome(job, JobStatus.CANCELED.value))
            redis.publish(keys.chunks(job_id), done.model_dump_json())
            settled.canceled.append(job_id)
        else:
            to_requeue.append((_timings(job).enqueued_at or 0.0, job_id))
    # Each requeue pushes to the front: push the newest first so the oldest ends up first, as it was.
    for _, job_id in sorted(to_requeue, reverse=True):
        if requeue(redis, worker_id, job_id, fenced=job_id in in_table):
            settled.requeued.append(job_id)
    forget_keys = (keys.worker(worker_id), table, keys.worker_inbox(worker_id), keys.workers())
    redis.eval(_FORGET_WORKER, len(forget_keys), *forget_keys, worker_id)


def text_of(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _status(job: Job) -> str:
    status = job.get_status(refresh=False)
    return status.value if isinstance(status, JobStatus) else str(status)


def _timings(job: Job) -> Timings:
    try:
        return Timings(enqueued_at=job_request(job).enqueued_at)
    except Exception:  # noqa: BLE001 - a record that is not ours still gets settled (requeued last)
        return Timings()


def _settled_outcome(job: Job, status: str, *, error: ErrorEvent | None = None) -> JobOutcome:
    return JobOutcome(
        job_id=job.id,
        status=status,
        finish_reason=FinishReason.error if error else FinishReason.cancelled,
        text="",
        timings=_timings(job),
        error=error,
    )
