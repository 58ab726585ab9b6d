"""Fencing: a worker writes nothing for a job that is no longer in its job table (a sweeper requeued or failed it)."""

from __future__ import annotations

import time

import pytest

from contract import claims, jobs, keys, ownership
from contract.messages import FinishReason, JobOutcome, JobRequest, TokenEvent, parse_event

MODEL = "m"


def _enqueue(client, job_id: str, controller_id: str | None = None) -> JobRequest:
    request = JobRequest(job_id=job_id, model=MODEL, prompt="hi", controller_id=controller_id)
    jobs.enqueue(client, request, max_queue=100, result_ttl=600)
    return request


def _queue(client) -> list[str]:
    return [i.decode() for i in client.lrange(keys.rq_queue(MODEL), 0, -1)]


def _table(client, worker_id: str = "w1") -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.worker_jobs(worker_id)).items()}


def _step(client, worker_id: str, step: list[tuple[str, str]]) -> list[int]:
    with client.pipeline(transaction=False) as pipe:
        ownership.queue_step(pipe, worker_id, step)
        (raw,) = pipe.execute()
    return ownership.step_replies(raw)


def _token(job_id: str, text: str) -> str:
    return TokenEvent(job_id=job_id, text=text, seq=1).model_dump_json()


def _started(client, *job_ids: str, worker_id: str = "w1") -> None:
    for job_id in job_ids:
        _enqueue(client, job_id)
    for request in claims.claim(client, worker_id, MODEL, len(job_ids)):
        assert jobs.start_claimed(client, worker_id, request) is False


def test_a_step_publishes_only_for_jobs_the_worker_still_holds(redis_client):
    _started(redis_client, "a", "b", "c")
    jobs.requeue(redis_client, "w1", "b")  # as a sweeper does for a frozen worker
    claims.claim(redis_client, "w1", MODEL, 1)  # ... and the same worker claims it again: a new run, not the old one
    redis_client.set(keys.cancel("c"), "1")
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.chunks("a"), keys.chunks("b"), keys.chunks("c"))
    try:
        replies = _step(redis_client, "w1", [("a", _token("a", "x")), ("b", _token("b", "y")), ("c", "")])
        assert replies == [0, ownership.TAKEN_AWAY, 1]
        assert _table(redis_client) == {"a": "streaming", "b": "claimed", "c": "started"}
        received = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not received:
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                received.append(parse_event(message["data"]))
        assert [(e.job_id, e.text) for e in received] == [("a", "x")]
        assert pubsub.get_message(timeout=0.3) is None
    finally:
        pubsub.close()


def test_put_back_returns_only_the_jobs_still_held(redis_client):
    for job_id in "abc":
        _enqueue(redis_client, job_id)
    claims.claim(redis_client, "w1", MODEL, 3)
    jobs.requeue(redis_client, "w1", "b")  # taken away and queued by a sweeper
    assert claims.put_back(redis_client, "w1", MODEL, ["a", "b", "c"]) == 2
    assert _queue(redis_client) == ["a", "c", "b"]  # b is not queued twice
    assert _table(redis_client) == {}


def test_a_fenced_finish_writes_nothing_for_a_job_taken_away(redis_client):
    _started(redis_client, "a")
    jobs.requeue(redis_client, "w1", "a")
    claims.claim(redis_client, "w2", MODEL, 1)  # another worker runs it now
    outcome = JobOutcome(job_id="a", status="finished", finish_reason=FinishReason.eos, text="stale")
    assert jobs.finish(redis_client, "w1", outcome, fenced=True) is False
    view = jobs.view(redis_client, "a")
    assert view.status == "queued" and view.outcome is None
    assert _table(redis_client, "w2") == {"a": "claimed"}
    done = JobOutcome(job_id="a", status="finished", finish_reason=FinishReason.eos, text="fresh")
    assert jobs.finish(redis_client, "w2", done, fenced=True) is True
    assert jobs.view(redis_client, "a").outcome.text == "fresh"


def test_a_fenced_requeue_of_a_job_taken_away_does_nothing(redis_client):
    _started(redis_client, "a")
    jobs.requeue(redis_client, "w1", "a")
    assert jobs.requeue(redis_client, "w1", "a", fenced=True) is False
    assert _queue(redis_client) == ["a"]


def test_start_claimed_refuses_a_job_taken_away_since_the_claim(redis_client):
    _enqueue(redis_client, "a")
    (request,) = claims.claim(redis_client, "w1", MODEL, 1)
    jobs.requeue(redis_client, "w1", "a")
    with pytest.raises(ownership.NotOwned):
        jobs.start_claimed(redis_client, "w1", request)
    assert jobs.view(redis_client, "a").status == "queued"
    assert _table(redis_client) == {}


def test_start_claimed_does_not_start_a_job_whose_controller_lease_is_gone(redis_client):
    for job_id, controller_id in (("orphan", "dead"), ("served", "alive"), ("unjudged", "dead")):
        _enqueue(redis_client, job_id, controller_id=controller_id)
    redis_client.delete(keys.controller("dead"))  # enqueue wrote it; the controller died since
    orphan, served, unjudged = claims.claim(redis_client, "w1", MODEL, 3)
    assert jobs.start_claimed(redis_client, "w1", orphan, judge_lease=True) is True
    assert jobs.start_claimed(redis_client, "w1", served, judge_lease=True) is False
    assert jobs.start_claimed(redis_client, "w1", unjudged, judge_lease=False) is False  # e.g. right after an outage
    assert jobs.fetch_job(redis_client, "orphan").started_at is None  # never marked started
    assert _table(redis_client) == {"orphan": "claimed", "served": "started", "unjudged": "started"}


def test_enqueue_writes_the_controllers_lease_with_its_ttl(redis_client):
    _enqueue(redis_client, "a", controller_id="c1")
    assert 0 < redis_client.ttl(keys.controller("c1")) <= keys.CONTROLLER_LEASE_TTL_S


def test_settling_does_not_forget_a_worker_that_came_back(redis_client):
    _started(redis_client, "a")
    redis_client.sadd(keys.workers(), "w1")
    redis_client.set(keys.worker("w1"), "{}")  # it woke up and beat again before the sweeper was done
    jobs.settle_worker(redis_client, "w1", jobs.Settled())
    assert _queue(redis_client) == ["a"]
    assert redis_client.sismember(keys.workers(), "w1")
