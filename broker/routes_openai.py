"""OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (streaming and not) and
`GET /v1/models`.

A chat completion becomes the same `GenerateRequest` as `POST /api/v1/generate` and takes the same path
(`prepare_job`, `submit_job`, `follow_job`); only the wire format differs. http(s) `image_url`s are fetched
(into data: URLs) only with `--allow-remote-images`, under `broker.remote_images`' limits. A legacy completion
is a text-only job whose `prompt` goes to the model as is, like LLaVA's `/worker_generate_stream`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from broker.admission import submit_for
from broker.context import ControllerContext
from broker.remote_images import RemoteImagePolicy, inline_remote_images
from broker.routes_api import context, image_sources, new_job_id, prepare_job, require_live_model
from broker.streams import follow_job
from broker.validation import (
    BODY_ERRORS,
    IMAGE_ERRORS,
    IMAGE_PLACEHOLDER,
    JOB_ERRORS,
    READ_ERRORS,
    RESULT_ERRORS,
    SSE_MEDIA_TYPE,
    documented_body,
    error_responses,
    require_prompt,
    sse_event_schema,
    stream_reply,
)
from contract.errors import GenerationFailed, RequestInvalid
from contract.messages import (
    DoneEvent,
    ErrorEvent,
    GenerateRequest,
    ImageUrlPart,
    JobRequest,
    StreamEvent,
    TokenEvent,
    error_from_event,
)
from contract.openai_messages import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    Delta,
    ModelCard,
    ModelCardList,
    OpenAIRequest,
    TextCompletion,
    openai_error_from_event,
    openai_finish_reason,
)

router = APIRouter(tags=["OpenAI compatibility"])

T = TypeVar("T")

OPENAI_PREFIX = "/v1/"


def remote_image_policy(request: Request, ctx: ControllerContext) -> RemoteImagePolicy | None:
    """The fetch policy when remote images are allowed (an app may set `state.remote_image_policy`), else None."""
    s = ctx.settings
    if not s.allow_remote_images:
        return None
    custom = getattr(request.app.state, "remote_image_policy", None)
    return custom or RemoteImagePolicy(
        max_bytes=s.max_image_bytes, timeout_s=s.remote_image_timeout_s, max_redirects=s.remote_image_max_redirects
    )


async def with_remote_images(request: Request, ctx: ControllerContext, body: GenerateRequest) -> GenerateRequest:
    """`body` with each http(s) image URL replaced by a data: URL of its fetched bytes (or refused)."""
    sources = image_sources(body)
    if not any(url[:8].lower().startswith(("http://", "https://")) for _, url in sources):
        return body
    policy = remote_image_policy(request, ctx)
    if policy is not None:
        await ctx.require_model(body.model)  # no fetching for a model that is not served
    inlined = await inline_remote_images(sources, policy, ctx.settings.max_images)
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, ImageUrlPart) and f"messages[{i}].content[{j}]" in inlined:
                part.image_url.url = inlined[f"messages[{i}].content[{j}]"]
    return body


def _sse(payload: str) -> ServerSentEvent:
    return ServerSentEvent(data=payload)


async def text_pieces(events: AsyncIterator[StreamEvent]) -> AsyncIterator[str | DoneEvent | ErrorEvent]:
    """Each token's text as it comes, then the final `done` or `error` event; text the tokens missed (lost in a
    Redis blip) comes as one more piece before `done`. Closing it early closes `events`, which cancels the job."""
    generated = ""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TokenEvent):
                generated += event.text
                yield event.text
            elif isinstance(event, DoneEvent):
                if event.text.startswith(generated) and len(event.text) > len(generated):
                    yield event.text[len(generated) :]
                yield event
                return
            elif isinstance(event, ErrorEvent):
                yield event
                return


def _error_chunk(event: ErrorEvent) -> ServerSentEvent:
    return _sse(openai_error_from_event(event.code, event.message, event.status_code).model_dump_json())


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

    pieces = text_pieces(events)
    async with contextlib.aclosing(pieces):  # closing early cancels the job
        yield chunk(Delta(role="assistant", content=""))
        async for piece in pieces:
            if isinstance(piece, str):
                yield chunk(Delta(content=piece))
            elif isinstance(piece, DoneEvent):
                yield chunk(Delta(), openai_finish_reason(piece.finish_reason))
                if include_usage:
                    usage = CompletionUsage.of(piece.usage)
                    tail = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage)
                    yield _sse(tail.model_dump_json())
                yield _sse("[DONE]")
            else:
                yield _error_chunk(piece)
                yield _sse("[DONE]")


async def text_completion_chunks(
    events: AsyncIterator[StreamEvent], *, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """OpenAI's legacy stream: `text_completion` chunks of text, one with the finish reason, optionally a usage
    chunk, then `[DONE]`; an error after the start is a `{"error": ...}` chunk."""

    def chunk(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> ServerSentEvent:
        body = TextCompletion(id=completion_id, created=created, model=model, choices=choices, usage=usage)
        return _sse(body.model_dump_json())

    pieces = text_pieces(events)
    async with contextlib.aclosing(pieces):  # closing early cancels the job
        async for piece in pieces:
            if isinstance(piece, str):
                yield chunk([CompletionChoice(text=piece)])
            elif isinstance(piece, DoneEvent):
                yield chunk([CompletionChoice(text="", finish_reason=openai_finish_reason(piece.finish_reason))])
                if include_usage:
                    yield chunk([], CompletionUsage.of(piece.usage))
                yield _sse("[DONE]")
            else:
                yield _error_chunk(piece)
                yield _sse("[DONE]")


async def final_event(events: AsyncIterator[StreamEvent]) -> DoneEvent:
    """The `done` event of a non-streaming request; an error event raises its error class."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, DoneEvent):
                return event
            if isinstance(event, ErrorEvent):
                raise error_from_event(event)
    raise GenerationFailed("the job's stream ended without a result")


