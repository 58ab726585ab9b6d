"""Submitting a job and following it to its end: the events a client sees, whatever the wire format.

`submit_job` registers the job with the relay before enqueueing it (so no event can be published unheard);
`follow_job` yields its events until the final `done` or `error`, and never hangs: silence makes it read the job
record (a final outcome there ends the stream), and a job left queued with no live worker ends as `no_worker`.
A follower that is closed before the final event cancels the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import anyio

from broker import jobs
from broker.context import REDIS_ERRORS, ControllerContext, redis_unavailable
from broker.relay import Subscription
from contract.errors import LlavaError, NoWorker, QueueFull, RedisUnavailable
from contract.messages import (
    DoneEvent,
    ErrorEvent,
    FinishReason,
    JobOutcome,
    JobRequest,
    QueuedEvent,
    TokenEvent,
    parse_event,
)

log = logging.getLogger(__name__)

StreamEvent = QueuedEvent | TokenEvent | DoneEvent | ErrorEvent


async def submit_job(ctx: ControllerContext, request: JobRequest) -> Subscription:
    """Subscribe to the job's events, then enqueue it; QueueFull (429) and RedisUnavailable (503) propagate."""
    if not await ctx.relay.wait_connected(ctx.timings.relay_wait_s):
        raise RedisUnavailable("the controller's Redis subscription is down; retry shortly")
    sub = ctx.relay.register(request.job_id)
    try:
        await ctx.run_sync(
            jobs.enqueue,
            ctx.redis_sync,
            request,
            max_queue=ctx.settings.max_queue,
            result_ttl=ctx.settings.job_result_ttl_s,
        )
    except BaseException:
        sub.close()
        raise
    return sub


def event_from_outcome(outcome: JobOutcome) -> DoneEvent | ErrorEvent:
    """The final stream event a job record's outcome stands for (when its pub/sub message was lost)."""
    if outcome.error is not None:
        return outcome.error
    if outcome.status == "failed":
        return ErrorEvent(job_id=outcome.job_id, code="generation_failed", message="the job failed", text=outcome.text)
    reason = outcome.finish_reason or (FinishReason.cancelled if outcome.status == "canceled" else FinishReason.stop)
    return DoneEvent(
        job_id=outcome.job_id,
        finish_reason=reason,
        text=outcome.text,
        usage=outcome.usage,
        timings=outcome.timings,
    )


def error_event(job_id: str, error: LlavaError, text: str = "") -> ErrorEvent:
    return ErrorEvent(job_id=job_id, code=error.code, message=error.message, status_code=error.status_code, text=text)


