"""Claiming jobs off a model's queue into a worker's job table, and what a lost claim reply leaves."""

from __future__ import annotations

from contract import claims, jobs, keys
from tests.contract.queued import MODEL, enqueue, queue, table


def test_claim_takes_at_most_n_in_queue_order(redis_client):
    for job_id in "abcde":
        enqueue(redis_client, job_id)
    assert [r.job_id for r in claims.claim(redis_client, "w1", MODEL, 2)] == ["a", "b"]
    assert claims.claim(redis_client, "w1", MODEL, 0) == []
    assert queue(redis_client) == ["c", "d", "e"]
    assert redis_client.ttl(keys.worker_jobs("w1")) > 0


def test_claim_skips_a_job_deleted_while_queued(redis_client):
    enqueue(redis_client, "a")
    enqueue(redis_client, "b")
    redis_client.delete("rq:job:a")
    assert [r.job_id for r in claims.claim(redis_client, "w1", MODEL, 2)] == ["b"]
    assert table(redis_client) == {"b": "claimed"}


def test_claim_blocking_waits_then_tops_up(redis_client):
    assert claims.claim_blocking(redis_client, "w1", MODEL, 2, timeout_s=0.1) == claims.Claimed()
    for job_id in "abc":
        enqueue(redis_client, job_id)
    claimed = claims.claim_blocking(redis_client, "w1", MODEL, 2, timeout_s=1)
    assert [r.job_id for r in claimed.requests] == ["a", "b"]
    assert table(redis_client) == {"a": "claimed", "b": "claimed"}
    assert redis_client.llen(keys.worker_inbox("w1")) == 0
    assert queue(redis_client) == ["c"]


def test_take_inbox_recovers_an_id_left_by_a_lost_reply(redis_client):
    enqueue(redis_client, "a")
    redis_client.lmove(jobs.queue_for(redis_client, MODEL).key, keys.worker_inbox("w1"), "LEFT", "RIGHT")
    assert [r.job_id for r in claims.claim_blocking(redis_client, "w1", MODEL, 1, timeout_s=0.1).requests] == ["a"]
    assert not redis_client.exists(keys.worker_inbox("w1"))
    assert table(redis_client) == {"a": "claimed"}


def test_every_claim_reports_the_jobs_already_held_as_claimed(redis_client):
    """How a worker learns of the jobs of a claim whose reply it lost: the next claim lists them."""
    for job_id in "abcd":
        enqueue(redis_client, job_id)
    assert claims.claim(redis_client, "w1", MODEL, 2)  # a reply the worker never gets
    jobs.mark_started(redis_client, "w1", "a")
    with redis_client.pipeline(transaction=False) as pipe:
        claims.queue_claim(pipe, "w1", MODEL, 1)
        (raw,) = pipe.execute()
    assert claims.claim_reply(raw) == (["c"], ["b"])  # a started job is not a claim
    redis_client.lmove(jobs.queue_for(redis_client, MODEL).key, keys.worker_inbox("w1"), "LEFT", "RIGHT")
    claimed = claims.claim_blocking(redis_client, "w1", MODEL, 1, timeout_s=0.1)
    assert [r.job_id for r in claimed.requests] == ["d"] and claimed.earlier == ["b", "c"]
    assert claims.claim_blocking(redis_client, "w2", MODEL, 1, timeout_s=0.1) == claims.Claimed()


def test_put_back_keeps_the_original_order_at_the_front(redis_client):
    for job_id in "abcd":
        enqueue(redis_client, job_id)
    claims.claim(redis_client, "w1", MODEL, 3)
    claims.put_back(redis_client, "w1", MODEL, ["b", "c"])
    assert queue(redis_client) == ["b", "c", "d"]
    assert table(redis_client) == {"a": "claimed"}
