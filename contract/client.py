"""The one typed client of the controller's HTTP API, used by the UI, `replay` and the benchmarks.

Replies are read into the models the controller writes (`contract.replies`, `contract.messages`); the stream of
`POST /api/v1/generate` is read by one SSE parser into `StreamEvent`s. A failure the controller answers is raised
as its `contract.errors` class (rebuilt from the body's code by `error_from_code`); no answer at all is
`ControllerUnreachable`. Imports neither fastapi nor torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
from pydantic import ValidationError

from contract.errors import ControllerUnreachable, ErrorCode, LlavaError, QueueFull, RateLimited, error_from_code
from contract.feedback_messages import FeedbackAccepted, FeedbackRequest
from contract.identity import END_USER_HEADER
from contract.messages import GenerateRequest, JobView, StreamEvent
from contract.messages import parse_event as parse_event_json
from contract.replies import CancelReply, ErrorReply, ModelInfo, ModelList, ServiceInfo

# Connect fast; reads wait long because the controller sends queue updates and pings while a job waits.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=5.0)

# ---- Server-sent events -------------------------------------------------------------------------------------


class SSEDecoder:
    """Server-sent events from text lines fed one at a time: the one SSE parser of every client."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """`(event, data)` when `line` ends an event, else None. Comments (`:` lines, the keep-alive ping) are
        skipped; several `data:` lines join with newlines."""
        if line == "":
            ended = (self._event, "\n".join(self._data)) if self._data else None
            self._event, self._data = "", []
            return ended
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def iter_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """`(event, data)` of each server-sent event in `lines`; an event not ended by a blank line still counts."""
    decoder = SSEDecoder()
    for line in lines:
        if (ended := decoder.feed(line)) is not None:
            yield ended
    if (ended := decoder.feed("")) is not None:
        yield ended


async def aiter_sse(lines: AsyncIterable[str]) -> AsyncIterator[tuple[str, str]]:
    """`iter_sse` over an async line iterator."""
    decoder = SSEDecoder()
    async for line in lines:
        if (ended := decoder.feed(line)) is not None:
            yield ended
    if (ended := decoder.feed("")) is not None:
        yield ended


def parse_event(event: str, data: str) -> StreamEvent:
    """One SSE event of `POST /api/v1/generate` as its typed event. Raises ValueError (pydantic's
    ValidationError) when `data` is not an event, or when the `event:` name, if any, is not its type."""
    parsed = parse_event_json(data)
    if event and event != parsed.type:
        raise ValueError(f"SSE event {event!r} carries a {parsed.type!r} event")
    return parsed


def iter_events(response: httpx.Response) -> Iterator[StreamEvent]:
    """The typed events of a streaming `POST /api/v1/generate` response, as they arrive."""
    for event, data in iter_sse(response.iter_lines()):
        yield parse_event(event, data)


async def aiter_events(response: httpx.Response) -> AsyncIterator[StreamEvent]:
    """`iter_events` for an `httpx.AsyncClient` response."""
    async for event, data in aiter_sse(response.aiter_lines()):
        yield parse_event(event, data)


# ---- Errors ---------------------------------------------------------------------------------------------------


def retry_after_s(response: httpx.Response) -> int | None:
    """The `Retry-After` header in whole seconds, or None when absent or not a number."""
    value = response.headers.get("retry-after")
    try:
        return max(0, int(float(value))) if value is not None else None
    except ValueError:
        return None


def error_from_response(response: httpx.Response) -> LlavaError:
    """The error class of a failed answer (read), with the answer's HTTP status. A body that is not an
    `ErrorReply` (a proxy's page, FastAPI's `{"detail": ...}`) gives code `http_<status>` (422:
    `invalid_request`) and its text as the message."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    try:
        detail = ErrorReply.model_validate(body).error
        code, message = detail.code, detail.message
    except ValidationError:
        code = ErrorCode.invalid_request if status == 422 else f"http_{status}"
        message = response.reason_phrase or "request failed"
        if isinstance(body, dict) and "detail" in body:
            message = body["detail"] if isinstance(body["detail"], str) else response.text[:500]
        elif response.text:
            message = response.text[:500]
    error = error_from_code(code, message)
    error.status_code = status
    after = retry_after_s(response)
    if isinstance(error, (QueueFull, RateLimited)) and after is not None:
        error.retry_after = after
        error.headers["Retry-After"] = str(after)
    return error


