"""Reading request bodies within the size limit, turning validation errors into one clear message, and what the
OpenAPI spec says each route answers (`documented_body`, `error_responses` and the stream media types)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request

from contract.errors import (
    ContentRefused,
    ContextTooLong,
    DeviceError,
    GenerationFailed,
    ImageInvalid,
    ImageTooLarge,
    InvalidRequest,
    LlavaError,
    ModelNotFound,
    ModerationUnavailable,
    NoWorker,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    RedisUnavailable,
    RequestInvalid,
    Timeout,
    Unauthorized,
    WorkerLost,
)
from contract.openai_messages import OpenAIError
from contract.replies import ErrorReply

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's image placeholder in prompt text

_MAX_INPUT_REPR = 60


def field_path(loc: Sequence[Any]) -> str:
    """`('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')` -> `messages[0].content[1]
    .image_url.url`: drops pydantic's union-branch and discriminator-tag segments, and FastAPI's `body` root."""
    parts: list[str] = []
    previous_was_index = False
    for i, item in enumerate(loc):
        if i == 0 and item == "body" and len(loc) > 1:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
            previous_was_index = True
            continue
        text = str(item)
        if "[" in text or text in {"str", "int", "float", "bool", "list", "dict", "none"}:
            continue  # a union branch name, not a field
        if previous_was_index and i + 1 < len(loc) and loc[i + 1] == item:
            previous_was_index = False
            continue  # a discriminator tag: `image_url` then the field `image_url`
        previous_was_index = False
        parts.append(text if not parts else f".{text}")
    return "".join(parts) or "body"


def _limit_text(error: dict[str, Any]) -> str:
    ctx = error.get("ctx") or {}
    for key, word in (("le", "<="), ("lt", "<"), ("ge", ">="), ("gt", ">")):
        if key in ctx:
            return f" (limit: {word} {ctx[key]})"
    for key, word in (("max_length", "at most"), ("min_length", "at least")):
        if key in ctx:
            return f" ({word} {ctx[key]} items)"
    return ""


def _input_text(error: dict[str, Any]) -> str:
    if "input" not in error or error.get("type") in {"missing", "json_invalid"}:
        return ""
    value = error["input"]
    if isinstance(value, (dict, list)):
        return ""
    text = repr(value)
    if len(text) > _MAX_INPUT_REPR:
        text = text[: _MAX_INPUT_REPR - 3] + "..."
    return f", got {text}"


def _relevant(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of union errors for the same field, drop the `str` branch when a list was sent (and the reverse)."""
    kept = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if loc and loc[-1] == "str" and isinstance(error.get("input"), list):
            continue
        kept.append(error)
    return kept or errors


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """pydantic's errors as `{"field", "message"}` pairs: the field's path, its problem and the limit
    (`RequestInvalid(field_errors(...))` is the 422)."""
    details = []
    for error in _relevant(errors):
        loc = error.get("loc", ())
        if error.get("type") == "json_invalid":
            path, message = "body", f"malformed JSON: {error.get('msg', '')}"
        else:
            path = field_path(loc)
            message = f"{error.get('msg', 'invalid')}{_limit_text(error)}{_input_text(error)}"
        details.append({"field": path, "message": message})
    return details


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as Content-Length or the bytes read pass `max_bytes`."""
    return b"".join(await read_chunks(request, max_bytes))


async def read_chunks(request: Request, max_bytes: int) -> list[bytes]:
    """The request body as the chunks it came in (not joined: a large one goes to a file as it is), refused with 413
    as soon as Content-Length or the bytes read pass `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise InvalidRequest(f"Content-Length {declared!r} is not a number") from exc
        if length > max_bytes:
            raise PayloadTooLarge(f"request body is {length} bytes, over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return chunks


def require_prompt(prompt: str, field: str = "prompt") -> None:
    """A raw prompt (LLaVA's, OpenAI's legacy one) must not be empty: the model needs a token to continue from."""
    if not prompt:
        raise RequestInvalid([{"field": field, "message": "is empty; send at least one character of prompt text"}])


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body with `ctx.bodies.read(request, model)`: OpenAPI shows
    `model` as the required body (the app adds the schema itself, see `app._document_bodies`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


# ---- What the spec says each route answers -----------------------------------------------------------------------

# A route that only reads Redis: without a valid key when API keys are on (401), Redis failing on the way (503).
READ_ERRORS: tuple[type[LlavaError], ...] = (Unauthorized, RedisUnavailable)
# A route that reads a JSON body: also a bad body (422; 400 under /v1/) and a body over the limit (413).
BODY_ERRORS: tuple[type[LlavaError], ...] = (*READ_ERRORS, InvalidRequest, PayloadTooLarge)
# A request's images: unreadable or refused (400), over a size limit (413).
IMAGE_ERRORS: tuple[type[LlavaError], ...] = (ImageInvalid, ImageTooLarge)
# A job's checks before it is queued: its model (404 unknown, 503 its workers gone), its queue or its client's share
# and rate (429), moderation of its text (400 refused, 503 the service not answering).
JOB_ERRORS: tuple[type[LlavaError], ...] = (
    ModelNotFound, NoWorker, QueueFull, RateLimited, ContentRefused, ModerationUnavailable,
)  # fmt: skip
# A worker's failure, which a non-streaming reply answers with as its status (a stream ends with an error event).
RESULT_ERRORS: tuple[type[LlavaError], ...] = (ContextTooLong, GenerationFailed, DeviceError, WorkerLost, Timeout)

SSE_MEDIA_TYPE = "text/event-stream"
LLAVA_STREAM_MEDIA_TYPE = "application/octet-stream"  # LLaVA's stream: NUL-terminated JSON chunks
_STRING = {"type": "string"}
_TEXT = {"schema": _STRING}
_INTEGER = {"type": "integer"}


def error_responses(
    *errors: type[LlavaError], openai: bool = False, media_type: str | None = None
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that may raise `errors`: each one's status with the body it has on that route
    (`ErrorReply`, or OpenAI's error shape with 400 for 422 when `openai`) and its error codes. With `media_type`
    the body is documented under that type instead (LLaVA's stream answers one error chunk), except the 401 of
    the API key check, which is JSON on every route."""
    by_status: dict[int, list[str]] = {}
    for error in errors:
        status = 400 if openai and error.status_code == 422 else error.status_code
        codes = by_status.setdefault(status, [])
        if str(error.code) not in codes:
            codes.append(str(error.code))
    model = OpenAIError if openai else ErrorReply
    responses: dict[int | str, dict[str, Any]] = {}
    for status, codes in sorted(by_status.items()):
        description = f"error codes: {', '.join(codes)}"
        if media_type is None or status == Unauthorized.status_code:
            responses[status] = {"model": model, "description": description}
        else:
            responses[status] = {"description": description, "content": {media_type: _TEXT}}
        if status == QueueFull.status_code:
            responses[status]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": _INTEGER}}
    return responses


def sse_event_schema(data_models: Sequence[type[BaseModel]] = ()) -> dict[str, Any]:
    """The schema of one server-sent event (OpenAPI 3.1 documents an event stream event by event): its `event`
    name and its `data`, JSON of one of `data_models` when given (their schemas are app components)."""
    data: dict[str, Any] = {"type": "string"}
    if data_models:
        refs = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in data_models]
        data.update(contentMediaType="application/json", contentSchema={"anyOf": refs})
    return {
        "type": "object",
        "properties": {"event": {"type": "string"}, "data": data, "id": {"type": "string"}},
        "required": ["data"],
    }


def stream_reply(
    media_type: str,
    description: str,
    *,
    schema: dict[str, Any] | None = None,
    json_model: type[BaseModel] | None = None,
) -> dict[int, Any]:
    """`responses=` entry for a 200 that streams `media_type` (each event as `schema`, by default a string); with
    `json_model`, also the JSON reply of a request that does not ask to stream."""
    reply: dict[str, Any] = {"description": description, "content": {media_type: {"schema": schema or _STRING}}}
    if json_model is not None:
        reply["model"] = json_model
    return {200: reply}
