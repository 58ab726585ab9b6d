"""Per-client limits across two controller replicas on one Redis: the fair share (jobs held at once) and the rate
limits (requests and generated tokens per minute). Real Redis, scripted worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.limits import key_name
from contract import keys
from contract.identity import END_USER_HEADER
from contract.messages import FinishReason
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, read_sse, settings_for
from tests.broker.test_stream_life import wait_for

KEY_A, KEY_B = "key-of-a", "key-of-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@contextlib.contextmanager
def two_controllers(redis_url: str, **overrides) -> Iterator[tuple[TestClient, TestClient]]:
    """Two controller apps (replicas) on the same Redis, both checking the same API keys."""
    settings = settings_for(redis_url, api_keys=f"{KEY_A},{KEY_B}", **overrides)
    with (
        TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as first,
        TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as second,
    ):
        yield first, second


def held(client: redis.Redis, key: str) -> int:
    return client.zcard(keys.client_jobs(key_name(key)))


def test_one_client_cannot_hold_more_jobs_than_its_share_across_replicas(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    with two_controllers(redis_url, max_jobs_per_client=2) as (first, second):
        with (
            first.stream("POST", "/api/v1/generate", json=chat_body(), headers=A) as one,
            second.stream("POST", "/api/v1/generate", json=chat_body(), headers=A) as two,
        ):
            events_one = read_sse(one.iter_lines())
            assert next(events_one)[0] == "queued"
            events_two = read_sse(two.iter_lines())
            assert next(events_two)[0] == "queued"
            assert held(redis_client, KEY_A) == 2

            refused = first.post("/api/v1/generate", json=chat_body(), headers=A)
            assert refused.status_code == 429
            assert refused.headers["Retry-After"] == "5"
            error = refused.json()["error"]
            assert error["code"] == "rate_limited"
            assert "max_jobs_per_client" in error["message"] and "cap per client is 2" in error["message"]
            openai = second.post("/v1/chat/completions", json=chat_body(), headers=A)
            assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"

            # Another client is not held back by the first one's jobs.
            with second.stream("POST", "/api/v1/generate", json=chat_body(), headers=B) as other:
                events_other = read_sse(other.iter_lines())
                assert next(events_other)[0] == "queued"
            wait_for(lambda: held(redis_client, KEY_B) == 0)  # its client went away: released

            # A's first job ends (served to the end): A may submit again.
            worker.serve_one(["hi"])
            assert list(events_one)[-1][0] == "done"
            wait_for(lambda: held(redis_client, KEY_A) == 1)
            with first.stream("POST", "/api/v1/generate", json=chat_body(), headers=A) as again:
                assert again.status_code == 200
        wait_for(lambda: held(redis_client, KEY_A) == 0)  # the other one: its client went away


def test_a_failed_job_and_a_refused_enqueue_release_the_slot(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    with two_controllers(redis_url, max_jobs_per_client=1, max_queue=1) as (first, second):
        thread = worker.in_thread(lambda w: w.stream_then_fail(["x"], "generation_failed", "boom"))
        failed = first.post("/v1/chat/completions", json=chat_body(), headers=A)
        thread.result()
        assert failed.status_code == 500 and held(redis_client, KEY_A) == 0

        with second.stream("POST", "/api/v1/generate", json=chat_body(), headers=B) as waiting:
            events = read_sse(waiting.iter_lines())  # kept: a dropped reader closes the stream
            assert next(events)[0] == "queued"
            full = first.post("/api/v1/generate", json=chat_body(), headers=A)  # the model's queue is full
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert held(redis_client, KEY_A) == 0


def test_requests_per_minute_hold_across_replicas(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    with two_controllers(redis_url, rate_limit_requests_per_minute=2) as (first, second):
        for controller in (first, second):
            thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
            assert controller.post("/v1/chat/completions", json=chat_body(), headers=A).status_code == 200
            thread.result()
        refused = first.post("/v1/chat/completions", json=chat_body(), headers=A)
        assert refused.status_code == 429
        assert "2 requests per minute" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 30
        thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
        assert second.post("/v1/chat/completions", json=chat_body(), headers=B).status_code == 200
        thread.result()


def test_generated_tokens_per_minute_are_counted_when_a_reply_ends(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    with two_controllers(redis_url, rate_limit_tokens_per_minute=5) as (first, second):
        # The scripted worker counts one token per character: a 6-character reply overdraws the bucket.
        thread = worker.in_thread(lambda w: w.serve_one(["abc", "def"], FinishReason.length))
        done = first.post("/v1/chat/completions", json=chat_body(), headers=A)
        thread.result()
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 6
        refused = second.post("/api/v1/generate", json=chat_body(), headers=A)
        assert refused.status_code == 429
        message = refused.json()["error"]["message"]
        assert "5 generated tokens per minute" in message and key_name(KEY_A) in message
        assert KEY_A not in message
        assert int(refused.headers["Retry-After"]) >= 1
        assert redis_client.pttl(keys.rate_bucket(key_name(KEY_A), "tokens")) > 0


def test_limits_are_off_by_default(redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker) -> None:
    with two_controllers(redis_url) as (first, _):
        for _ in range(3):
            thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
            assert first.post("/v1/chat/completions", json=chat_body(), headers=A).status_code == 200
            thread.result()
    assert not redis_client.keys(keys.client_jobs("*")) and not redis_client.keys(keys.rate_bucket("*", "*"))


def test_the_flags_set_the_limits_log_and_retention() -> None:
    import argparse

    from broker.app import add_controller_arguments, controller_settings_from_args

    parser = argparse.ArgumentParser()
    add_controller_arguments(parser)
    args = parser.parse_args(
        "--max-jobs-per-client 4 --rate-limit-requests-per-minute 60 --rate-limit-tokens-per-minute 9000 "
        "--log-conversations --log-retention-days 7 --log-retention-entries 500 --feedback-retention-days 90 "
        "--feedback-retention-entries 1000".split()
    )
    settings = controller_settings_from_args(args)
    assert (settings.max_jobs_per_client, settings.rate_limit_requests_per_minute) == (4, 60)
    assert settings.rate_limit_tokens_per_minute == 9000 and settings.log_conversations
    assert (settings.log_retention_days, settings.log_retention_entries) == (7, 500)
    assert (settings.feedback_retention_days, settings.feedback_retention_entries) == (90, 1000)


UI_KEY = "key-of-the-page"
UI = {"Authorization": f"Bearer {UI_KEY}"}


def as_user(headers: dict[str, str], user: str) -> dict[str, str]:
    return {**headers, END_USER_HEADER: user}


def test_each_user_of_a_trusted_page_gets_their_own_share(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    settings = settings_for(redis_url, api_keys=f"{KEY_A},{UI_KEY}", trusted_ui_keys=UI_KEY, max_jobs_per_client=1)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as controller:
        with controller.stream("POST", "/api/v1/generate", json=chat_body(), headers=as_user(UI, "alice")) as alice:
            alice_events = read_sse(alice.iter_lines())  # kept: a dropped reader closes the stream
            assert next(alice_events)[0] == "queued"
            # Bob uses the page's key too, but his share is his own.
            with controller.stream("POST", "/api/v1/generate", json=chat_body(), headers=as_user(UI, "bob")) as bob:
                bob_events = read_sse(bob.iter_lines())
                assert next(bob_events)[0] == "queued"
                again = controller.post("/api/v1/generate", json=chat_body(), headers=as_user(UI, "alice"))
                assert again.status_code == 429
                assert f"{key_name(UI_KEY)}:user:alice" in again.json()["error"]["message"]
                assert redis_client.zcard(keys.client_jobs(f"{key_name(UI_KEY)}:user:bob")) == 1


def test_an_untrusted_key_cannot_name_another_user(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    settings = settings_for(redis_url, api_keys=f"{KEY_A},{UI_KEY}", trusted_ui_keys=UI_KEY, max_jobs_per_client=1)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as controller:
        with controller.stream("POST", "/api/v1/generate", json=chat_body(), headers=as_user(A, "alice")) as one:
            events = read_sse(one.iter_lines())  # kept: a dropped reader closes the stream
            assert next(events)[0] == "queued"
            assert held(redis_client, KEY_A) == 1  # counted against the key, not the user it named
            spoofed = controller.post("/api/v1/generate", json=chat_body(), headers=as_user(A, "bob"))
            assert spoofed.status_code == 429 and key_name(KEY_A) in spoofed.json()["error"]["message"]
            # A malformed header from an untrusted key is ignored like any other.
            odd = controller.post("/api/v1/generate", json=chat_body(), headers=as_user(A, "x" * 500))
            assert odd.status_code == 429
            assert not redis_client.keys(keys.client_jobs("*:user:*"))


@pytest.mark.parametrize(
    ("user", "problem"),
    [("", "is empty"), ("x" * 129, "over the limit of 128"), ("bob smith", "may hold only"), ("a/b", "may hold only")],
)
def test_a_trusted_page_naming_a_bad_user_gets_a_clear_400(
    redis_url: str, worker: ScriptedWorker, user: str, problem: str
) -> None:
    settings = settings_for(redis_url, api_keys=UI_KEY, trusted_ui_keys=UI_KEY)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as controller:
        refused = controller.post("/api/v1/generate", json=chat_body(), headers=as_user(UI, user))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "invalid_request" and END_USER_HEADER in error["message"] and problem in error["message"]


def test_trusted_ui_keys_must_be_api_keys(redis_url: str) -> None:
    with pytest.raises(ValueError, match="need API keys"):
        create_app(settings_for(redis_url, trusted_ui_keys=UI_KEY), run_sweeper=False)
    with pytest.raises(ValueError, match="not one of the API keys"):
        create_app(settings_for(redis_url, api_keys=KEY_A, trusted_ui_keys=UI_KEY), run_sweeper=False)
