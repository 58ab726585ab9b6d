"""One error hierarchy: each failure has an HTTP status and a stable code, and crosses Redis as data."""

from __future__ import annotations

from enum import Enum, IntEnum


class ErrorCode(str, Enum):
    """Every stable error code, as it appears in an error body or an `error` event."""

    def __str__(self) -> str:  # the code itself, in messages and f-strings, on every Python version
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    internal_error = "internal_error"
    invalid_request = "invalid_request"
    invalid_image = "invalid_image"
    context_length_exceeded = "context_length_exceeded"
    unauthorized = "unauthorized"
    model_not_found = "model_not_found"
    job_not_found = "job_not_found"
    endpoint_removed = "endpoint_removed"
    payload_too_large = "payload_too_large"
    image_too_large = "image_too_large"
    queue_full = "queue_full"
    content_refused = "content_refused"  # the moderation hook flagged the user's text
    moderation_unavailable = "moderation_unavailable"  # the moderation service failed: the request is refused
    reply_flagged = "reply_flagged"  # reply moderation flagged the text being generated: the job was stopped
    rate_limited = "rate_limited"  # a client's cap on jobs held at once, or its requests or tokens per minute
    generation_failed = "generation_failed"
    device_error = "device_error"
    worker_lost = "worker_lost"
    no_worker = "no_worker"
    redis_unavailable = "redis_unavailable"
    timeout = "timeout"
    controller_unreachable = "controller_unreachable"  # raised by clients: no answer from the controller
    stream_ended = "stream_ended"  # raised by clients: a stream closed before its done or error event


class LlavaWireCode(IntEnum):
    """LLaVA's numeric `error_code` in `/worker_generate_stream` chunks (LLaVA's controller and worker use these)."""

    ok = 0
    request_failed = 1  # LLaVA's worker: any failure of the request or the generation
    no_worker = 2  # LLaVA's controller: no worker for the model
    worker_unreachable = 3  # LLaVA's controller: the worker could not be reached (here: Redis)


_LLAVA_WIRE_CODES: dict[str, LlavaWireCode] = {
    ErrorCode.no_worker: LlavaWireCode.no_worker,
    ErrorCode.model_not_found: LlavaWireCode.no_worker,
    ErrorCode.redis_unavailable: LlavaWireCode.worker_unreachable,
}


def llava_wire_code(code: str) -> LlavaWireCode:
    """LLaVA's numeric code for an error code (unknown codes, from a newer version, count as a failed request)."""
    return _LLAVA_WIRE_CODES.get(code, LlavaWireCode.request_failed)


class LlavaError(Exception):
    status_code: int = 500
    code: str = ErrorCode.internal_error  # an ErrorCode; a plain str only for a code from a newer version

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(LlavaError):
    status_code = 422
    code = ErrorCode.invalid_request


class RequestInvalid(InvalidRequest):
    """422 naming each bad field: `fields` holds one `{"field", "message"}` per field, the message all of them."""

    MAX_LISTED = 8

    def __init__(self, fields: list[dict[str, str]], *, total: int | None = None) -> None:
        self.fields = fields
        self.total = max(total or 0, len(fields))  # errors found; `fields` may list only the first of them
        text = "; ".join(f"{f['field']}: {f['message']}" for f in fields[: self.MAX_LISTED])
        if self.total > self.MAX_LISTED:
            text += f"; and {self.total - self.MAX_LISTED} more"
        if self.total > len(fields):
            text += f" (the first {len(fields)} are listed in fields)"
        super().__init__(f"invalid request: {text}")

    def __reduce__(self) -> tuple:  # crosses a process boundary (the body parser's pool) with its fields
        return (_request_invalid, (self.fields, self.total))


def _request_invalid(fields: list[dict[str, str]], total: int) -> RequestInvalid:
    return RequestInvalid(fields, total=total)


class HeaderInvalid(LlavaError):
    """400: a request header the controller reads is malformed (the message names the header and the rule)."""

    status_code = 400
    code = ErrorCode.invalid_request


class ImageInvalid(LlavaError):
    status_code = 400
    code = ErrorCode.invalid_image


class ContextTooLong(LlavaError):
    status_code = 400
    code = ErrorCode.context_length_exceeded


class Unauthorized(LlavaError):
    status_code = 401
    code = ErrorCode.unauthorized


class ModelNotFound(LlavaError):
    status_code = 404
    code = ErrorCode.model_not_found


class JobNotFound(LlavaError):
    status_code = 404
    code = ErrorCode.job_not_found


class EndpointGone(LlavaError):
    """A LLaVA endpoint that has no meaning here (workers join through Redis, not HTTP)."""

    status_code = 410
    code = ErrorCode.endpoint_removed


class PayloadTooLarge(LlavaError):
    status_code = 413
    code = ErrorCode.payload_too_large


class ImageTooLarge(PayloadTooLarge):
    code = ErrorCode.image_too_large


class QueueFull(LlavaError):
    status_code = 429
    code = ErrorCode.queue_full

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class ContentRefused(LlavaError):
    """400: the moderation hook flagged the request's text; the message says which rule or categories."""

    status_code = 400
    code = ErrorCode.content_refused


class ReplyFlagged(LlavaError):
    """400: reply moderation flagged the reply as it streamed; the job was stopped, the stream ends with this."""

    status_code = 400
    code = ErrorCode.reply_flagged


class ModerationUnavailable(LlavaError):
    """503: the moderation service did not answer; the request is refused rather than let through unchecked."""

    status_code = 503
    code = ErrorCode.moderation_unavailable


class RateLimited(LlavaError):
    """429 for one client over its own limit (jobs held at once, requests or tokens per minute), naming it."""

    status_code = 429
    code = ErrorCode.rate_limited

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class GenerationFailed(LlavaError):
    status_code = 500
    code = ErrorCode.generation_failed


class DeviceError(LlavaError):
    """The accelerator failed (out of memory, lost device); the job fails, the worker reports it."""

    status_code = 500
    code = ErrorCode.device_error


class WorkerLost(LlavaError):
    status_code = 502
    code = ErrorCode.worker_lost


class NoWorker(LlavaError):
    status_code = 503
    code = ErrorCode.no_worker


class RedisUnavailable(LlavaError):
    status_code = 503
    code = ErrorCode.redis_unavailable


class Timeout(LlavaError):
    status_code = 504
    code = ErrorCode.timeout


class ControllerUnreachable(LlavaError):
    """A client could not reach the controller (refused, reset, timed out)."""

    status_code = 503
    code = ErrorCode.controller_unreachable


class StreamEnded(LlavaError):
    """A client's stream closed before its final event."""

    status_code = 502
    code = ErrorCode.stream_ended


def _all_subclasses(cls: type[LlavaError]) -> list[type[LlavaError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def _errors_by_code() -> dict[str, type[LlavaError]]:
    found: dict[str, type[LlavaError]] = {}
    for cls in [LlavaError, *_all_subclasses(LlavaError)]:
        found.setdefault(cls.code, cls)  # the base class of a code (InvalidRequest, not RequestInvalid)
    return found


ERRORS_BY_CODE: dict[str, type[LlavaError]] = _errors_by_code()


def error_from_code(code: str, message: str) -> LlavaError:
    """Rebuild the error class that `code` names (an error that crossed Redis as data)."""
    cls = ERRORS_BY_CODE.get(code, LlavaError)
    if cls is QueueFull:
        return QueueFull(message)
    error = cls(message)
    if cls is LlavaError:
        error.code = code
    return error
