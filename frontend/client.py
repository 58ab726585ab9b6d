"""The UI's HTTP client of the controller: model list, streaming generate (SSE), cancel, feedback.

It uses the same public API as any other client. Failures come back as `ControllerError` with the controller's
stable error code and message, so the UI can say exactly what went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from contract.feedback_messages import FeedbackRequest
from contract.messages import GenerateRequest

# Connect fast; reads wait long because the controller sends queue updates and pings while a job waits.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=5.0)


class ControllerError(Exception):
    """An error the controller answered (`code` from `contract.errors`), or `controller_unreachable`."""

    def __init__(self, code: str, message: str, *, status_code: int | None = None, retry_after: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after


@dataclass
class ModelInfo:
    name: str
    workers: int | None = None  # live workers serving it, when the controller says


@dataclass
class StreamEvent:
    """One SSE event of `POST /api/v1/generate`: `queued`, `token`, `done` or `error`, with its JSON data."""

    type: str
    data: dict = field(default_factory=dict)

    @property
    def job_id(self) -> str | None:
        return self.data.get("job_id")


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after")
    try:
        return max(0, int(float(value))) if value is not None else None
    except ValueError:
        return None


def _error_from_response(response: httpx.Response) -> ControllerError:
    """The controller's `{"error": {"code", "message"}}`, or FastAPI's `{"detail": ...}`, as a ControllerError."""
    code, message = f"http_{response.status_code}", response.reason_phrase or "request failed"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code") or code)
        message = str(body["error"].get("message") or message)
    elif isinstance(body, dict) and "detail" in body:
        code = "invalid_request" if response.status_code == 422 else code
        message = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])[:500]
    elif response.text:
        message = response.text[:500]
    return ControllerError(code, message, status_code=response.status_code, retry_after=_retry_after(response))


def _parse_models(body: object) -> list[ModelInfo]:
    items = body
    if isinstance(body, dict):
        items = body.get("models", body.get("data", []))
    models = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            models.append(ModelInfo(name=item))
        elif isinstance(item, dict):
            name = item.get("name") or item.get("id") or item.get("model")
            count = item.get("workers", item.get("worker_count", item.get("live_workers")))
            if isinstance(count, list):
                count = len(count)
            if name:
                models.append(ModelInfo(name=str(name), workers=int(count) if isinstance(count, int) else None))
    return models


def _sse_event(event: str, data: list[str]) -> StreamEvent:
    payload = "\n".join(data)
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = {"text": payload}
    if not isinstance(parsed, dict):
        parsed = {"value": parsed}
    return StreamEvent(type=event or str(parsed.get("type", "message")), data=parsed)


def iter_sse(lines: Iterator[str]) -> Iterator[StreamEvent]:
    """Server-sent events from text lines; the event type is the `event:` field, else the data's `type`."""
    event, data = "", []
    for line in lines:
        if line == "":
            if data:
                yield _sse_event(event, data)
            event, data = "", []
        elif line.startswith(":"):
            continue  # a comment: the keep-alive ping
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield _sse_event(event, data)


class ControllerClient:
    """A synchronous client of one controller (Gradio runs handlers in threads)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: httpx.Timeout = DEFAULT_TIMEOUT):
        headers = {"User-Agent": "llava-serve-web"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error_from_response(response)
        return response

    def _unreachable(self, exc: Exception) -> ControllerError:
        kind = type(exc).__name__
        return ControllerError(
            "controller_unreachable", f"cannot reach the controller at {self.base_url} ({kind}: {exc})"
        )

    def list_models(self) -> list[ModelInfo]:
        """`GET /api/v1/models`: every model the controller knows, with its live worker count."""
        return _parse_models(self._request("GET", "/api/v1/models", timeout=10.0).json())

    def generate(self, request: GenerateRequest) -> Iterator[StreamEvent]:
        """Stream `POST /api/v1/generate`. Errors before the stream raise ControllerError; after, they arrive as
        an `error` event. Closing the iterator closes the stream (the controller then cancels the job)."""
        body = request.model_dump(mode="json", exclude_none=True)
        try:
            with self._http.stream(
                "POST", "/api/v1/generate", json=body, headers={"Accept": "text/event-stream"}
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from_response(response)
                header_job = response.headers.get("x-job-id")
                for event in iter_sse(response.iter_lines()):
                    if header_job and "job_id" not in event.data:
                        event.data["job_id"] = header_job
                    yield event
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def cancel(self, job_id: str) -> None:
        """`POST /api/v1/jobs/{id}/cancel`; a job that already ended is not an error."""
        try:
            self._request("POST", f"/api/v1/jobs/{job_id}/cancel", timeout=10.0)
        except ControllerError as exc:
            if exc.code not in ("job_not_found",) and exc.status_code != 409:
                raise

    def send_feedback(self, feedback: FeedbackRequest) -> str:
        """`POST /api/v1/feedback`; returns the stream entry id."""
        response = self._request("POST", "/api/v1/feedback", json=feedback.model_dump(mode="json"), timeout=30.0)
        return str(response.json().get("entry_id", ""))