async def final_completion(
    events: AsyncIterator[StreamEvent], *, completion_id: str, created: int, model: str
) -> ChatCompletion:
    """The whole reply of a non-streaming chat request; an error event raises its error class."""
    done = await final_event(events)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[
            Choice(
                message=AssistantMessage(content=done.text),
                finish_reason=openai_finish_reason(done.finish_reason),
            )
        ],
        usage=CompletionUsage.of(done.usage),
    )


async def final_text_completion(
    events: AsyncIterator[StreamEvent], *, completion_id: str, created: int, model: str
) -> TextCompletion:
    """The whole reply of a non-streaming legacy completion; an error event raises its error class."""
    done = await final_event(events)
    return TextCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[CompletionChoice(text=done.text, finish_reason=openai_finish_reason(done.finish_reason))],
        usage=CompletionUsage.of(done.usage),
    )


@router.post(
    "/v1/chat/completions",
    summary="OpenAI chat completions (text and image_url parts), streaming or not",
    openapi_extra=documented_body(ChatCompletionRequest),
    responses={
        **stream_reply(
            SSE_MEDIA_TYPE,
            "`chat.completion` JSON, or its chunks as events with `stream` (the last one's data is `[DONE]`)",
            schema=sse_event_schema(),
            json_model=ChatCompletion,
        ),
        **error_responses(*BODY_ERRORS, *IMAGE_ERRORS, *JOB_ERRORS, *RESULT_ERRORS, openai=True),
    },
)
async def chat_completions(request: Request):
    ctx = context(request)
    body = await ctx.bodies.read(request, ChatCompletionRequest)
    generate = await with_remote_images(request, ctx, body.to_generate_request())
    job = await prepare_job(ctx, generate)
    return await respond(request, ctx, job, body, "chatcmpl", completion_chunks, final_completion)


