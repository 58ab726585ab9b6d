"""Which worker owns a job, and writes that happen only while it still does (fencing).

A worker owns a job while the job's id is in its job table (`keys.worker_jobs()`); a sweeper that settles a dead or
frozen worker removes the id (requeued or failed), and another worker may then claim the job. A worker that wakes up
after such a gap must write nothing more for that job: every write a worker makes for a job it holds checks the
table atomically with the write, either inside a Lua script (the per-step publish, putting jobs back) or under a
WATCH of the table (writes built with rq's API), and tells the caller when the job was taken away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis import Redis, WatchError
from redis.client import Pipeline

from contract import keys
from contract.messages import ClaimState

# A reply of `queue_step` for a job that is no longer the worker's: nothing was sent for it.
TAKEN_AWAY = -1
_WATCH_ATTEMPTS = 50


class NotOwned(RuntimeError):
    """The job is no longer in this worker's job table (a sweeper requeued or failed it while the worker was frozen
    or cut off): nothing was written, and the worker must drop the job."""


# KEYS[1]: the worker's job table; KEYS[i + 1]: job i's cancel flag. ARGV per job i: ARGV[3i-2] its id, ARGV[3i-1]
# its chunk channel, ARGV[3i] the token event to publish ('' for none).
# A job counts as the worker's only if it is in the table as started or streaming: `claimed` there means a fresh
# claim of a job that was taken away and queued again, not the run this worker has in its engine.
_STEP = f"""
local out = {{}}
for i = 1, #KEYS - 1 do
  local id, channel, event = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local state = redis.call('HGET', KEYS[1], id)
  if (not state) or state == '{ClaimState.claimed.value}' then
    out[i] = {TAKEN_AWAY}
  else
    if event ~= '' then
      if state ~= '{ClaimState.streaming.value}' then
        redis.call('HSET', KEYS[1], id, '{ClaimState.streaming.value}')
      end
      redis.call('PUBLISH', channel, event)
    end
    out[i] = redis.call('EXISTS', KEYS[i + 1])
  end
end
return out
"""

# KEYS[1]: the model's queue, KEYS[2]: the worker's job table; ARGV: job ids in queue order. Only ids still in the
# table go back (to the front, in their order): a job a sweeper already requeued is not queued twice.
_PUT_BACK = """
local back = 0
for i = #ARGV, 1, -1 do
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    back = back + 1
  end
end
return back
"""


def queue_step(pipe: Pipeline, worker_id: str, step: Sequence[tuple[str, str]]) -> None:
    """Queue, on the caller's pipeline, one decode step of a worker: for each (job id, token event JSON or '') the
    event is published (and the job noted `streaming`) only while the job is still the worker's. The reply, read
    with `step_replies`, says per job: TAKEN_AWAY, or whether a cancel was requested."""
    if not step:
        return
    script_keys = [keys.worker_jobs(worker_id)]
    args: list[str] = []
    for job_id, event in step:
        script_keys.append(keys.cancel(job_id))
        args += [job_id, keys.chunks(job_id), event]
    pipe.eval(_STEP, len(script_keys), *script_keys, *args)


def step_replies(raw: Iterable[Any]) -> list[int]:
    """The per-job replies of `queue_step`, in its order: TAKEN_AWAY, 1 (cancel requested) or 0."""
    return [int(r) for r in raw]


def put_back(redis: Redis, worker_id: str, model: str, job_ids: Iterable[str]) -> int:
    """Return claimed, never-started jobs to the front of their queue in their order, each only if this worker still
    holds it; how many went back."""
    ids = list(job_ids)
    if not ids:
        return 0
    return int(redis.eval(_PUT_BACK, 2, keys.rq_queue(model), keys.worker_jobs(worker_id), *ids))


def write_if_owned(
    redis: Redis,
    worker_id: str,
    job_id: str,
    write: Callable[[Pipeline], None],
    *,
    check: Callable[[Pipeline], Any] | None = None,
) -> Any:
    """Run the writes `write` queues in one MULTI/EXEC, only while `job_id` is in the worker's job table (WATCHed,
    so a sweeper that takes the job meanwhile aborts and re-checks). NotOwned when it is not.

    `check(pipe)`, run under the WATCH before the writes, may read more (immediate commands) and return a value to
    stop there: that value is returned and nothing is written. Otherwise returns None."""
    table = keys.worker_jobs(worker_id)
    with redis.pipeline() as pipe:
        for _ in range(_WATCH_ATTEMPTS):
            try:
                pipe.watch(table)
                if not pipe.hexists(table, job_id):
                    raise NotOwned(f"job {job_id} is no longer held by worker {worker_id}")
                if check is not None:
                    verdict = check(pipe)
                    if verdict is not None:
                        return verdict
                pipe.multi()
                write(pipe)
                pipe.execute()
                return None
            except WatchError:  # the table changed (a beat's EXPIRE, a sweeper): look again
                continue
    raise WatchError(f"job table of worker {worker_id} kept changing; could not write job {job_id}")
