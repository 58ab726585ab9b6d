"""The controller's own HTTP API: `/api/v1/...`, `/healthz`, `/readyz`."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from broker import images
from broker.admission import submit_for
from broker.context import ControllerContext
from broker.outage import ride_out_outage
from broker.streams import follow_job
from broker.validation import (
    BODY_ERRORS,
    IMAGE_ERRORS,
    IMAGE_PLACEHOLDER,
    JOB_ERRORS,
    READ_ERRORS,
    SSE_MEDIA_TYPE,
    documented_body,
    error_responses,
    sse_event_schema,
    stream_reply,
)
from contract import jobs
from contract.errors import JobNotFound, RedisUnavailable, RequestInvalid
from contract.limits import check_prompt_chars
from contract.messages import (
    DoneEvent,
    ErrorEvent,
    GenerateRequest,
    ImageMode,
    ImageUrlPart,
    JobImage,
    JobMessage,
    JobPart,
    JobRequest,
    JobText,
    JobView,
    QueuedEvent,
    StreamEvent,
    TextPart,
    TokenEvent,
    WorkerInfo,
)
from contract.replies import CancelReply, ModelInfo, ModelList, ServiceInfo, WorkerList

router = APIRouter()

READY_PING_TIMEOUT_S = 2.0


def context(request: Request) -> ControllerContext:
    return request.app.state.ctx


def image_limits(ctx: ControllerContext) -> images.ImageLimits:
    return images.ImageLimits.from_settings(ctx.settings)


def image_sources(body: GenerateRequest) -> list[tuple[str, str]]:
    """`(position, url)` of every image part, in message order, e.g. `("messages[0].content[1]", "data:...")`."""
    found = []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, ImageUrlPart):
                found.append((f"messages[{i}].content[{j}]", part.image_url.url))
    return found


def text_runs(body: GenerateRequest) -> list[tuple[str, str]]:
    """`(position, text)` of each run of adjacent text parts, joined as a chat template joins them, e.g.
    `("messages[0].content[1..2]", "<ima" + "ge>")`; a string content is one run."""
    runs = []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            runs.append((f"messages[{i}].content", message.content))
            continue
        run: list[tuple[int, str]] = []
        for j, part in enumerate([*message.content, None]):
            if isinstance(part, TextPart):
                run.append((j, part.text))
                continue
            if run:
                first, last = run[0][0], run[-1][0]
                span = f"{first}" if first == last else f"{first}..{last}"
                where = f"messages[{i}].content[{span}]"
                runs.append((where, "".join(text for _, text in run)))
                run = []
    return runs


def check_no_placeholder_text(body: GenerateRequest) -> None:
    """Text that is, or joins into, LLaVA's `<image>` would become an image token without an image: 422 naming it."""
    for where, text in text_runs(body):
        if IMAGE_PLACEHOLDER in text:
            raise RequestInvalid(
                [
                    {
                        "field": where,
                        "message": f"text contains (or its adjacent text parts join into) `{IMAGE_PLACEHOLDER}`, "
                        "which the model reads as an image; send images as image_url parts",
                    }
                ]
            )


def job_messages(body: GenerateRequest, digests: list[str]) -> list[JobMessage]:
    remaining = iter(digests)
    messages = []
    for message in body.messages:
        parts: list[JobPart] = []
        if isinstance(message.content, str):
            parts.append(JobText(text=message.content))
        else:
            for part in message.content:
                if isinstance(part, TextPart):
                    parts.append(JobText(text=part.text))
                else:
                    parts.append(JobImage(digest=next(remaining)))
        messages.append(JobMessage(role=message.role, content=parts))
    return messages


async def checked_images(ctx: ControllerContext, sources: list[tuple[str, str]]) -> list[images.CheckedImage]:
    """Decode and check images off the event loop, then store each once; raises the first image's error."""
    limits = image_limits(ctx)
    images.check_image_count(len(sources), limits)
    if not sources:
        return []
    checked = await anyio.to_thread.run_sync(images.check_images, sources, limits)
    await ride_out_outage(lambda: images.store_images(ctx.redis, checked), ctx.timings.redis_outage_s)
    return checked


async def require_live_model(ctx: ControllerContext, model: str, prompt_chars: int = 0) -> None:
    """ModelNotFound (404, naming the live models) when no worker serves `model`, NoWorker (503) when its workers
    are gone, PayloadTooLarge (413, naming the limit) when `prompt_chars` characters of prompt text could fit the
    context of none of them (`contract.limits`); Redis unreachable for longer than the outage allowance is a 503."""
    workers = await ride_out_outage(lambda: ctx.require_model(model), ctx.timings.redis_outage_s)
    contexts = [w.context_length for w in workers if w.context_length]
    if contexts and len(contexts) == len(workers):  # a worker of unknown context might take any prompt
        check_prompt_chars(prompt_chars, max(contexts), model)


def text_chars(body: GenerateRequest) -> int:
    """Characters of text in a generate request's messages (images left out)."""
    return sum(
        len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content if isinstance(p, TextPart))
        for m in body.messages
    )


def new_job_id() -> str:
    return uuid.uuid4().hex