# ---- The client -------------------------------------------------------------------------------------------------


class ControllerClient:
    """A synchronous client of one controller. Pass `http` to use an existing `httpx.Client` (a test client, a
    tuned pool): its base URL and headers are used as they are, and `close()` leaves it open."""

    def __init__(
        self,
        base_url: str = "",
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        user_agent: str = "llava-serve",
        http: httpx.Client | None = None,
    ) -> None:
        self._owned = http is None
        if http is None:
            headers = {"User-Agent": user_agent}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self._http = http
        self.base_url = str(http.base_url).rstrip("/")

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def _unreachable(self, exc: Exception) -> ControllerUnreachable:
        kind = type(exc).__name__
        return ControllerUnreachable(f"cannot reach the controller at {self.base_url} ({kind}: {exc})")

    @staticmethod
    def _headers(end_user: str | None, **headers: str) -> dict[str, str]:
        """Per-request headers: `end_user` names the person a trusted front end asks for (`contract.identity`)."""
        if end_user is not None:
            headers[END_USER_HEADER] = end_user
        return headers

    def _request(self, method: str, path: str, *, end_user: str | None = None, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, headers=self._headers(end_user), **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def list_models(self, *, end_user: str | None = None) -> list[ModelInfo]:
        """`GET /api/v1/models`: every model live workers serve, with its worker count."""
        response = self._request("GET", "/api/v1/models", end_user=end_user, timeout=10.0)
        return ModelList.model_validate_json(response.content).models

    def info(self, *, end_user: str | None = None) -> ServiceInfo:
        """`GET /api/v1/info`: whether conversations are recorded, and for how long."""
        response = self._request("GET", "/api/v1/info", end_user=end_user, timeout=10.0)
        return ServiceInfo.model_validate_json(response.content)

    def generate(self, request: GenerateRequest, *, end_user: str | None = None) -> Iterator[StreamEvent]:
        """Stream `POST /api/v1/generate`. Errors before the stream raise; after, they arrive as an `ErrorEvent`.
        The iterator ends after the stream does, with or without a final event; closing it closes the stream
        (the controller then cancels the job)."""
        body = request.model_dump(mode="json", exclude_none=True)
        try:
            with self._http.stream(
                "POST", "/api/v1/generate", json=body, headers=self._headers(end_user, Accept="text/event-stream")
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                yield from iter_events(response)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def job(self, job_id: str, *, end_user: str | None = None) -> JobView:
        """`GET /api/v1/jobs/{id}`: the job's status and, once final, its outcome."""
        response = self._request("GET", f"/api/v1/jobs/{job_id}", end_user=end_user, timeout=10.0)
        return JobView.model_validate_json(response.content)

    def cancel(self, job_id: str, *, end_user: str | None = None) -> CancelReply | None:
        """`POST /api/v1/jobs/{id}/cancel`; None for a job that already ended or is unknown (not an error)."""
        try:
            response = self._request("POST", f"/api/v1/jobs/{job_id}/cancel", end_user=end_user, timeout=10.0)
        except LlavaError as exc:
            if exc.code == ErrorCode.job_not_found or exc.status_code == 409:
                return None
            raise
        return CancelReply.model_validate_json(response.content)

    def send_feedback(self, feedback: FeedbackRequest, *, end_user: str | None = None) -> FeedbackAccepted:
        """`POST /api/v1/feedback`: the stream entry it was recorded as."""
        body = feedback.model_dump(mode="json")
        response = self._request("POST", "/api/v1/feedback", end_user=end_user, json=body, timeout=30.0)
        return FeedbackAccepted.model_validate_json(response.content)
