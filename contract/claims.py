"""Claiming jobs: a worker takes job ids off the front of its model's queue into its job table (`keys.worker_jobs`),
atomically, in one Lua script per claim, and reads the requests of what it took.

A claim's reply can be lost (Redis ran the script, the connection dropped, or redis-py sent it again and the worker
heard only the second run): every claim script also returns the ids the table already held as claimed, and the
worker puts back the ones it does not hold. A blocking claim moves one id into the worker's inbox first
(`keys.worker_inbox`), so that an id in flight is never only in a lost reply either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from redis import Redis
from redis.client import Pipeline
from rq.job import Job
from rq.serializers import JSONSerializer

from contract import keys, ownership
from contract.jobs import job_request, text_of
from contract.messages import ClaimState, JobRequest

# Both claim scripts reply {ids taken, ids the job table (KEYS[2]) held as claimed before}: the second list is how
# a worker finds the jobs of a claim whose reply it lost (see `Claimed`). `state` is the claimed state.
_EARLIER_CLAIMS = """
local function earlier_claims(state)
  local earlier, fields = {}, redis.call('HGETALL', KEYS[2])
  for i = 1, #fields, 2 do
    if fields[i + 1] == state then earlier[#earlier + 1] = fields[i] end
  end
  return earlier
end
"""

_CLAIM = (
    _EARLIER_CLAIMS
    + """
local earlier = earlier_claims(ARGV[2])
local ids = {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  redis.call('HSET', KEYS[2], id, ARGV[2])
  ids[#ids + 1] = id
end
if #ids > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return {ids, earlier}
"""
)

# Moves every id a blocking claim left in the inbox into the job table, so a lost reply never strands a job.
_TAKE_INBOX = (
    _EARLIER_CLAIMS
    + """
local earlier = earlier_claims(ARGV[1])
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('HSET', KEYS[2], id, ARGV[1])
end
if #ids > 0 then
  redis.call('DEL', KEYS[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return {ids, earlier}
"""
)


@dataclass
class Claimed:
    """What a claim took, and `earlier`: the ids the worker's job table held as claimed before it. Among those, the
    ones the worker does not hold come from a claim whose reply it never got (Redis ran it, the connection dropped,
    or the client sent it again and heard only the second run); the worker puts them back."""

    requests: list[JobRequest] = field(default_factory=list)
    earlier: list[str] = field(default_factory=list)


def queue_claim(pipe: Pipeline, worker_id: str, model: str, n: int) -> None:
    """Queue, on the caller's pipeline, an atomic take of up to `n` jobs off the front of a model's queue into the
    worker's job table; read its reply with `claim_reply`. Lets a busy worker claim in the same round trip as it
    publishes a decode step."""
    claim_keys = (keys.rq_queue(model), keys.worker_jobs(worker_id))
    pipe.eval(_CLAIM, 2, *claim_keys, n, ClaimState.claimed.value, keys.WORKER_JOBS_TTL_S)


def claim_reply(raw: Sequence[Iterable[bytes | str]]) -> tuple[list[str], list[str]]:
    """(ids taken, ids held as claimed before) from the reply of a claim script (`queue_claim`)."""
    taken, earlier = raw
    return [text_of(i) for i in taken], [text_of(i) for i in earlier]


def claim(redis: Redis, worker_id: str, model: str, n: int) -> list[JobRequest]:
    """Atomically take up to `n` jobs off the front of a model's queue into the worker's job table."""
    return _claim(redis, worker_id, model, n).requests


def _claim(redis: Redis, worker_id: str, model: str, n: int) -> Claimed:
    if n <= 0:
        return Claimed()
    with redis.pipeline(transaction=False) as pipe:
        queue_claim(pipe, worker_id, model, n)
        (raw,) = pipe.execute()
    ids, earlier = claim_reply(raw)
    return Claimed(claimed_requests(redis, worker_id, ids), earlier)


def claimed_requests(redis: Redis, worker_id: str, raw_ids: Iterable[bytes | str]) -> list[JobRequest]:
    """The requests of jobs just claimed (ids as the claim script returned them); vanished jobs are dropped."""
    ids = [i.decode() if isinstance(i, bytes) else i for i in raw_ids]
    if not ids:
        return []
    requests = []
    for job_id, job in zip(ids, Job.fetch_many(ids, connection=redis, serializer=JSONSerializer), strict=True):
        if job is None:  # deleted while queued
            redis.hdel(keys.worker_jobs(worker_id), job_id)
            continue
        requests.append(job_request(job))
    return requests


def take_inbox(redis: Redis, worker_id: str) -> list[JobRequest]:
    """Atomically move the job ids in a worker's inbox (left by `claim_blocking`) into its job table."""
    return _take_inbox(redis, worker_id).requests


def _take_inbox(redis: Redis, worker_id: str) -> Claimed:
    raw = redis.eval(
        _TAKE_INBOX,
        2,
        keys.worker_inbox(worker_id),
        keys.worker_jobs(worker_id),
        ClaimState.claimed.value,
        keys.WORKER_JOBS_TTL_S,
    )
    ids, earlier = claim_reply(raw)
    return Claimed(claimed_requests(redis, worker_id, ids), earlier)


def claim_blocking(redis: Redis, worker_id: str, model: str, n: int, timeout_s: float) -> Claimed:
    """Wait up to `timeout_s` seconds for a job (BLMOVE into the worker's inbox), then take up to `n` jobs in all.

    Ids left in the inbox by an earlier call whose reply was lost are taken first."""
    if n <= 0:
        return Claimed()
    claimed = _take_inbox(redis, worker_id)
    if not claimed.requests:
        moved = redis.blmove(keys.rq_queue(model), keys.worker_inbox(worker_id), timeout_s, "LEFT", "RIGHT")
        if moved is None:
            return claimed
        claimed = _merged(claimed, _take_inbox(redis, worker_id))
    if len(claimed.requests) < n:
        claimed = _merged(claimed, _claim(redis, worker_id, model, n - len(claimed.requests)))
    return claimed


def _merged(first: Claimed, then: Claimed) -> Claimed:
    earlier = list(dict.fromkeys([*first.earlier, *then.earlier]))
    return Claimed([*first.requests, *then.requests], earlier)


def put_back(redis: Redis, worker_id: str, model: str, job_ids: Iterable[str]) -> int:
    """Return claimed, never-started jobs to the front of their queue, in their original order; only those the
    worker still holds (a job a sweeper requeued meanwhile is not queued twice). How many went back."""
    return ownership.put_back(redis, worker_id, model, job_ids)