async def prepare_job(ctx: ControllerContext, body: GenerateRequest) -> JobRequest:
    """Check a generate request's model and images (stored once each) and build its job; the one path shared by
    `POST /api/v1/generate` and `POST /v1/chat/completions`."""
    sources = image_sources(body)
    images.check_image_count(len(sources), image_limits(ctx))
    check_no_placeholder_text(body)
    await require_live_model(ctx, body.model, prompt_chars=text_chars(body))
    checked = await checked_images(ctx, sources)
    return JobRequest(
        job_id=new_job_id(),
        model=body.model,
        messages=job_messages(body, [image.digest for image in checked]),
        images=[image.digest for image in checked],
        params=body.model_dump(include={"temperature", "top_p", "max_new_tokens", "stop", "seed"}),
    )


def sse(event: StreamEvent) -> ServerSentEvent:
    return ServerSentEvent(data=event.model_dump_json(), event=event.type)


async def sse_events(events: AsyncIterator[StreamEvent]) -> AsyncIterator[ServerSentEvent]:
    async with contextlib.aclosing(events):  # close the follower now (cancelling its job), not at GC
        async for event in events:
            yield sse(event)


@router.post(
    "/api/v1/generate",
    response_class=EventSourceResponse,
    openapi_extra=documented_body(GenerateRequest),
    responses={
        **stream_reply(
            SSE_MEDIA_TYPE,
            "`queued`, `token`, then `done` or `error` events (`StreamEvent`)",
            schema=sse_event_schema([QueuedEvent, TokenEvent, DoneEvent, ErrorEvent]),
        ),
        **error_responses(*BODY_ERRORS, *IMAGE_ERRORS, *JOB_ERRORS),
    },
    summary="Generate a reply as a stream of server-sent events: queued, token, then done or error",
)
async def generate(request: Request) -> EventSourceResponse:
    ctx = context(request)
    body = await ctx.bodies.read(request, GenerateRequest)
    job = await prepare_job(ctx, body)
    sub = await submit_for(request, ctx, job)
    return EventSourceResponse(
        sse_events(follow_job(ctx, sub, job.model)),
        ping=ctx.settings.ping_interval_s,
        headers={"X-Job-Id": job.job_id},
    )


def shared_image_modes(workers: list[WorkerInfo]) -> list[ImageMode]:
    """The modes every one of `workers` supports, in `ImageMode` order (a worker that lists none supports all)."""
    return [m for m in ImageMode if all(w.image_modes is None or m in w.image_modes for w in workers)]


@router.get(
    "/api/v1/models",
    response_model=ModelList,
    responses=error_responses(*READ_ERRORS),
    summary="Models served by live workers",
)
async def list_models(request: Request) -> ModelList:
    ctx = context(request)
    serving = await ctx.serving(fresh=True)
    models = []
    for name, workers in serving.items():
        contexts = [w.context_length for w in workers if w.context_length]
        models.append(
            ModelInfo(
                name=name,
                workers=len(workers),
                queue_depth=await ctx.queue_depth(name),
                max_context=min(contexts) if contexts else None,
                image_modes=shared_image_modes(workers),
            )
        )
    return ModelList(models=models)


@router.get("/api/v1/info", response_model=ServiceInfo, summary="Whether conversations are recorded, and for how long")
async def service_info(request: Request) -> ServiceInfo:
    settings = context(request).settings
    logging = settings.log_conversations
    return ServiceInfo(
        conversation_log=logging,
        log_retention_days=settings.log_retention_days if logging else None,
        log_retention_entries=settings.log_retention_entries if logging else None,
        feedback_retention_days=settings.feedback_retention_days,
    )


@router.get(
    "/api/v1/workers", response_model=WorkerList, responses=error_responses(*READ_ERRORS), summary="Live workers"
)
async def list_workers(request: Request) -> WorkerList:
    return WorkerList(workers=await context(request).live_workers(fresh=True))


async def job_view(ctx: ControllerContext, job_id: str) -> JobView:
    view = await ctx.run_sync(jobs.view, ctx.redis_sync, job_id)
    if view is None:
        raise JobNotFound(f"job {job_id!r} not found (unknown, or its record expired)")
    return view


@router.get(
    "/api/v1/jobs/{job_id}",
    response_model=JobView,
    responses=error_responses(*READ_ERRORS, JobNotFound),
    summary="A job's status and, once final, its outcome",
)
async def get_job(job_id: str, request: Request) -> JobView:
    return await job_view(context(request), job_id)


@router.post(
    "/api/v1/jobs/{job_id}/cancel",
    response_model=CancelReply,
    responses=error_responses(*READ_ERRORS, JobNotFound),
    summary="Stop a queued or running job",
)
async def cancel_job(job_id: str, request: Request) -> CancelReply:
    ctx = context(request)
    view = await job_view(ctx, job_id)
    removed = False
    if view.outcome is None and view.model:
        removed = await ctx.run_sync(jobs.request_cancel, ctx.redis_sync, job_id, view.model)
        view = await job_view(ctx, job_id)
    return CancelReply(job_id=job_id, removed_from_queue=removed, job=view)


@router.get("/healthz", summary="200 while the process runs")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses=error_responses(RedisUnavailable),
    summary="200 when Redis answers and the relay is subscribed, else 503",
)
async def readyz(request: Request) -> JSONResponse:
    ctx = context(request)
    with anyio.move_on_after(READY_PING_TIMEOUT_S) as ping:
        await ctx.redis.ping()
    if ping.cancelled_caught:
        raise RedisUnavailable(f"Redis did not answer PING within {READY_PING_TIMEOUT_S:g} s; retry shortly")
    if not ctx.relay.connected:
        raise RedisUnavailable("Redis answers but the controller's subscription is not up yet; retry shortly")
    return JSONResponse({"status": "ready", "streams": ctx.relay.active_streams})
