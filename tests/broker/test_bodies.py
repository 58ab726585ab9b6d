"""Request bodies: large ones are parsed in the parser's processes, not on the event loop; every body's JSON values
are counted from its bytes and refused past the limit; validation errors are capped; the pool ends with the app.
Real Redis, the app in-process."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import BaseModel, model_validator

from broker.app import create_app
from broker.bodies import MAX_REPORTED_ERRORS, BodyParser, count_json_values
from tests.broker.scripted_worker import FAST, chat_body, settings_for

HOLD_S = 10.0


def walk_count(value: object) -> int:
    """The reference count: every value, containers included, object keys not."""
    if isinstance(value, dict):
        return 1 + sum(walk_count(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(walk_count(v) for v in value)
    return 1


DOCUMENTS = [
    {},
    [],
    0,
    "text",
    {"a": 1, "b": [True, False, None, -1.5e10, "x"], "c": {"d": {}}},
    {'quote " and \\ backslash': 'value with \\" and \\\\" and ] [ { } , :', "n": [[], [[]], [1, [2, [3]]]]},
    {"unicode": "héllo ☃ \u0000", "numbers": [0, -0, 1e-5, 12345678901234567890, 3.25]},
    chat_body(text="describe, this: [image] {please}"),
    [{"role": "user", "content": "a"}] * 50,
]


@pytest.mark.parametrize("document", DOCUMENTS, ids=range(len(DOCUMENTS)))
@pytest.mark.parametrize("indent", [None, 2])
def test_values_are_counted_from_the_bytes_as_a_parser_would(document: object, indent: int | None) -> None:
    body = json.dumps(document, indent=indent, ensure_ascii=False).encode()
    assert count_json_values(body) == walk_count(document)


@pytest.fixture
def small_limits_client(redis_url: str, redis_client: redis.Redis):
    settings = settings_for(redis_url, max_body_values=200, body_inline_max_bytes=4096)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client:
        yield client


@pytest.mark.parametrize("messages", [100, 400], ids=["inline", "in-a-process"])
@pytest.mark.parametrize("path", ["/api/v1/generate", "/v1/chat/completions", "/api/v1/feedback"])
def test_a_body_with_too_many_values_is_refused_naming_the_limit(small_limits_client, path, messages) -> None:
    body = {"type": "flag", "model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}] * messages}
    assert (len(json.dumps(body)) > 4096) == (messages == 400)
    reply = small_limits_client.post(path, json=body)
    assert reply.status_code == 413, reply.text
    message = reply.json()["error"]["message"]
    assert "over the limit of 200 (max_body_values)" in message


def test_validation_errors_are_capped(client) -> None:
    body = chat_body()
    body["messages"] = [{"role": "nobody", "content": "hi"}] * 1000  # 1000 bad roles, each one error or more
    reply = client.post("/api/v1/generate", json=body)
    assert reply.status_code == 422
    error = reply.json()["error"]
    assert len(error["fields"]) == MAX_REPORTED_ERRORS
    assert f"(the first {MAX_REPORTED_ERRORS} are listed in fields)" in error["message"]
    assert len(reply.content) < 64 * 1024


class HeldBody(BaseModel):
    """A body whose validation waits (in whichever process parses it) until the test creates `release`."""

    hold_dir: str
    released: bool = False

    @model_validator(mode="after")
    def hold(self) -> HeldBody:
        Path(self.hold_dir, "started").touch()
        deadline = time.monotonic() + HOLD_S
        while not Path(self.hold_dir, "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.released = Path(self.hold_dir, "release").exists()
        return self


def test_a_large_body_is_parsed_while_the_event_loop_runs_on(tmp_path: Path) -> None:
    """The parse is held until the loop has run on after it started: a parse on the loop would never see that."""
    parser = BodyParser(max_bytes=1 << 20, max_values=100, inline_max_bytes=64)
    body = json.dumps({"hold_dir": str(tmp_path), "padding": "a" * 1000}).encode()

    async def run() -> HeldBody:
        parsing = asyncio.ensure_future(parser.parse(body, HeldBody))
        deadline = time.monotonic() + HOLD_S * 3  # the first large body also starts a process
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        (tmp_path / "release").touch()  # the loop ran while the body was being parsed
        return await parsing

    try:
        parsed = asyncio.run(run())
    finally:
        parser.close()
    assert parsed.released, "the parse was released only after it gave up: it ran on the event loop"


def test_the_parser_processes_end_with_the_app_and_leave_no_files(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where large bodies are written for the parser
    settings = settings_for(redis_url, body_inline_max_bytes=0)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client:
        reply = client.post("/api/v1/generate", json=chat_body(model="not-served"))
        assert reply.status_code == 404
        pids = client.app.state.ctx.bodies.process_ids()
        assert pids
        for pid in pids:
            os.kill(pid, 0)  # alive while the app runs
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert list(tmp_path.iterdir()) == []
