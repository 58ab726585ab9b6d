"""Admitting a job for a client, and what happens once its stream ends, whatever the endpoint.

`submit_for(request, job)` is what every generate route calls instead of `submit_job`: it checks the client's rate
limits, takes a slot of its fair share, then submits. `broker.streams.follow_job` calls `ctx.on_job_end` when a
stream ends (done, error, or its client gone), which here releases the slot, counts the generated tokens and writes
the conversation log entry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from broker.context import ControllerContext
from broker.convlog import ConversationLog
from broker.limits import Client, ClientLimits
from broker.relay import Subscription
from broker.streams import submit_job
from contract.messages import DoneEvent, ErrorEvent, JobRequest

log = logging.getLogger(__name__)

JOB_END_TIMEOUT_S = 5.0


@dataclass
class AdmittedJob:
    job: JobRequest
    client: Client
    endpoint: str
    admitted_at: float = field(default_factory=time.time)


class Admission:
    """Per controller process: the jobs it admitted and has not seen end (a stream ends on the replica that
    started it), the client limits, and the conversation log."""

    def __init__(self, redis: Any, ctx_settings: Any, *, keys_checked: bool) -> None:
        self.limits = ClientLimits(redis, ctx_settings)
        self.convlog = ConversationLog(redis, ctx_settings) if ctx_settings.log_conversations else None
        self.keys_checked = keys_checked
        self.running: dict[str, AdmittedJob] = {}

    async def admit(self, request: Request, job: JobRequest) -> AdmittedJob:
        """Check the client's limits for `job` (RateLimited 429 names the one reached) and remember the job."""
        client = Client.of(request, keys_checked=self.keys_checked)
        await self.limits.check_rate(client.name)
        await self.limits.take_slot(client.name, job.job_id)
        admitted = AdmittedJob(job=job, client=client, endpoint=request.url.path)
        self.running[job.job_id] = admitted
        return admitted

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
        with anyio.CancelScope(shield=True), anyio.move_on_after(JOB_END_TIMEOUT_S):
            try:
                await self.limits.release_slot(admitted.client.name, job_id)
                if isinstance(final, DoneEvent):
                    await self.limits.debit_tokens(admitted.client.name, final.usage.completion_tokens)
                if self.convlog is not None:
                    await self.convlog.write(admitted, final, text)
            except Exception as exc:  # noqa: BLE001 - the client has its answer; a lost log line is only logged
                log.warning("job %s: end-of-job bookkeeping failed (%s)", job_id, exc)


def admission(request: Request) -> Admission:
    return request.app.state.admission


async def submit_for(request: Request, ctx: ControllerContext, job: JobRequest) -> Subscription:
    """Admit `job` for the request's client, then subscribe and enqueue it (`submit_job`); 429 when a limit is hit."""
    gate = admission(request)
    await gate.admit(request, job)
    try:
        return await submit_job(ctx, job)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await gate.withdraw(job.job_id)
        raise
