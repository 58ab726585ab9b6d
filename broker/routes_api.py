"""The controller's own HTTP API: `/api/v1/...`, `/healthz`, `/readyz`."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from broker import images, jobs
from broker.context import REDIS_ERRORS, ControllerContext, redis_unavailable
from broker.streams import StreamEvent, follow_job, submit_job
from broker.validation import documented_body, read_model
from contract.errors import JobNotFound, RedisUnavailable
from contract.messages import (
    GenerateRequest,
    ImageUrlPart,
    JobImage,
    JobMessage,
    JobPart,
    JobRequest,
    JobText,
    JobView,
    TextPart,
    WorkerInfo,
)

router = APIRouter()


class ModelInfo(BaseModel):
    name: str
    workers: int
    queue_depth: int
    max_context: int | None = None


class ModelList(BaseModel):
    models: list[ModelInfo]


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


class CancelReply(BaseModel):
    job_id: str
    removed_from_queue: bool
    job: JobView


def context(request: Request) -> ControllerContext:
    return request.app.state.ctx


def image_limits(ctx: ControllerContext) -> images.ImageLimits:
    s = ctx.settings
    return images.ImageLimits(
        max_images=s.max_images, max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels
    )


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
    try:
        await images.store_images(ctx.redis, checked)
    except REDIS_ERRORS as exc:
        raise redis_unavailable(exc) from exc
    return checked


async def require_live_model(ctx: ControllerContext, model: str) -> None:
    """ModelNotFound (404, naming the live models) when no worker serves `model`; 503 when Redis does not answer."""
    try:
        await ctx.require_model(model)
    except REDIS_ERRORS as exc:
        raise redis_unavailable(exc) from exc


def new_job_id() -> str:
    return uuid.uuid4().hex


async def prepare_job(ctx: ControllerContext, body: GenerateRequest) -> JobRequest:
    """Check a generate request's model and images (stored once each) and build its job; the one path shared by
    `POST /api/v1/generate` and `POST /v1/chat/completions`."""
    sources = image_sources(body)
    images.check_image_count(len(sources), image_limits(ctx))
    await require_live_model(ctx, body.model)
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
    summary="Generate a reply as a stream of server-sent events: queued, token, then done or error",
)
async def generate(request: Request) -> EventSourceResponse:
    ctx = context(request)
    body = await read_model(request, GenerateRequest, ctx.settings.max_body_bytes)
    job = await prepare_job(ctx, body)
    sub = await submit_job(ctx, job)
    return EventSourceResponse(
        sse_events(follow_job(ctx, sub, job.model)),
        ping=ctx.settings.ping_interval_s,
        headers={"X-Job-Id": job.job_id},
    )


@router.get("/api/v1/models", response_model=ModelList, summary="Models served by live workers")
async def list_models(request: Request) -> ModelList:
    ctx = context(request)
    try:
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
                )
            )
    except REDIS_ERRORS as exc:
        raise redis_unavailable(exc) from exc
    return ModelList(models=models)


@router.get("/api/v1/workers", response_model=WorkerList, summary="Live workers")
async def list_workers(request: Request) -> WorkerList:
    try:
        return WorkerList(workers=await context(request).live_workers(fresh=True))
    except REDIS_ERRORS as exc:
        raise redis_unavailable(exc) from exc


async def job_view(ctx: ControllerContext, job_id: str) -> JobView:
    view = await ctx.run_sync(jobs.view, ctx.redis_sync, job_id)
    if view is None:
        raise JobNotFound(f"job {job_id!r} not found (unknown, or its record expired)")
    return view


@router.get("/api/v1/jobs/{job_id}", response_model=JobView, summary="A job's status and, once final, its outcome")
async def get_job(job_id: str, request: Request) -> JobView:
    return await job_view(context(request), job_id)


@router.post("/api/v1/jobs/{job_id}/cancel", response_model=CancelReply, summary="Stop a queued or running job")
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


@router.get("/readyz", summary="200 when Redis answers and the relay is subscribed, else 503")
async def readyz(request: Request) -> JSONResponse:
    ctx = context(request)
    try:
        with anyio.fail_after(2):
            await ctx.redis.ping()
    except (TimeoutError, *REDIS_ERRORS) as exc:
        raise redis_unavailable(exc) from exc
    if not ctx.relay.connected:
        raise RedisUnavailable("Redis answers but the controller's subscription is not up yet; retry shortly")
    return JSONResponse({"status": "ready", "streams": ctx.relay.active_streams})
