"""Moderation before enqueueing: a word list from a file, and a client of OpenAI's moderation API shape checked
against a local HTTP server implementing it. A flagged request is refused (400 naming why), never enqueued, counted
and logged. Real Redis, two controllers, scripted worker."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from broker.app import create_app
from broker.convlog import read_conversations
from broker.moderation import ModerationApi, ReplyModeration
from contract import jobs, keys
from tests.broker.scripted_worker import ScriptedWorker, chat_body, read_sse, settings_for
from tests.broker.test_limits import A, two_controllers


class ModerationServer:
    """OpenAI's `POST /v1/moderations` shape: flags an input that contains "hateful" (category `hate`)."""

    def __init__(self) -> None:
        self.inputs: list[list[str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.inputs.append(body["input"])
                results = [
                    {"flagged": "hateful" in text, "categories": {"hate": "hateful" in text, "violence": False},
                     "category_scores": {"hate": 0.9 if "hateful" in text else 0.0, "violence": 0.0}}
                    for text in body["input"]
                ]  # fmt: skip
                payload = json.dumps({"id": "modr-1", "model": "local", "results": results}).encode()
                self.send_response(200 if self.path == "/v1/moderations" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/moderations"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def moderation_server() -> Iterator[ModerationServer]:
    server = ModerationServer()
    yield server
    server.close()


def test_a_word_list_refuses_matching_user_text_before_it_is_enqueued(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker, tmp_path: Path
) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# refused words\nforbidden\nbad\\s+thing  # a regular expression\n")
    with two_controllers(redis_url, moderation_words_file=words, log_conversations=True) as (first, second):
        refused = first.post("/api/v1/generate", json=chat_body(text="say something FORBIDDEN"), headers=A)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "content_refused"
        assert "entry `forbidden`" in refused.json()["error"]["message"]
        legacy = {"model": "tiny-llava", "prompt": "USER: a bad   thing ASSISTANT:"}
        openai = second.post("/v1/completions", json=legacy, headers=A)
        assert openai.status_code == 400 and "entry `bad\\s+thing`" in openai.json()["error"]["message"]
        assert redis_client.llen(keys.rq_queue("tiny-llava")) == 0  # nothing reached the queue
        thread = worker.in_thread(lambda w: w.serve_one(["fine"]))
        assert second.post("/v1/chat/completions", json=chat_body(text="a kind word"), headers=A).status_code == 200
        thread.result()
    assert redis_client.hget(keys.refusals(), "content_refused") == b"2"
    logged = read_conversations(redis_client)
    assert [(r.finish_reason, r.error_code) for r in logged] == [
        ("error", "content_refused"),
        ("error", "content_refused"),
        ("eos", None),
    ]


def test_the_moderation_api_client_refuses_what_the_service_flags(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker, moderation_server: ModerationServer
) -> None:
    with two_controllers(redis_url, moderation_url=moderation_server.url) as (first, second):
        body = chat_body(text="something hateful")
        body["messages"].insert(0, {"role": "system", "content": "be nice"})
        refused = second.post("/v1/chat/completions", json=body, headers=A)
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == "the request was refused by moderation: flagged for hate"
        assert moderation_server.inputs == [["something hateful"]]  # the user's text, not the system prompt
        thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
        assert first.post("/v1/chat/completions", json=chat_body(text="hello"), headers=A).status_code == 200
        thread.result()
        assert moderation_server.inputs[-1] == ["hello"]
    assert redis_client.llen(keys.rq_queue("tiny-llava")) == 0


def test_a_moderation_service_that_does_not_answer_refuses_the_request(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker, moderation_server: ModerationServer
) -> None:
    url = moderation_server.url
    moderation_server.close()
    with two_controllers(redis_url, moderation_url=url) as (first, _):
        refused = first.post("/api/v1/generate", json=chat_body(text="hello"), headers=A)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "moderation_unavailable"
    assert redis_client.llen(keys.rq_queue("tiny-llava")) == 0


def test_rate_limit_refusals_are_counted_across_replicas(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    with two_controllers(redis_url, rate_limit_requests_per_minute=1) as (first, second):
        thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
        assert first.post("/v1/chat/completions", json=chat_body(), headers=A).status_code == 200
        thread.result()
        assert first.post("/v1/chat/completions", json=chat_body(), headers=A).status_code == 429
        assert second.post("/api/v1/generate", json=chat_body(), headers=A).status_code == 429
    assert redis_client.hget(keys.refusals(), "rate_limited") == b"2"


def test_status_and_metrics_show_the_log_size_and_refusals(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker, tmp_path: Path
) -> None:
    from broker.status import render, snapshot

    words = tmp_path / "words.txt"
    words.write_text("forbidden\n")
    settings = {"moderation_words_file": words, "log_conversations": True, "rate_limit_requests_per_minute": 2}
    with two_controllers(redis_url, **settings) as (first, second):
        thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
        assert first.post("/v1/chat/completions", json=chat_body(), headers=A).status_code == 200
        thread.result()
        assert second.post("/v1/chat/completions", json=chat_body(text="forbidden"), headers=A).status_code == 400
        assert first.post("/v1/chat/completions", json=chat_body(), headers=A).status_code == 429
        exposition = second.get("/metrics").text
    report = snapshot(redis_client)
    assert report.conversation_log_entries == 2 and report.refusals == {"rate_limited": 1, "content_refused": 1}
    assert "CONVERSATION LOG 2 entries; REFUSED content_refused 1, rate_limited 1" in render(report)
    assert "llava_conversation_log_entries 2.0" in exposition
    assert 'llava_requests_refused_total{code="rate_limited"} 1.0' in exposition
    assert 'llava_requests_refused_total{code="content_refused"} 1.0' in exposition


# ---- Replies, as they stream --------------------------------------------------------------------------------------


def word_file(tmp_path: Path) -> Path:
    words = tmp_path / "words.txt"
    words.write_text("forbidden\n")
    return words


def test_a_streaming_reply_is_stopped_at_the_check_that_flags_it(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker, tmp_path: Path
) -> None:
    settings = {"moderation_words_file": word_file(tmp_path), "moderate_replies": True, "log_conversations": True}
    with two_controllers(redis_url, moderation_reply_interval_chars=10, **settings) as (first, _):
        thread = worker.in_thread(lambda w: w.stream_then_hold(["hello ", "there ", "a forbidden ", "word"]))
        with first.stream("POST", "/api/v1/generate", json=chat_body(text="hi"), headers=A) as reply:
            events = list(read_sse(reply.iter_lines()))
        job = thread.result()
        exposition = first.get("/metrics").text
    # Checked at 12 characters ("hello there ", passes) and at 24 (flagged): the flagged piece never reaches the client.
    assert [(name, data.get("text")) for name, data in events[1:-1]] == [("token", "hello "), ("token", "there ")]
    name, error = events[-1]
    assert name == "error" and error["code"] == "reply_flagged"
    assert error["message"] == "the reply was stopped by moderation: its text matches the word list entry `forbidden`"
    assert jobs.is_cancel_requested(redis_client, job.job_id)
    assert redis_client.hget(keys.refusals(), "reply_flagged") == b"1"
    assert 'llava_requests_refused_total{code="reply_flagged"} 1.0' in exposition
    (record,) = read_conversations(redis_client)
    assert (record.finish_reason, record.error_code) == ("error", "reply_flagged")
    assert record.reply == "hello there a forbidden "  # the log keeps what the model wrote


def test_a_reply_is_checked_at_its_end_on_every_endpoint(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker, tmp_path: Path
) -> None:
    settings = {"moderation_words_file": word_file(tmp_path), "moderate_replies": True}
    with two_controllers(redis_url, **settings) as (first, second):  # 400 characters: only the end is checked
        thread = worker.in_thread(lambda w: w.serve_one(["a forbidden", " word"]))
        whole = first.post("/v1/chat/completions", json=chat_body(text="hi"), headers=A)
        thread.result()
        assert whole.status_code == 400 and whole.json()["error"]["code"] == "reply_flagged"
        thread = worker.in_thread(lambda w: w.serve_one(["forbidden"]))
        llava = second.post(
            "/worker_generate_stream", json={"model": "tiny-llava", "prompt": "USER: hi ASSISTANT:"}, headers=A
        )
        thread.result()
        assert json.loads(llava.content.rstrip(b"\0").split(b"\0")[-1])["error"]["code"] == "reply_flagged"
        thread = worker.in_thread(lambda w: w.serve_one(["a kind", " word"]))
        fine = first.post("/v1/chat/completions", json=chat_body(text="hi"), headers=A)
        thread.result()
        assert fine.status_code == 200 and fine.json()["choices"][0]["message"]["content"] == "a kind word"
    assert redis_client.hget(keys.refusals(), "reply_flagged") == b"2"


def test_the_moderation_api_checks_replies_as_they_stream(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker, moderation_server: ModerationServer
) -> None:
    settings = {"moderation_url": moderation_server.url, "moderate_replies": True}
    with two_controllers(redis_url, moderation_reply_interval_chars=5, **settings) as (first, _):
        thread = worker.in_thread(lambda w: w.stream_then_hold(["nice ", "and hateful", " more"]))
        body = {**chat_body(text="hi"), "stream": True}
        with first.stream("POST", "/v1/chat/completions", json=body, headers=A) as reply:
            chunks = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
        job = thread.result()
    assert moderation_server.inputs == [["hi"], ["nice "], ["nice and hateful"]]
    error = json.loads(chunks[-2])["error"]
    assert error["code"] == "reply_flagged" and error["message"].endswith("flagged for hate")
    assert chunks[-1] == "[DONE]"
    assert "hateful" not in "".join(chunks[:-2])
    assert jobs.is_cancel_requested(redis_client, job.job_id)


def test_replies_need_a_moderator(redis_url: str) -> None:
    with pytest.raises(ValueError, match="moderate_replies needs a moderator"):
        create_app(settings_for(redis_url, moderate_replies=True))


def test_a_moderation_service_that_fails_mid_reply_ends_it(moderation_server: ModerationServer) -> None:
    url = moderation_server.url
    moderation_server.close()
    checker = ReplyModeration(None, [ModerationApi(url, timeout_s=2.0)], interval_chars=10)  # type: ignore[arg-type]
    refusal = asyncio.run(checker.verdict("job-1", "some reply text"))
    assert refusal is not None and refusal.code == "moderation_unavailable"
