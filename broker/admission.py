"""Admitting a job for a client, and what happens once its stream ends, whatever the endpoint.

`submit_for(request, job)` is what every generate route calls instead of `submit_job`: it checks the client's rate
limits, then moderation (when on), takes a slot of its fair share, then submits; refusals are counted in Redis.
Each of these steps rides out a Redis outage of up to the controller's allowance (`broker.outage`).
`broker.streams.follow_job` calls `ctx.on_job_end` when a stream ends (done, error, or its client gone), which here
releases the slot, counts the generated tokens, writes the conversation log entry and, for a cancelled or abandoned
job, releases its images at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from broker.auth import ApiKeyCheck
from broker.context import ControllerContext
from broker.convlog import ConversationLog
from broker.limits import Client, ClientLimits
from broker.moderation import moderators, user_texts
from broker.outage import ride_out_outage
from broker.relay import Subscription
from broker.streams import submit_job
from contract import keys
from contract.errors import ContentRefused, RateLimited
from contract.messages import DoneEvent, ErrorEvent, FinishReason, JobRequest, error_event
from infra.settings import ControllerSettings

log = logging.getLogger(__name__)

JOB_END_TIMEOUT_S = 5.0

# Delete each image whose TTL is still at most the upload's (ARGV[1] ms); a longer or no TTL means it is kept.
_RELEASE_IMAGES = """
local released = 0
for _, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl <= tonumber(ARGV[1]) then released = released + redis.call('DEL', key) end
end
return released
"""


@dataclass
class AdmittedJob:
    job: JobRequest
    client: Client
    endpoint: str
    admitted_at: float = field(default_factory=time.time)


class Admission:
    """Per controller process: the jobs it admitted and has not seen end (a stream ends on the replica that
    started it), the client limits, and the conversation log."""

    def __init__(
        self, redis: Any, settings: ControllerSettings, *, keys_checked: bool, trusted: ApiKeyCheck | None = None
    ) -> None:
        self.limits = ClientLimits(redis, settings)
        self.convlog = ConversationLog(redis, settings) if settings.log_conversations else None
        self.keys_checked = keys_checked
        self.trusted = trusted  # the keys whose end-user header counts
        self.moderators = moderators(settings)
        self.redis = redis
        self.running: dict[str, AdmittedJob] = {}
        self._release_images = redis.register_script(_RELEASE_IMAGES)

    async def admit(self, request: Request, job: JobRequest, outage_s: float) -> AdmittedJob:
        """Check the client's limits for `job` (RateLimited 429 names the one reached) and remember the job; each
        Redis step waits out an outage of up to `outage_s` seconds."""
        client = Client.of(request, keys_checked=self.keys_checked, trusted=self.trusted)
        admitted = AdmittedJob(job=job, client=client, endpoint=request.url.path)
        try:
            await ride_out_outage(lambda: self.limits.check_rate(client.name, job.job_id), outage_s)
            for moderator in self.moderators:
                await moderator.check(user_texts(job))
            await ride_out_outage(lambda: self.limits.take_slot(client.name, job.job_id), outage_s)
        except (RateLimited, ContentRefused) as exc:
            await self.refused(admitted, exc)
            raise
        self.running[job.job_id] = admitted
        return admitted

    async def refused(self, admitted: AdmittedJob, error: RateLimited | ContentRefused) -> None:
        """Count a refusal in Redis (for status and /metrics, across replicas); a moderated one is also logged."""
        try:
            await self.redis.hincrby(keys.refusals(), error.code, 1)
            if isinstance(error, ContentRefused):
                log.warning("job %s refused by moderation (client %s): %s", admitted.job.job_id, admitted.client.name,
                            error.message)  # fmt: skip
                if self.convlog is not None:
                    await self.convlog.write(admitted, error_event(admitted.job.job_id, error), "")
        except Exception as exc:  # noqa: BLE001 - the refusal stands; its bookkeeping is best effort
            log.warning("job %s: could not record its refusal (%s)", admitted.job.job_id, exc)

    async def withdraw(self, job_id: str) -> None:
        """A job admitted but never enqueued (queue full, Redis down): its slot is free again."""
        admitted = self.running.pop(job_id, None)
        if admitted is not None:
            await self.limits.release_slot(admitted.client.name, job_id)

    async def job_ended(self, job_id: str, final: DoneEvent | ErrorEvent | None, text: str) -> None:
        """A stream ended: `final` is its done or error event, None when its client went away (`text` so far)."""
        admitted = self.running.pop(job_id, None)
        if admitted is None:
            return
        client = admitted.client.name
        done = final if isinstance(final, DoneEvent) else None
        # In this order: the log raises its images' TTL before a cancelled job's images are released.
        steps: list[Callable[[], Awaitable[object]]] = []
        if self.convlog is not None:
            steps.append(lambda: self.convlog.write(admitted, final, text))
        if final is None or (done is not None and done.finish_reason == FinishReason.cancelled):
            steps.append(lambda: self.release_images(admitted.job))
        if done is not None:
            steps.append(lambda: self.limits.debit_tokens(client, job_id, done.usage.completion_tokens))
        steps.append(lambda: self.limits.release_slot(client, job_id))
        with anyio.CancelScope(shield=True), anyio.move_on_after(JOB_END_TIMEOUT_S):
            for step in steps:
                try:
                    await step()
                except Exception as exc:  # noqa: BLE001 - the client has its answer; the rest still runs
                    log.warning("job %s: end-of-job bookkeeping failed (%s)", job_id, exc)

    async def release_images(self, job: JobRequest) -> None:
        """Delete a cancelled or abandoned job's images at once, but not those still under the upload's TTL of
        another job of this controller, nor those a feedback entry or the conversation log keeps (their TTL was
        raised past the upload's, or removed)."""
        in_use = {digest for other in self.running.values() for digest in other.job.images}
        digests = [digest for digest in dict.fromkeys(job.images) if digest not in in_use]
        if digests:
            await self._release_images(keys=[keys.image(d) for d in digests], args=[keys.IMAGE_TTL_S * 1000])


def admission(request: Request) -> Admission:
    return request.app.state.admission


async def submit_for(request: Request, ctx: ControllerContext, job: JobRequest) -> Subscription:
    """Admit `job` for the request's client, then subscribe and enqueue it (`submit_job`); 429 when a limit is hit,
    503 when Redis stays unreachable for longer than the outage allowance."""
    gate = admission(request)
    outage_s = ctx.timings.redis_outage_s
    await gate.admit(request, job, outage_s)
    try:
        return await ride_out_outage(lambda: submit_job(ctx, job), outage_s)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await gate.withdraw(job.job_id)
        raise
