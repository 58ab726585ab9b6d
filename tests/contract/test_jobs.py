"""The rq job lifecycle against a real Redis: enqueue, start, finish, cancel, requeue."""

from __future__ import annotations

import pytest

from contract import claims, jobs, keys
from contract.errors import QueueFull
from contract.messages import ClaimState, FinishReason, JobOutcome, JobRequest, Usage
from tests.contract.queued import MODEL, enqueue, queue, table


def test_enqueue_claim_start_finish(redis_client):
    enqueue(redis_client, "a")
    assert jobs.view(redis_client, "a").status == "queued"
    assert jobs.view(redis_client, "a").position == 0

    claimed = claims.claim(redis_client, "w1", MODEL, 4)
    assert [r.job_id for r in claimed] == ["a"]
    assert table(redis_client) == {"a": ClaimState.claimed.value}
    assert queue(redis_client) == []

    assert jobs.mark_started(redis_client, "w1", "a") is not None
    assert jobs.view(redis_client, "a").status == "started"
    assert table(redis_client) == {"a": ClaimState.started.value}

    outcome = JobOutcome(
        job_id="a", status="finished", finish_reason=FinishReason.eos, text="hello", usage=Usage(completion_tokens=1)
    )
    jobs.finish(redis_client, "w1", outcome)
    view = jobs.view(redis_client, "a")
    assert view.status == "finished"
    assert view.outcome.text == "hello"
    assert view.outcome.worker_id == "w1"
    assert table(redis_client) == {}
    assert 0 < redis_client.ttl("rq:job:a") <= 600


def test_cancel_of_a_queued_job_removes_it_at_once(redis_client):
    enqueue(redis_client, "a")
    enqueue(redis_client, "b")
    assert jobs.request_cancel(redis_client, "a", MODEL) is True
    assert queue(redis_client) == ["b"]
    view = jobs.view(redis_client, "a")
    assert view.status == "canceled"
    assert view.outcome.finish_reason == FinishReason.cancelled
    assert jobs.is_cancel_requested(redis_client, "a")
    assert 0 < redis_client.ttl(keys.cancel("a")) <= 60


def test_cancel_of_a_claimed_job_only_sets_the_flag(redis_client):
    enqueue(redis_client, "a")
    claims.claim(redis_client, "w1", MODEL, 1)
    assert jobs.request_cancel(redis_client, "a", MODEL) is False
    assert jobs.is_cancel_requested(redis_client, "a")
    assert 0 < redis_client.ttl(keys.cancel("a")) <= keys.CANCEL_TTL_S


def test_requeue_puts_a_started_job_back_first(redis_client):
    for job_id in "ab":
        enqueue(redis_client, job_id)
    claims.claim(redis_client, "w1", MODEL, 1)
    jobs.mark_started(redis_client, "w1", "a")
    assert jobs.requeue(redis_client, "w1", "a") is True
    assert queue(redis_client) == ["a", "b"]
    assert jobs.view(redis_client, "a").status == "queued"
    assert table(redis_client) == {}
    # and it can be claimed and finished again
    assert [r.job_id for r in claims.claim(redis_client, "w2", MODEL, 1)] == ["a"]
    jobs.mark_started(redis_client, "w2", "a")
    jobs.finish(redis_client, "w2", JobOutcome(job_id="a", status="finished", finish_reason=FinishReason.eos))
    assert jobs.view(redis_client, "a").status == "finished"


def test_requeue_of_an_unknown_job_only_forgets_it(redis_client):
    redis_client.hset(keys.worker_jobs("w1"), "ghost", "claimed")
    assert jobs.requeue(redis_client, "w1", "ghost") is False
    assert table(redis_client) == {}


def test_enqueue_refuses_past_max_queue(redis_client):
    enqueue(redis_client, "a", max_queue=1)
    with pytest.raises(QueueFull):
        enqueue(redis_client, "b", max_queue=1)


