"""LLaVA's controller and worker wire format, so that existing LLaVA clients work unchanged.

`/get_worker_address` answers with this controller's own URL, so clients stream `/worker_generate_stream` through
it; that stream keeps LLaVA's format: NUL-terminated JSON chunks `{"text": prompt + text so far, "error_code"}`,
and a bare NUL every few seconds while a job waits for its first text (LLaVA's clients skip empty pieces).
Errors carry a real message and LLaVA's numeric code (`contract.errors.llava_wire_code`: 1 request or generation
error, 2 no worker, 3 Redis/network), plus our stable `error.code`; the app's error handler renders errors raised
before the stream starts (`llava_error_response`), `llava_chunks` those that end it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from broker import images
from broker.admission import submit_for
from broker.context import ControllerContext
from broker.routes_api import checked_images, context, image_limits, new_job_id, require_live_model
from broker.streams import follow_job
from broker.validation import (
    BODY_ERRORS,
    IMAGE_ERRORS,
    IMAGE_PLACEHOLDER,
    JOB_ERRORS,
    LLAVA_STREAM_MEDIA_TYPE,
    READ_ERRORS,
    documented_body,
    error_responses,
    require_prompt,
    stream_reply,
)
from contract.errors import EndpointGone, InvalidRequest, LlavaError, LlavaWireCode, Unauthorized, llava_wire_code
from contract.messages import (
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    DoneEvent,
    ErrorEvent,
    JobRequest,
    QueuedEvent,
    StreamEvent,
    TokenEvent,
)

router = APIRouter(tags=["LLaVA compatibility"])

LLAVA_STREAM_PATH = "/worker_generate_stream"


class LlavaGenerateBody(BaseModel):
    """LLaVA's `/worker_generate_stream` body; LLaVA's defaults, our range checks."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str
    images: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="0 means greedy, as temperature 0 (LLaVA's worker then keeps only the most likely token)",
    )
    max_new_tokens: int = Field(
        default=256,
        ge=0,
        le=MAX_NEW_TOKENS,
        description="0 generates nothing: after the request's checks, one chunk with the prompt alone, at once "
        "(LLaVA's worker too ends without generating)",
    )
    stop: str | None = Field(default=None, min_length=1, description="a stop string (not empty); none: no stop")

    def job_params(self) -> dict[str, object]:
        """The job's sampling params, top_p 0 as greedy decoding; only for max_new_tokens of 1 or more."""
        greedy = self.top_p == 0
        return {
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "stop": self.stop,
        }


class ModelName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


def chunk(text: str, error_code: int = LlavaWireCode.ok, **extra: object) -> bytes:
    return json.dumps({"text": text, "error_code": int(error_code), **extra}).encode() + b"\0"


# A tag-like word (`<image>`, `</s>`) not already in backticks. LLaVA's Gradio page renders a chunk's text as
# Markdown and drops HTML tags, so the word would vanish (gradio-app/gradio#7198); a code span shows it.
_TAG_LIKE = re.compile(r"(?<!`)</?[A-Za-z_|][^<>\s`]*>(?!`)")


def quote_tags(text: str) -> str:
    """`text` with each bare tag-like word put in backticks, so that a Markdown page shows it."""
    return _TAG_LIKE.sub(lambda match: f"`{match.group(0)}`", text)


def error_chunk(code: str, message: str) -> bytes:
    """LLaVA's error chunk: the message as its text (tags quoted for LLaVA's page), LLaVA's numeric code, and our
    code and unchanged message as `error`."""
    return chunk(quote_tags(message), llava_wire_code(code), error={"code": code, "message": message})


def llava_error_response(error: LlavaError) -> Response:
    """An error raised before LLaVA's stream starts: one error chunk, with the error's HTTP status."""
    return Response(
        error_chunk(error.code, error.message),
        status_code=error.status_code,
        headers=error.headers or None,
        media_type="application/octet-stream",
    )


class _DisconnectAwareStream(StreamingResponse):
    # Starlette skips its disconnect listener under ASGI spec 2.4; without it a queued job's stream would only
    # notice a vanished client on its next write. Keep the listener, so a disconnect cancels the job at once.
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asgi = {**scope.get("asgi", {}), "spec_version": "2.3"}
        await super().__call__({**scope, "asgi": asgi}, receive, send)


# LLaVA's clients read with a 10 s timeout and skip empty pieces: while a job waits for its first text, a bare
# separator at most this often keeps them reading.
KEEPALIVE_S = 5.0


