"""The client's SSE parser, event parsing and error reading, without a controller."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import ValidationError

from contract.client import aiter_sse, error_from_response, iter_sse, parse_event
from contract.errors import ErrorCode, ImageInvalid, InvalidRequest, LlavaError, QueueFull
from contract.messages import QueuedEvent, TokenEvent

LINES = [
    ": ping",
    "event: queued",
    'data: {"type": "queued", "job_id": "j", "position": 2}',
    "",
    'data: {"type": "token",',
    'data: "job_id": "j", "text": "hi", "seq": 1}',
]


def test_sse_lines_become_typed_events():
    raw = list(iter_sse(iter(LINES)))
    assert raw[0] == ("queued", '{"type": "queued", "job_id": "j", "position": 2}')
    events = [parse_event(event, data) for event, data in raw]
    assert events == [QueuedEvent(job_id="j", position=2), TokenEvent(job_id="j", text="hi", seq=1)]


def test_the_async_parser_reads_the_same_events():
    async def lines():
        for line in LINES:
            yield line

    async def collect():
        return [pair async for pair in aiter_sse(lines())]

    assert asyncio.run(collect()) == list(iter_sse(LINES))


def test_an_event_that_is_not_its_name_or_not_an_event_is_refused():
    with pytest.raises(ValueError, match="'done' carries a 'token' event"):
        parse_event("done", '{"type": "token", "job_id": "j", "text": "x"}')
    with pytest.raises(ValidationError):
        parse_event("queued", '{"type": "queued", "job_id": "j", "position": "soon"}')


def test_an_error_body_becomes_its_error_class():
    body = {"error": {"code": "invalid_image", "message": "cannot be decoded"}}
    error = error_from_response(httpx.Response(400, json=body))
    assert isinstance(error, ImageInvalid) and (error.status_code, error.message) == (400, "cannot be decoded")
    full = {"error": {"code": "queue_full", "message": "full"}}
    error = error_from_response(httpx.Response(429, json=full, headers={"Retry-After": "7"}))
    assert isinstance(error, QueueFull) and error.retry_after == 7


def test_a_body_not_from_the_controller_keeps_its_status_and_text():
    error = error_from_response(httpx.Response(502, text="bad gateway"))
    assert type(error) is LlavaError and (error.code, error.status_code, error.message) == (
        "http_502",
        502,
        "bad gateway",
    )
    error = error_from_response(httpx.Response(422, json={"detail": "no"}))
    assert isinstance(error, InvalidRequest) and error.code == ErrorCode.invalid_request and error.message == "no"
