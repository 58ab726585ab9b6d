"""A client that gives up on a non-streaming OpenAI request cancels its job, as a streaming client does: the app is
called over ASGI directly so that the test decides when the client's disconnect arrives. Real Redis, scripted
worker."""

from __future__ import annotations

import json
import threading

import anyio.to_thread
import pytest
import redis
from fastapi.testclient import TestClient

from contract import keys
from contract.messages import ErrorEvent
from tests.broker.scripted_worker import ScriptedWorker, chat_body


def asgi_post(path: str, body: dict, gone: threading.Event, statuses: list[int]):
    """An ASGI request: the body, then (once `gone` is set) the client's disconnect. Response statuses go to
    `statuses`."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    sent: list[bool] = []

    async def receive() -> dict:
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": raw, "more_body": False}
        await anyio.to_thread.run_sync(gone.wait)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    return scope, receive, send


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat_body(max_tokens=500)),
        ("/v1/completions", {"model": "tiny-llava", "prompt": "USER: hi ASSISTANT:", "max_tokens": 500}),
    ],
)
def test_a_client_that_gives_up_on_a_whole_reply_cancels_its_job(
    client: TestClient, worker: ScriptedWorker, redis_client: redis.Redis, path: str, body: dict
) -> None:
    gone = threading.Event()
    statuses: list[int] = []
    future = client.portal.start_task_soon(client.app, *asgi_post(path, body, gone, statuses))
    job = worker.stream_then_hold(["still ", "going"])
    try:
        gone.set()  # the client gives up while its job runs
        future.result(timeout=10)
        assert redis_client.get(keys.cancel(job.job_id)) is not None  # the worker stops at its next step
        assert statuses == [499]
    finally:
        gone.set()
        stop = ErrorEvent(job_id=job.job_id, code="test_cleanup", message="ends a stream the test left")
        worker.publish(stop)
        future.result(timeout=10)
