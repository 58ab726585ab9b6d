"""Submitting a job and following it to its end: the events a client sees, whatever the wire format.

`submit_job` subscribes to the job's channel (confirmed by Redis) before enqueueing it, so no event can be
published unheard; `follow_job` yields its events until the final `done` or `error`, and never hangs. Its first
event is always `queued` (the client learns the job id at once); silence makes it read the job record (a final
outcome there ends the stream, and a job requeued from a dead worker goes back to `queued` events); a job left
queued with no live worker ends as `no_worker`; until the first text, each silent interval gives a `queued` event
(position 0 once claimed), which keeps every wire's client reading. Token events lost across a relay reconnect
are made up from the final text. A follower that is closed before the final event cancels the job. A Redis outage
pauses the stream for up to the outage allowance, measured from the last time Redis answered (a read, or an event
heard).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import anyio

from broker.context import REDIS_ERRORS, ControllerContext, redis_unavailable
from broker.outage import OutageClock
from broker.relay import Subscription
from contract import jobs
from contract.errors import ErrorCode, NoWorker, QueueFull, RedisUnavailable
from contract.messages import (
    DoneEvent,
    ErrorEvent,
    FinishReason,
    JobOutcome,
    JobRequest,
    QueuedEvent,
    StreamEvent,
    TokenEvent,
    error_event,
    parse_event,
)

log = logging.getLogger(__name__)


async def submit_job(ctx: ControllerContext, request: JobRequest) -> Subscription:
    """Subscribe to the job's events, then enqueue it; QueueFull (429) and RedisUnavailable (503) propagate."""
    request = request.model_copy(update={"controller_id": ctx.controller_id})
    sub = ctx.relay.register(request.job_id)
    try:
        if not await sub.wait_subscribed(ctx.timings.relay_wait_s):
            raise RedisUnavailable("the controller's Redis subscription is down; retry shortly")
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
        return ErrorEvent(
            job_id=outcome.job_id, code=ErrorCode.generation_failed, message="the job failed", text=outcome.text
        )
    reason = outcome.finish_reason or (FinishReason.cancelled if outcome.status == "canceled" else FinishReason.stop)
    return DoneEvent(
        job_id=outcome.job_id,
        finish_reason=reason,
        text=outcome.text,
        usage=outcome.usage,
        timings=outcome.timings,
    )


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
        self.outage = OutageClock(ctx.timings.redis_outage_s)
        self.last_seq = 0  # of the latest token event heard
        self.sent_seq = 0  # of the latest token event the client got
        self.gap = False  # a token event was lost: later ones are held back until the final event

    async def first_position(self) -> QueuedEvent:
        """The first event of every stream, so that its client learns the job id at once (to Stop it): the
        position in the queue, or 0 when a worker has already claimed the job (or Redis is unreachable: the
        outage is ridden out as after any other read)."""
        try:
            position = await self.ctx.queue_position(self.model, self.job_id)
        except (RedisUnavailable, *REDIS_ERRORS) as exc:
            self.outage.failed(exc)
            log.info("job %s: Redis unreachable (%s); still waiting", self.job_id, exc)
            return QueuedEvent(job_id=self.job_id, position=0)
        self.outage.answered()
        if position is None:
            self.waiting = False
            return QueuedEvent(job_id=self.job_id, position=0)
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
                code=ErrorCode.job_not_found,
                message=f"job {self.job_id} disappeared from Redis before it finished (expired or deleted)",
                status_code=404,
                text=self.text,
            )
        if view.status == "queued" and view.position is not None:
            # Back in the queue (the sweeper requeued it from a frozen or dead worker): positions and the
            # no-worker timeout apply again.
            self.waiting = True
            self.no_worker_since = None
            self.last_position = view.position
            return QueuedEvent(job_id=self.job_id, position=view.position)
        if view.outcome is not None and view.status in {"finished", "failed", "canceled", "stopped"}:
            return event_from_outcome(view.outcome)
        if view.status in {"failed", "canceled", "stopped"}:
            return ErrorEvent(
                job_id=self.job_id,
                code=ErrorCode.generation_failed,
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
            self.outage.failed(exc)
            log.info("job %s: Redis unreachable (%s); still waiting", self.job_id, exc)
            return None
        self.outage.answered()
        return event

    def take_token(self, event: TokenEvent) -> bool:
        """Whether a token event goes to the client now. After a gap in `seq` (events lost across a relay
        reconnect, or dropped for a stalled client) later text would come out of order: it is held back, and the
        final event's whole text makes up for it (`catch_up`)."""
        if event.seq and event.seq <= self.last_seq:
            return False  # heard twice
        if event.seq and event.seq != self.last_seq + 1:
            self.gap = True
        self.last_seq = max(self.last_seq, event.seq)
        if self.gap:
            return False
        self.text += event.text
        self.sent_seq = event.seq
        return True

    def catch_up(self, final: DoneEvent | ErrorEvent) -> TokenEvent | None:
        """The text the client missed, from the final event (or the job record it was read from), as one token
        event before it: the client's tokens then add up to the final text."""
        if len(final.text) > len(self.text) and final.text.startswith(self.text):
            missed = final.text[len(self.text) :]
            self.text = final.text
            self.sent_seq += 1  # the client's seq stay 1, 2, 3, ...
            return TokenEvent(job_id=self.job_id, text=missed, seq=self.sent_seq)
        return None

    async def events(self) -> AsyncIterator[StreamEvent]:
        async with contextlib.aclosing(self._events()) as events:
            async for event in events:
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    missed = self.catch_up(event)
                    if missed is not None:
                        yield missed
                yield event

    def keepalive(self) -> QueuedEvent | None:
        """While the job has made no text yet: its last known position (0 once claimed), sent after each silent
        interval whatever the reason (a long prefill, a frozen worker not yet swept, a Redis outage), so that every
        wire can keep its client reading (LLaVA's clients give up after 10 s without a byte)."""
        if self.last_seq:
            return None
        position = self.last_position if self.waiting and self.last_position is not None else 0
        return QueuedEvent(job_id=self.job_id, position=position)

    async def _events(self) -> AsyncIterator[StreamEvent]:
        timings = self.ctx.timings
        interval = self.ctx.settings.queued_update_interval_s
        yield await self.first_position()
        heard_at = time.monotonic()  # of the last event heard or record check made
        while True:
            if self.waiting:
                wait_s = interval
            elif not self.last_seq:  # claimed, no text yet: keepalives at the queue's pace, checks as usual
                wait_s = min(interval, timings.stall_check_s)
            else:
                wait_s = timings.stall_check_s
            raw = await self.sub.get(wait_s)
            if raw is not None:
                self.outage.answered()  # Redis answered (through the relay): any outage is over
                try:
                    event = parse_event(raw)
                except ValueError:
                    log.warning("job %s: unreadable event dropped: %.200r", self.job_id, raw)
                    continue
                if isinstance(event, QueuedEvent):
                    continue  # positions come from the queue itself
                heard_at = time.monotonic()
                self.waiting = False
                if isinstance(event, TokenEvent) and not self.take_token(event):
                    continue
                yield event
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    return
                continue
            event = None
            if self.waiting or time.monotonic() - heard_at >= timings.stall_check_s:
                heard_at = time.monotonic()
                event = await self.check()
            event = event or self.keepalive()
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
    final: DoneEvent | ErrorEvent | None = None
    try:
        try:
            events = follower.events()
            if ctx.screen_reply is not None:  # reply moderation (`broker.moderation.ReplyModeration.screen`)
                events = ctx.screen_reply(events, sub.job_id, model)
            async for event in events:
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    finished = True
                    final = event
                if observer is not None:
                    observer.on_event(event)
                yield event
        except REDIS_ERRORS as exc:
            finished = True
            event = final = error_event(sub.job_id, redis_unavailable(exc), follower.text)
            if observer is not None:
                observer.on_event(event)
            yield event
        except RedisUnavailable as exc:
            finished = True
            event = final = error_event(sub.job_id, exc, follower.text)
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
        if ctx.on_job_end is not None:  # limits and the conversation log: every endpoint's stream ends here
            with anyio.CancelScope(shield=True):
                await ctx.on_job_end(sub.job_id, final, follower.text)


async def cancel_quietly(ctx: ControllerContext, job_id: str, model: str) -> None:
    """Ask a job to stop because its client went away; logged, never raised (Redis may be down)."""
    try:
        with anyio.fail_after(5):
            await ctx.run_sync(jobs.request_cancel, ctx.redis_sync, job_id, model)
        log.info("job %s cancelled: its client went away", job_id)
    except Exception as exc:  # noqa: BLE001 - best effort; the worker's max_new_tokens bounds the waste
        log.warning("job %s: could not request cancel (%s)", job_id, exc)


__all__ = ["QueueFull", "StreamEvent", "event_from_outcome", "follow_job", "submit_job"]