def test_failed_finish_keeps_the_error(redis_client):
    from contract.messages import ErrorEvent

    enqueue(redis_client, "a")
    claims.claim(redis_client, "w1", MODEL, 1)
    error = ErrorEvent(job_id="a", code="invalid_request", message="bad", status_code=422)
    jobs.finish(redis_client, "w1", JobOutcome(job_id="a", status="failed", finish_reason="error", error=error))
    view = jobs.view(redis_client, "a")
    assert view.status == "failed"
    assert view.outcome.error.code == "invalid_request"


def test_start_claimed_marks_started_and_reads_the_cancel_flag_in_one_go(redis_client):

    for job_id in ("a", "b"):
        jobs.enqueue(redis_client, JobRequest(job_id=job_id, model="m"), max_queue=10, result_ttl=60)
    claimed = claims.claim(redis_client, "w1", "m", 2)
    redis_client.set(keys.cancel("b"), "1")
    assert [jobs.start_claimed(redis_client, "w1", request) for request in claimed] == [False, True]
    assert jobs.view(redis_client, "a").status == "started"
    assert redis_client.hget(keys.worker_jobs("w1"), "a") == b"started"


def test_rq_keys_are_the_ones_rq_itself_uses(redis_client):
    from rq import Queue
    from rq.job import Job
    from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    assert keys.rq_queue("m") == jobs.queue_for(redis_client, "m").key
    assert keys.rq_queues() == Queue.redis_queues_keys
    assert keys.rq_queue_prefix() + "m" == keys.rq_queue("m")
    assert keys.rq_job("a") == Job.key_for("a")
    for kind, registry in [
        ("wip", StartedJobRegistry), ("finished", FinishedJobRegistry),
        ("failed", FailedJobRegistry), ("canceled", CanceledJobRegistry),
    ]:  # fmt: skip
        assert keys.rq_registry(kind, "m") == registry(keys.queue_name("m"), connection=redis_client).key
    assert keys.model_from_queue_name(keys.queue_name("m")) == "m"


def test_an_unreachable_redis_is_never_taken_for_a_missing_job(redis_client):
    import socket

    import redis

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = redis.Redis(port=port, socket_connect_timeout=1)
    for read in (jobs.fetch_job, jobs.view):
        with pytest.raises(redis.ConnectionError):
            read(unreachable, "a")
    assert jobs.fetch_job(redis_client, "a") is None  # a missing job still reads as None


def test_rqs_own_api_tells_the_truth_about_ended_jobs(redis_client):
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
    from rq.results import Result
    from rq.serializers import JSONSerializer

    from contract.messages import ErrorEvent

    for job_id in "ab":
        enqueue(redis_client, job_id)
    claims.claim(redis_client, "w1", MODEL, 2)
    for job_id in "ab":
        jobs.mark_started(redis_client, "w1", job_id)
    done = JobOutcome(job_id="a", status="finished", finish_reason=FinishReason.eos, text="hello")
    jobs.finish(redis_client, "w1", done)
    error = ErrorEvent(job_id="b", code="device_error", message="the device is gone", status_code=500)
    jobs.finish(redis_client, "w1", JobOutcome(job_id="b", status="failed", error=error))

    name = keys.queue_name(MODEL)
    assert StartedJobRegistry(name, connection=redis_client).get_job_ids() == []
    assert FinishedJobRegistry(name, connection=redis_client).get_job_ids() == ["a"]
    assert FailedJobRegistry(name, connection=redis_client).get_job_ids() == ["b"]
    finished = Job.fetch("a", connection=redis_client, serializer=JSONSerializer).latest_result()
    assert finished.type == Result.Type.SUCCESSFUL and finished.worker_name == "w1"
    assert finished.return_value["text"] == "hello"
    failed = Job.fetch("b", connection=redis_client, serializer=JSONSerializer).latest_result()
    assert failed.type == Result.Type.FAILED and failed.exc_string == "device_error: the device is gone"
