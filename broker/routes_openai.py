"""OpenAI-compatible endpoints: `POST /v1/chat/completions` (streaming and not) and `GET /v1/models`.

A chat completion becomes the same `GenerateRequest` as `POST /api/v1/generate` and takes the same path
(`prepare_job`, `submit_job`, `follow_job`); only the wire format differs. http(s) `image_url`s are fetched
(into data: URLs) only with `--allow-remote-images`, under `broker.remote_images`' limits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from broker.context import REDIS_ERRORS, ControllerContext, redis_unavailable
from broker.errors import error_from_code
from broker.messages import DoneEvent, ErrorEvent, GenerateRequest, ImageUrlPart, TokenEvent
from broker.openai_messages import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    ModelCard,
    ModelCardList,
    openai_error_from_event,
    openai_finish_reason,
)
from broker.remote_images import RemoteImagePolicy, inline_remote_images
from broker.routes_api import context, image_sources, prepare_job
from broker.streams import StreamEvent, follow_job, submit_job
from broker.validation import read_model

router = APIRouter(tags=["OpenAI compatibility"])

OPENAI_PREFIX = "/v1/"


def remote_image_policy(request: Request, ctx: ControllerContext) -> RemoteImagePolicy | None:
    """The fetch policy when remote images are allowed (an app may set `state.remote_image_policy`), else None."""
    s = ctx.settings
    if not s.allow_remote_images:
        return None
    custom = getattr(request.app.state, "remote_image_policy", None)
    return custom or RemoteImagePolicy(
        max_bytes=s.max_image_bytes, timeout_s=s.remote_image_timeout, max_redirects=s.remote_image_max_redirects
    )


async def with_remote_images(request: Request, ctx: ControllerContext, body: GenerateRequest) -> GenerateRequest:
    """`body` with each http(s) image URL replaced by a data: URL of its fetched bytes (or refused)."""
    sources = image_sources(body)
    if not any(url[:8].lower().startswith(("http://", "https://")) for _, url in sources):
        return body
    policy = remote_image_policy(request, ctx)
    if policy is not None:
        try:
            await ctx.require_model(body.model)  # no fetching for a model that is not served
        except REDIS_ERRORS as exc:
            raise redis_unavailable(exc) from exc
    inlined = await inline_remote_images(sources, policy)
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, ImageUrlPart) and f"messages[{i}].content[{j}]" in inlined:
                part.image_url.url = inlined[f"messages[{i}].content[{j}]"]
    return body


def _sse(payload: str) -> ServerSentEvent:
    return ServerSentEvent(data=payload)


async def completion_chunks(
    events: AsyncIterator[StreamEvent], *, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """OpenAI's stream: a role chunk, content chunks, a chunk with the finish reason, optionally a usage chunk,
    then `[DONE]`; an error after the start is a `{"error": ...}` chunk (the openai client raises it)."""

    def chunk(delta: Delta, finish_reason: str | None = None) -> ServerSentEvent:
        body = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
        )
        return _sse(body.model_dump_json())

    generated = ""
    async with contextlib.aclosing(events):  # closing early cancels the job
        yield chunk(Delta(role="assistant", content=""))
        async for event in events:
            if isinstance(event, TokenEvent):
                generated += event.text
                yield chunk(Delta(content=event.text))
            elif isinstance(event, DoneEvent):
                if event.text.startswith(generated) and len(event.text) > len(generated):
                    yield chunk(Delta(content=event.text[len(generated) :]))  # tokens lost in a Redis blip
                yield chunk(Delta(), openai_finish_reason(event.finish_reason))
                if include_usage:
                    usage = CompletionUsage.of(event.usage)
                    tail = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage)
                    yield _sse(tail.model_dump_json())
                yield _sse("[DONE]")
                return
            elif isinstance(event, ErrorEvent):
                yield _sse(openai_error_from_event(event.code, event.message, event.status_code).model_dump_json())
                yield _sse("[DONE]")
                return


async def final_completion(
    events: AsyncIterator[StreamEvent], *, completion_id: str, created: int, model: str
) -> ChatCompletion:
    """The whole reply of a non-streaming request; an error event raises its error class."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, DoneEvent):
                return ChatCompletion(
                    id=completion_id,
                    created=created,
                    model=model,
                    choices=[
                        Choice(
                            message=AssistantMessage(content=event.text),
                            finish_reason=openai_finish_reason(event.finish_reason),
                        )
                    ],
                    usage=CompletionUsage.of(event.usage),
                )
            if isinstance(event, ErrorEvent):
                error = error_from_code(event.code, event.message)
                error.status_code = event.status_code
                raise error
    raise error_from_code("generation_failed", "the job's stream ended without a result")


@router.post(
    "/v1/chat/completions",
    summary="OpenAI chat completions (text and image_url parts), streaming or not",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        }
    },
)
async def chat_completions(request: Request):
    ctx = context(request)
    body = await read_model(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    generate = await with_remote_images(request, ctx, body.to_generate_request())
    job = await prepare_job(ctx, generate)
    sub = await submit_job(ctx, job)
    events = follow_job(ctx, sub, job.model)
    completion_id, created = f"chatcmpl-{job.job_id}", int(time.time())
    headers = {"X-Job-Id": job.job_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = completion_chunks(
            events, completion_id=completion_id, created=created, model=body.model, include_usage=include_usage
        )
        return EventSourceResponse(chunks, ping=ctx.settings.ping_interval, headers=headers)
    completion = await final_completion(events, completion_id=completion_id, created=created, model=body.model)
    return JSONResponse(completion.model_dump(mode="json"), headers=headers)


@router.get("/v1/models", response_model=ModelCardList, summary="OpenAI: models served by live workers")
async def list_models(request: Request) -> ModelCardList:
    ctx = context(request)
    try:
        serving = await ctx.serving(fresh=True)
    except REDIS_ERRORS as exc:
        raise redis_unavailable(exc) from exc
    return ModelCardList(
        data=[ModelCard(id=name, created=int(min(w.started_at for w in workers))) for name, workers in serving.items()]
    )