async def respond(
    request: Request,
    ctx: ControllerContext,
    job: JobRequest,
    body: OpenAIRequest,
    id_prefix: str,
    stream: Callable[..., AsyncIterator[ServerSentEvent]],
    whole: Callable[..., Awaitable[BaseModel]],
):
    """Submit `job` and answer in OpenAI's format: `stream`'s chunks as SSE when the body asks to stream, else
    `whole`'s object as JSON; the job id goes in `X-Job-Id`."""
    sub = await submit_for(request, ctx, job)
    events = follow_job(ctx, sub, job.model)
    ids = {"completion_id": f"{id_prefix}-{job.job_id}", "created": int(time.time()), "model": body.model}
    headers = {"X-Job-Id": job.job_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream(events, include_usage=include_usage, **ids)
        return EventSourceResponse(chunks, ping=ctx.settings.ping_interval_s, headers=headers)
    completion = await unless_disconnected(request, whole(events, **ids))
    if completion is None:  # the client gave up: its job was cancelled as `events` closed; nobody reads this
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(completion.model_dump(mode="json"), headers=headers)


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away before the answer


async def wait_disconnected(request: Request) -> None:
    """Return once the client has gone. Called after the body was read, so the next ASGI message is the
    disconnect (while the connection stays open, `receive` just waits)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client disconnects first (then `work` is cancelled: a whole reply's
    `events` close, which cancels the job, as a streaming request's do when its client goes)."""
    result: list[T] = []
    failed: list[Exception] = []  # re-raised as is, not in the task group's ExceptionGroup, for the app's handler
    async with anyio.create_task_group() as tasks:

        async def run() -> None:
            try:
                result.append(await work)
            except Exception as exc:  # noqa: BLE001 - re-raised below
                failed.append(exc)
            tasks.cancel_scope.cancel()

        async def watch() -> None:
            await wait_disconnected(request)
            tasks.cancel_scope.cancel()

        tasks.start_soon(run)
        tasks.start_soon(watch)
    if failed:
        raise failed[0]
    return result[0] if result else None


async def prepare_prompt_job(ctx: ControllerContext, body: CompletionRequest) -> JobRequest:
    """The job of a legacy completion: the prompt as is, no images; 404/503 for a model without workers."""
    require_prompt(body.prompt)
    if IMAGE_PLACEHOLDER in body.prompt:
        raise RequestInvalid(
            [
                {
                    "field": "prompt",
                    "message": f"contains {IMAGE_PLACEHOLDER}, but /v1/completions takes no images; "
                    "send images to /v1/chat/completions as image_url parts",
                }
            ]
        )
    await require_live_model(ctx, body.model, prompt_chars=len(body.prompt))
    return JobRequest(job_id=new_job_id(), model=body.model, prompt=body.prompt, params=body.sampling_params())


@router.post(
    "/v1/completions",
    summary="OpenAI legacy completions of a text prompt, streaming or not",
    openapi_extra=documented_body(CompletionRequest),
    responses={
        **stream_reply(
            SSE_MEDIA_TYPE,
            "`text_completion` JSON, or its chunks as events with `stream` (the last one's data is `[DONE]`)",
            schema=sse_event_schema(),
            json_model=TextCompletion,
        ),
        **error_responses(*BODY_ERRORS, *JOB_ERRORS, *RESULT_ERRORS, openai=True),
    },
)
async def completions(request: Request):
    ctx = context(request)
    body = await ctx.bodies.read(request, CompletionRequest)
    job = await prepare_prompt_job(ctx, body)
    return await respond(request, ctx, job, body, "cmpl", text_completion_chunks, final_text_completion)


@router.get(
    "/v1/models",
    response_model=ModelCardList,
    responses=error_responses(*READ_ERRORS, openai=True),
    summary="OpenAI: models served by live workers",
)
async def list_models(request: Request) -> ModelCardList:
    serving = await context(request).serving(fresh=True)
    return ModelCardList(
        data=[ModelCard(id=name, created=int(min(w.started_at for w in workers))) for name, workers in serving.items()]
    )
