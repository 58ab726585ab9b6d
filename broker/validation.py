"""Reading request bodies within the size limit, and turning validation errors into one clear message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from contract.errors import InvalidRequest, PayloadTooLarge, RequestInvalid

M = TypeVar("M", bound=BaseModel)

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
    return b"".join(chunks)


async def read_model(request: Request, model: type[M], max_bytes: int) -> M:
    """Read and validate a JSON body as `model`; 413 when too big, 422 naming every bad field."""
    body = await read_body(request, max_bytes)
    if not body.strip():
        raise InvalidRequest("invalid request: body: a JSON object is required")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestInvalid(field_errors(exc.errors(include_url=False))) from None


def require_prompt(prompt: str, field: str = "prompt") -> None:
    """A raw prompt (LLaVA's, OpenAI's legacy one) must not be empty: the model needs a token to continue from."""
    if not prompt:
        raise RequestInvalid([{"field": field, "message": "is empty; send at least one character of prompt text"}])


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body with `read_model(request, model, ...)`: OpenAPI shows
    `model` as the required body (the app adds the schema itself, see `app._document_bodies`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
