"""A job's start survives a reply Redis sent but the controller never got. redis-py sends a command again when the
connection drops, and the controller retries a job's start through an outage, so Redis may run a step twice while
the controller hears once: the job is queued once (twice, it would run twice into one stream), and the client's
rate limit and fair share count it once."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.limits import _TAKE_SLOT, _TAKE_TOKENS
from contract import keys
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, read_sse, settings_for
from tests.workers.harness import wait_for
from tests.workers.reply_dropping_proxy import ReplyDroppingProxy

MODEL = "tiny-llava"


def sha_of(script: str) -> bytes:
    """What EVALSHA of `script` carries (SCRIPT LOAD carries the text, so loading it is never the marked command)."""
    return hashlib.sha1(script.encode()).hexdigest().encode()


@pytest.fixture
def proxy_to(redis_url: str) -> Iterator:
    proxies: list[ReplyDroppingProxy] = []

    def make(command_marker: bytes) -> ReplyDroppingProxy:
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        proxies.append(ReplyDroppingProxy(port, command_marker, None))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def generate(client: TestClient, worker: ScriptedWorker, reply: str) -> list[tuple[str, dict]]:
    """One request through the controller, served by `worker` once it is queued; its events."""
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        if response.status_code != 200:
            response.read()
            return [("refused", response.json())]
        events = read_sse(response.iter_lines())
        first = next(events)
        serving = worker.in_thread(lambda w: w.serve_one([reply]))
        rest = list(events)
    serving.result()
    return [first, *rest]


def test_an_enqueue_whose_reply_was_lost_queues_the_job_once(redis_client, proxy_to):
    proxy = proxy_to(b"tokens max)")  # the job's description, in the command that saves and queues it
    worker = ScriptedWorker(redis_client).register()
    with TestClient(create_app(settings_for(proxy.url), timings=FAST, run_sweeper=False)) as client:
        with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
            events = read_sse(response.iter_lines())
            kind, first = next(events)
            assert proxy.dropped.is_set(), "the enqueue's reply was never dropped"
            queued = [i.decode() for i in redis_client.lrange(keys.rq_queue(MODEL), 0, -1)]
            assert queued == [first["job_id"]], f"the queue holds {queued}"
            serving = worker.in_thread(lambda w: w.serve_one(["once"]))
            rest = list(events)
        serving.result()
    assert rest[-1][0] == "done" and rest[-1][1]["text"] == "once", rest[-1]
    assert redis_client.llen(keys.rq_queue(MODEL)) == 0


def test_a_rate_limit_charge_whose_reply_was_lost_counts_once(redis_client, proxy_to):
    proxy = proxy_to(sha_of(_TAKE_TOKENS))
    worker = ScriptedWorker(redis_client).register()
    settings = settings_for(proxy.url, rate_limit_requests_per_minute=2)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client:
        first = generate(client, worker, "one")
        assert proxy.dropped.is_set(), "the charge's reply was never dropped"
        second = generate(client, worker, "two")
    assert first[-1][0] == "done", first[-1]
    assert second[-1][0] == "done", f"the second of 2 requests a minute was refused: {second[-1]}"


def test_a_fair_share_slot_whose_reply_was_lost_is_not_held_against_its_own_job(redis_client, proxy_to):
    proxy = proxy_to(sha_of(_TAKE_SLOT))
    worker = ScriptedWorker(redis_client).register()
    settings = settings_for(proxy.url, max_jobs_per_client=1)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client:
        events = generate(client, worker, "mine")
        assert proxy.dropped.is_set(), "the slot's reply was never dropped"
    assert events[-1][0] == "done", f"the client's only job was refused: {events[-1]}"


def test_a_reply_debited_twice_by_a_lost_reply_is_counted_once(redis_client, proxy_to):
    proxy = proxy_to(b"debit")  # the charge of a reply's tokens once it ends ('debit' is not in the script's text)
    worker = ScriptedWorker(redis_client).register()
    settings = settings_for(proxy.url, rate_limit_tokens_per_minute=10, max_jobs_per_client=5)
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client:
        events = generate(client, worker, "abcdef")  # 6 tokens
        assert events[-1][0] == "done", events[-1]
        # the job's slot is released after its tokens are debited, so the bookkeeping is over once the slot is free
        wait_for(lambda: redis_client.zcard(keys.client_jobs("testclient")) == 0, what="the job's end bookkeeping")
    assert proxy.dropped.is_set(), "the debit's reply was never dropped"
    level = float(redis_client.hget(keys.rate_bucket("testclient", "tokens"), "level"))
    assert 3.9 <= level <= 4.5, f"10 tokens a minute less a 6-token reply left {level:.2f}"