class _JobFollower:
    def __init__(self, ctx: ControllerContext, sub: Subscription, model: str) -> None:
        self.ctx = ctx
        self.sub = sub
        self.job_id = sub.job_id
        self.model = model
        self.text = ""
        self.waiting = True  # still in the queue, as far as we know
        self.no_worker_since: float | None = None
        self.last_position: int | None = None
        self.redis_down_since: float | None = None

    async def first_position(self) -> QueuedEvent | None:
        position = await self.ctx.queue_position(self.model, self.job_id)
        if position is None:
            self.waiting = False
            return None
        self.last_position = position
        return QueuedEvent(job_id=self.job_id, position=position)

    async def check_queued(self) -> StreamEvent | None:
        """While queued: the position (re-sent each interval), and no_worker after too long without a worker."""
        position = await self.ctx.queue_position(self.model, self.job_id)
        if position is None:
            self.waiting = False
            return await self.check_record()
        if self.model in await self.ctx.serving():
            self.no_worker_since = None
        else:
            now = time.monotonic()
            self.no_worker_since = self.no_worker_since or now
            if now - self.no_worker_since >= self.ctx.timings.no_worker_timeout_s:
                left = await self.ctx.run_sync(jobs.request_cancel, self.ctx.redis_sync, self.job_id, self.model)
                if left:
                    waited = self.ctx.timings.no_worker_timeout_s
                    return error_event(
                        self.job_id,
                        NoWorker(
                            f"no live worker served model {self.model!r} for {waited:g} s while the job waited "
                            "in the queue; the job was removed from the queue"
                        ),
                    )
                return None  # a worker claimed it just now
        self.last_position = position
        return QueuedEvent(job_id=self.job_id, position=position)

    async def check_record(self) -> StreamEvent | None:
        """After silence (or a relay reconnect): a final outcome in the job record ends the stream."""
        view = await self.ctx.run_sync(jobs.view, self.ctx.redis_sync, self.job_id)
        if view is None:
            return ErrorEvent(
                job_id=self.job_id,
                code="job_not_found",
                message=f"job {self.job_id} disappeared from Redis before it finished (expired or deleted)",
                status_code=404,
                text=self.text,
            )
        if view.outcome is not None and view.status in {"finished", "failed", "canceled", "stopped"}:
            return event_from_outcome(view.outcome)
        if view.status in {"failed", "canceled", "stopped"}:
            return ErrorEvent(
                job_id=self.job_id,
                code="generation_failed",
                message=f"the job ended with status {view.status} and no outcome",
                text=self.text,
            )
        return None

    async def check(self) -> StreamEvent | None:
        """The queue or job-record check after silence; a Redis outage is ridden out up to `redis_outage_s`."""
        try:
            event = await (self.check_queued() if self.waiting else self.check_record())
            if event is None and self.sub.missed_messages():
                event = await self.check_record()
        except (RedisUnavailable, *REDIS_ERRORS) as exc:
            now = time.monotonic()
            self.redis_down_since = self.redis_down_since or now
            if now - self.redis_down_since >= self.ctx.timings.redis_outage_s:
                raise
            log.info("job %s: Redis unreachable (%s); still waiting", self.job_id, exc)
            return None
        self.redis_down_since = None
        return event

    async def events(self) -> AsyncIterator[StreamEvent]:
        timings = self.ctx.timings
        interval = self.ctx.settings.queued_update_interval_s
        first = await self.first_position()
        if first is not None:
            yield first
        while True:
            raw = await self.sub.get(interval if self.waiting else timings.stall_check_s)
            if raw is not None:
                try:
                    event = parse_event(raw)
                except ValueError:
                    log.warning("job %s: unreadable event dropped: %.200r", self.job_id, raw)
                    continue
                if isinstance(event, QueuedEvent):
                    continue  # positions come from the queue itself
                self.waiting = False
                if isinstance(event, TokenEvent):
                    self.text += event.text
                yield event
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    return
                continue
            event = await self.check()
            if event is not None:
                yield event
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    return


async def follow_job(ctx: ControllerContext, sub: Subscription, model: str) -> AsyncIterator[StreamEvent]:
    """Yield a job's events up to its final one; a Redis failure mid-stream becomes a final `error` event.
    Closing the iterator before the final event (client gone) cancels the job."""
    follower = _JobFollower(ctx, sub, model)
    observer = ctx.observe(model) if ctx.observe is not None else None
    finished = False
    try:
        try:
            async for event in follower.events():
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    finished = True
                if observer is not None:
                    observer.on_event(event)
                yield event
        except REDIS_ERRORS as exc:
            finished = True
            event = error_event(sub.job_id, redis_unavailable(exc), follower.text)
            if observer is not None:
                observer.on_event(event)
            yield event
        except RedisUnavailable as exc:
            finished = True
            event = error_event(sub.job_id, exc, follower.text)
            if observer is not None:
                observer.on_event(event)
            yield event
    finally:
        sub.close()
        if observer is not None:
            observer.close()
        if not finished:
            with anyio.CancelScope(shield=True):
                await cancel_quietly(ctx, sub.job_id, model)


async def cancel_quietly(ctx: ControllerContext, job_id: str, model: str) -> None:
    """Ask a job to stop because its client went away; logged, never raised (Redis may be down)."""
    try:
        with anyio.fail_after(5):
            await ctx.run_sync(jobs.request_cancel, ctx.redis_sync, job_id, model)
        log.info("job %s cancelled: its client went away", job_id)
    except Exception as exc:  # noqa: BLE001 - best effort; the worker's max_new_tokens bounds the waste
        log.warning("job %s: could not request cancel (%s)", job_id, exc)


__all__ = ["QueueFull", "StreamEvent", "event_from_outcome", "follow_job", "submit_job"]
