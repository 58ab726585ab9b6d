"""A claim whose reply is lost: Redis ran it (the jobs are in the worker's job table as claimed) but the connection
dropped before the worker heard. The worker finds such jobs at its next claim and puts them back, so every client
still gets its `done`, whether the client library sent the command again or gave up and the worker retried later."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from contract import keys
from contract.messages import DoneEvent
from infra.redis import connect
from tests.workers.harness import RunningWorker, make_worker, submit
from tests.workers.reply_dropping_proxy import ReplyDroppingProxy

CLAIM_SCRIPT = b"LPOP"  # only the claim script pops a queue
TAKE_INBOX_SCRIPT = b"LRANGE"  # only the inbox script reads a list whole


def worker_client(url: str, retrying: bool) -> redis.Redis:
    """The client a worker gets (it sends a command again after a dropped connection), or one that gives up."""
    return connect(url) if retrying else redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))


@pytest.fixture(params=[True, False], ids=["client-retries", "client-gives-up"])
def retrying(request) -> bool:
    return request.param


def test_a_lost_claim_reply_in_a_busy_step_strands_no_job(redis_client, redis_url, retrying):
    proxy = ReplyDroppingProxy(urlparse(redis_url).port, CLAIM_SCRIPT, b"second-job")
    client = worker_client(proxy.url, retrying)
    try:
        with RunningWorker(make_worker(client, max_batch=4, step_delay_s=0.01)) as running:
            first = submit(redis_client, "first-job", "busy [[tokens=50]]")
            first.wait_tokens(2)  # the worker is busy: it claims in each step's round trip
            second = submit(redis_client, "second-job", "lost reply [[tokens=3]]")
            assert proxy.dropped.wait(30)
            assert isinstance(second.read_until_final(timeout=30)[-1], DoneEvent)
            assert isinstance(first.read_until_final(timeout=30)[-1], DoneEvent)
            assert running.worker.returning == []
        assert redis_client.llen(keys.rq_queue("scripted-model")) == 0
        assert not redis_client.exists(keys.worker_jobs("w1"))
    finally:
        client.close()
        proxy.close()


def test_a_lost_inbox_reply_of_an_idle_worker_strands_no_job(redis_client, redis_url, retrying):
    proxy = ReplyDroppingProxy(urlparse(redis_url).port, TAKE_INBOX_SCRIPT, b"only-job")
    client = worker_client(proxy.url, retrying)
    try:
        with RunningWorker(make_worker(client, max_batch=4)):
            only = submit(redis_client, "only-job", "lost reply [[tokens=3]]")
            assert proxy.dropped.wait(30)
            assert isinstance(only.read_until_final(timeout=30)[-1], DoneEvent)
        assert not redis_client.exists(keys.worker_jobs("w1"))
    finally:
        client.close()
        proxy.close()
