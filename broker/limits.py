"""Per-client limits kept in Redis, so that they hold across controller replicas: a fair share (jobs one client holds
queued or running at once) and rate limits (requests and generated tokens per minute, as token buckets).

A client is its API key's name (`key-` and the start of the key's sha256, never the key) when the controller
checks keys, else its address; for a trusted front end's key (`trusted_ui_keys`), the end user it names. Each check
is one Lua script, so that two replicas admitting at the same moment cannot both take the last slot; the scripts read
Redis' own clock, so replicas' clocks do not matter.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from broker.auth import ApiKeyCheck
from contract import keys
from contract.errors import RateLimited
from contract.identity import END_USER_HEADER, parse_end_user
from infra.settings import ControllerSettings

FAIR_SHARE_RETRY_AFTER_S = 5

# KEYS[1] the client's jobs ZSET; ARGV job id, cap, hold ms. Returns -1 when admitted, else the jobs held. A job
# already held (the same command sent again after its reply was lost) is admitted again, not counted twice.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return -1
"""

# KEYS[1] the job's charge mark (`keys.charged`), then the buckets (HASH level, at); ARGV[1] 'admit' or 'debit',
# ARGV[2] the mark's TTL in seconds, then per bucket: capacity per minute, need, cost.
# Admit: every bucket must hold `need`, else nothing is taken and {index of the bucket, ms to wait} comes back.
# Debit: `cost` is taken whatever the level (tokens are counted once generated; the level may go below zero).
# A charge whose mark is set was applied already (the same command sent again after its reply was lost): nothing
# is taken twice, and it answers as admitted, which it was.
_TAKE_TOKENS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local levels = {}
local blocked, wait_ms = 0, 0
for i = 2, #KEYS do
  local base = 3 + (i - 2) * 3
  local cap, need = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
  local state = redis.call('HMGET', KEYS[i], 'level', 'at')
  local level = tonumber(state[1]) or cap
  local at = tonumber(state[2]) or now
  level = math.min(cap, level + math.max(0, now - at) * cap / 60000)
  levels[i] = level
  if ARGV[1] == 'admit' and level < need then
    local wait = math.ceil((need - level) * 60000 / cap)
    if wait > wait_ms then blocked, wait_ms = i - 1, wait end
  end
end
if blocked > 0 then return {blocked, wait_ms} end
for i = 2, #KEYS do
  local base = 3 + (i - 2) * 3
  local cap = tonumber(ARGV[base])
  local level = levels[i] - tonumber(ARGV[base + 2])
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'at', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) * 60000 / cap) + 1000)
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
return {0, 0}
"""


def key_name(key: str) -> str:
    """The name an API key goes by in logs and limits: never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Client:
    """Who sent a request: the API key's name (when keys are checked), the address it came from, and the end user
    a trusted front end named (`contract.identity`)."""

    address: str
    key_name: str | None = None
    end_user: str | None = None

    @property
    def name(self) -> str:
        """What limits count by: the end user of a trusted front end's key, else the key's name, else the address."""
        if self.end_user is not None:
            return f"{self.key_name}:user:{self.end_user}"
        return self.key_name or self.address

    @classmethod
    def of(cls, request: Request, *, keys_checked: bool, trusted: ApiKeyCheck | None = None) -> Client:
        """The request's client. The end-user header counts only with a key `trusted` accepts (HeaderInvalid, 400,
        when it is malformed); from any other client it is ignored, so no one can spend another's share."""
        address = request.client.host if request.client else "unknown"
        if not keys_checked:  # an unchecked header could name anyone: count by address
            return cls(address=address)
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            return cls(address=address)
        end_user = None
        if trusted is not None and trusted.accepts(token):
            end_user = parse_end_user(request.headers.get(END_USER_HEADER))
        return cls(address=address, key_name=key_name(token), end_user=end_user)


class ClientLimits:
    """The fair share and the rate limits of `settings`; every method is a no-op for a limit that is off."""

    def __init__(self, redis: Any, settings: ControllerSettings) -> None:
        self.redis = redis  # redis.asyncio.Redis
        self.max_jobs = settings.max_jobs_per_client
        self.hold_ms = int(settings.client_job_hold_s * 1000)
        self.requests_per_minute = settings.rate_limit_requests_per_minute
        self.tokens_per_minute = settings.rate_limit_tokens_per_minute
        self._take_slot = redis.register_script(_TAKE_SLOT)
        self._take_tokens = redis.register_script(_TAKE_TOKENS)

    async def check_rate(self, client: str, job_id: str) -> None:
        """Take one request from the client's buckets for `job_id`; RateLimited (429, Retry-After) names the limit
        reached. The tokens bucket admits while any token is left (the reply's tokens are debited as it ends)."""
        buckets: list[tuple[str, str, int, int]] = []  # key, what it counts, per minute, cost now
        if self.requests_per_minute is not None:
            buckets.append((keys.rate_bucket(client, "requests"), "requests", self.requests_per_minute, 1))
        if self.tokens_per_minute is not None:
            buckets.append((keys.rate_bucket(client, "tokens"), "generated tokens", self.tokens_per_minute, 0))
        if not buckets:
            return
        args: list[object] = []
        for _, _, per_minute, cost in buckets:
            args += [per_minute, 1, cost]  # need one unit left in each
        blocked, wait_ms = await self._charge(job_id, "admit", [key for key, *_ in buckets], args)
        if int(blocked):
            _, what, per_minute, _ = buckets[int(blocked) - 1]
            wait_s = max(1, math.ceil(int(wait_ms) / 1000))
            raise RateLimited(
                f"rate limit reached: {per_minute} {what} per minute for client {client!r}; retry in {wait_s} s",
                retry_after=wait_s,
            )

    async def debit_tokens(self, client: str, job_id: str, tokens: int) -> None:
        """Count the `tokens` generated for `job_id` against its client's tokens per minute."""
        if self.tokens_per_minute is None or tokens <= 0:
            return
        await self._charge(job_id, "debit", [keys.rate_bucket(client, "tokens")], [self.tokens_per_minute, 0, tokens])

    async def _charge(self, job_id: str, kind: str, buckets: list[str], args: list[object]) -> list[int]:
        mark = keys.charged(job_id, kind)
        return await self._take_tokens(keys=[mark, *buckets], args=[kind, keys.CHARGED_TTL_S, *args])

    async def take_slot(self, client: str, job_id: str) -> None:
        """Count `job_id` against the client's jobs held at once; RateLimited (429) names the cap when it is full."""
        if self.max_jobs is None:
            return
        held = int(await self._take_slot(keys=[keys.client_jobs(client)], args=[job_id, self.max_jobs, self.hold_ms]))
        if held >= 0:
            raise RateLimited(
                f"too many jobs at once: client {client!r} holds {held} queued or running jobs, the cap per client "
                f"is {self.max_jobs} (max_jobs_per_client); retry when one has finished",
                retry_after=FAIR_SHARE_RETRY_AFTER_S,
            )

    async def release_slot(self, client: str, job_id: str) -> None:
        """The job ended (done, error, cancelled, client gone): it no longer counts against the client."""
        if self.max_jobs is None:
            return
        await self.redis.zrem(keys.client_jobs(client), job_id)