async def llava_chunks(
    prompt: str, events: AsyncIterator[StreamEvent], keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[bytes]:
    """LLaVA's chunks for `events`; while the job waits for its first text, a bare NUL at most every
    `keepalive_s` (the stream's `queued` updates, which LLaVA's format has no place for, pace it)."""
    generated = ""
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    async for event in events:
        if isinstance(event, QueuedEvent):
            if not generated and loop.time() - last_sent >= keepalive_s:
                yield b"\0"
                last_sent = loop.time()
        elif isinstance(event, TokenEvent):
            generated += event.text
            yield chunk(prompt + generated)
        elif isinstance(event, DoneEvent):
            if event.text and event.text != generated:  # tokens lost in a Redis blip: send the whole text
                yield chunk(prompt + event.text)
            return
        elif isinstance(event, ErrorEvent):
            yield error_chunk(event.code, event.message)
            return


async def _start_llava_job(ctx: ControllerContext, request: Request) -> tuple[LlavaGenerateBody, JobRequest | None]:
    """The checked body and its job; no job (nothing stored or queued) when `max_new_tokens` is 0."""
    body = await ctx.bodies.read(request, LlavaGenerateBody)
    require_prompt(body.prompt)
    sent = body.images or []
    placeholders = body.prompt.count(IMAGE_PLACEHOLDER)
    if placeholders != len(sent):
        raise InvalidRequest(
            f"prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(sent)} image(s) were sent; "
            f"each image needs exactly one {IMAGE_PLACEHOLDER} in the prompt"
        )
    await require_live_model(ctx, body.model, prompt_chars=len(body.prompt))
    sources = [(f"images[{i}]", value) for i, value in enumerate(sent)]
    if body.max_new_tokens == 0:
        limits = image_limits(ctx)
        images.check_image_count(len(sources), limits)
        await anyio.to_thread.run_sync(images.check_images, sources, limits)
        return body, None
    checked = await checked_images(ctx, sources)
    job = JobRequest(
        job_id=new_job_id(),
        model=body.model,
        prompt=body.prompt,
        images=[image.digest for image in checked],
        params=body.job_params(),
    )
    return body, job


@router.post(
    LLAVA_STREAM_PATH,
    response_class=Response,  # the route returns its own responses: only `responses=` below documents them
    summary="LLaVA: stream NUL-delimited JSON chunks of prompt + text",
    openapi_extra=documented_body(LlavaGenerateBody),
    responses={
        **stream_reply(LLAVA_STREAM_MEDIA_TYPE, "NUL-terminated JSON chunks `{text, error_code}`, LLaVA's stream"),
        **error_responses(*BODY_ERRORS, *IMAGE_ERRORS, *JOB_ERRORS, media_type=LLAVA_STREAM_MEDIA_TYPE),
    },
)
async def worker_generate_stream(request: Request) -> Response:
    ctx = context(request)
    body, job = await _start_llava_job(ctx, request)
    if job is None:  # max_new_tokens 0: the reply is empty and complete
        return Response(chunk(body.prompt), media_type="application/octet-stream")
    sub = await submit_for(request, ctx, job)
    return _DisconnectAwareStream(
        llava_chunks(body.prompt, follow_job(ctx, sub, job.model)),
        media_type="application/octet-stream",
        headers={"X-Job-Id": job.job_id},
    )


@router.post("/list_models", responses=error_responses(*READ_ERRORS), summary="LLaVA: models served by live workers")
async def list_models(request: Request) -> dict[str, list[str]]:
    return {"models": list(await context(request).serving(fresh=True))}


@router.post(
    "/get_worker_address",
    openapi_extra=documented_body(ModelName),
    responses=error_responses(*BODY_ERRORS),
    summary="LLaVA: where to stream from (this controller), or '' if no worker",
)
async def get_worker_address(request: Request) -> dict[str, str]:
    ctx = context(request)
    body = await ctx.bodies.read(request, ModelName)
    if body.model not in await ctx.serving(fresh=True):
        return {"address": ""}
    address = ctx.settings.public_url or str(request.base_url)
    return {"address": address.rstrip("/")}


@router.post(
    "/worker_get_status",
    responses=error_responses(*READ_ERRORS),
    summary="LLaVA: models, speed and queue length summed over live workers",
)
async def worker_get_status(request: Request) -> dict[str, object]:
    ctx = context(request)
    serving = await ctx.serving(fresh=True)
    workers = {w.worker_id: w for infos in serving.values() for w in infos}
    queued = 0
    for model in serving:
        queued += await ctx.queue_depth(model)
    return {
        "model_names": list(serving),
        "speed": len(workers),
        "queue_length": queued + sum(w.busy_slots for w in workers.values()),
    }


@router.post(
    "/refresh_all_workers",
    responses=error_responses(Unauthorized),
    summary="LLaVA: no-op; liveness comes from Redis keys",
)
async def refresh_all_workers() -> None:
    return None


_JOIN_HINT = (
    "workers join through Redis, not by HTTP registration: start one with "
    "`llava-serve worker --model-path ... --redis-url redis://...` pointing at this controller's Redis"
)


@router.post(
    "/register_worker",
    status_code=410,
    responses=error_responses(Unauthorized, EndpointGone),
    summary="LLaVA: removed; workers join through Redis",
)
async def register_worker() -> JSONResponse:
    raise EndpointGone(f"/register_worker is not supported: {_JOIN_HINT}")


@router.post(
    "/receive_heart_beat",
    status_code=410,
    responses=error_responses(Unauthorized, EndpointGone),
    summary="LLaVA: removed; liveness is a Redis key",
)
async def receive_heart_beat() -> JSONResponse:
    raise EndpointGone(f"/receive_heart_beat is not supported: {_JOIN_HINT}")
