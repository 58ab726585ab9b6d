"""The sweeper settles a dead worker's jobs: claimed/started ones go back to the queue, streaming ones fail."""

from __future__ import annotations

import threading
import time

import redis as redis_lib

from contract import claims, jobs, keys, liveness, sweeper
from contract.messages import DoneEvent, ErrorEvent, JobRequest
from tests.workers.harness import Stream, key_ttls

MODEL = "m"
QUEUE = "rq:queue:llava:m"


def _enqueue(client, job_id: str, enqueued_at: float) -> None:
    request = JobRequest(job_id=job_id, model=MODEL, prompt="hi", enqueued_at=enqueued_at)
    jobs.enqueue(client, request, max_queue=100, result_ttl=600)


def _dead_worker_holding(client, worker_id: str = "dead") -> None:
    """A worker that claimed a..e, started b, c, d, streamed d, and e sits in its inbox; then its key expired."""
    for i, job_id in enumerate("abcdef"):
        _enqueue(client, job_id, 1000.0 + i)
    claims.claim(client, worker_id, MODEL, 4)  # a b c d
    for job_id in "bcd":
        jobs.mark_started(client, worker_id, job_id)
    with client.pipeline() as pipe:
        jobs.mark_streaming(pipe, worker_id, "d")
        pipe.execute()
    client.lmove(QUEUE, keys.worker_inbox(worker_id), "LEFT", "RIGHT")  # e
    client.sadd(keys.workers(), worker_id)  # registered, but keys.worker(worker_id) is gone


def test_dead_workers_jobs_are_requeued_in_order_or_failed_with_worker_lost(redis_client):
    _dead_worker_holding(redis_client)
    redis_client.set(keys.cancel("c"), "1", ex=60)
    lost = Stream(redis_client, "d")
    canceled = Stream(redis_client, "c")

    report = sweeper.sweep_once(redis_client)

    assert report.dead_workers == ["dead"]
    assert sorted(report.requeued) == ["a", "b", "e"]
    assert report.canceled == ["c"]
    assert report.failed == ["d"]
    assert redis_client.lrange(QUEUE, 0, -1) == [b"a", b"b", b"e", b"f"]
    for job_id in "abe":
        assert jobs.view(redis_client, job_id).status == "queued"
    error = lost.read_until_final(timeout=5)[-1]
    assert isinstance(error, ErrorEvent) and error.code == "worker_lost" and error.status_code == 502
    assert "dead" in error.message and "lost" in error.message and "regenerate" in error.message.lower()
    view = jobs.view(redis_client, "d")
    assert view.status == "failed" and view.outcome.error.code == "worker_lost"
    done = canceled.read_until_final(timeout=5)[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason == "cancelled"
    assert jobs.view(redis_client, "c").status == "canceled"

    # exactly what is left: the queue with the requeued jobs, the records, and nothing of the dead worker
    left = key_ttls(redis_client)
    assert {k for k in left if k.startswith("llava:")} == {"llava:job:c:cancel"}
    assert 0 < left["llava:job:c:cancel"] <= 60
    assert {k for k in left if k.startswith("rq:") and not k.startswith("rq:job:")} == {
        "rq:queue:llava:m",
        "rq:queues",
        "rq:failed:llava:m",
        "rq:canceled:llava:m",
        "rq:results:d",  # rq's result stream of the failed job
    }
    assert 0 < left["rq:results:d"] <= 600
    for job_id in "abef":
        assert left[f"rq:job:{job_id}"] == -1  # queued jobs never expire
    for job_id in "cd":
        assert 0 < left[f"rq:job:{job_id}"] <= 600
    assert sweeper.sweep_once(redis_client).dead_workers == []


def test_a_requeued_job_is_served_by_another_worker(redis_client):
    _dead_worker_holding(redis_client)
    sweeper.sweep_once(redis_client)
    claimed = claims.claim(redis_client, "alive", MODEL, 2)
    assert [r.job_id for r in claimed] == ["a", "b"]
    jobs.mark_started(redis_client, "alive", "b")
    assert jobs.view(redis_client, "b").status == "started"


def test_live_workers_are_left_alone(redis_client):
    _enqueue(redis_client, "a", 1.0)
    claims.claim(redis_client, "live", MODEL, 1)
    redis_client.sadd(keys.workers(), "live")
    redis_client.set(keys.worker("live"), "{}", ex=keys.WORKER_TTL_S)
    report = sweeper.sweep_once(redis_client)
    assert report.dead_workers == [] and not report.locked_out
    assert redis_client.hget(keys.worker_jobs("live"), "a") == b"claimed"


def test_the_lock_keeps_a_second_sweeper_out(redis_client):
    _dead_worker_holding(redis_client)
    redis_client.set(keys.sweep_lock(), "someone-else", px=keys.SWEEP_LOCK_TTL_MS)
    assert sweeper.sweep_once(redis_client).locked_out
    assert redis_client.sismember(keys.workers(), "dead")
    redis_client.delete(keys.sweep_lock())
    assert sweeper.sweep_once(redis_client).dead_workers == ["dead"]
    assert not redis_client.exists(keys.sweep_lock())  # released after the sweep


def test_jobs_already_finished_are_only_forgotten(redis_client):
    from contract.messages import FinishReason, JobOutcome

    _enqueue(redis_client, "a", 1.0)
    claims.claim(redis_client, "dead", MODEL, 1)
    jobs.finish(redis_client, "x", JobOutcome(job_id="a", status="finished", finish_reason=FinishReason.eos))
    redis_client.hset(keys.worker_jobs("dead"), "a", "streaming")
    redis_client.sadd(keys.workers(), "dead")
    report = sweeper.sweep_once(redis_client)
    assert report.failed == [] and report.requeued == []
    assert jobs.view(redis_client, "a").status == "finished"


def test_run_sweeper_sweeps_until_stopped(redis_client, redis_url):
    stop = threading.Event()
    thread = threading.Thread(target=sweeper.run_sweeper, args=(redis_url, 0.05, stop))
    thread.start()
    try:
        _dead_worker_holding(redis_client)
        from tests.workers.harness import wait_for

        wait_for(lambda: not redis_client.sismember(keys.workers(), "dead"), timeout=10, what="the sweep")
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert redis_client.lrange(QUEUE, 0, -1)[:3] == [b"a", b"b", b"c"]


def test_workers_get_time_to_reregister_after_an_outage_longer_than_their_ttl(tmp_path):
    from infra.embedded_redis import EmbeddedRedis
    from infra.redis import connect
    from tests.workers.harness import wait_for
    from tests.workers.test_heartbeat import _info
    from workers.heartbeat import Heartbeat

    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()  # keys survive; their TTLs run on
    client = connect(server.url)
    reports: list[sweeper.SweepReport] = []
    stop = threading.Event()
    sweeping = threading.Thread(
        target=sweeper.run_sweeper, args=(server.url, 0.05, stop), kwargs={"on_sweep": reports.append}
    )
    beat = Heartbeat(client, _info)
    try:
        _enqueue(client, "a", 1.0)
        claims.claim(client, "hb", MODEL, 1)
        jobs.mark_started(client, "hb", "a")
        with client.pipeline() as pipe:
            jobs.mark_streaming(pipe, "hb", "a")
            pipe.execute()
        liveness.register(client, _info())
        beat.start()
        sweeping.start()
        judged = lambda since: any(not (r.paused or r.locked_out) for r in reports[since:])  # noqa: E731
        wait_for(lambda: judged(0), what="a sweep that judged liveness")
        server.stop()
        time.sleep(keys.WORKER_TTL_S + 0.5)  # the outage outlasts the worker key's TTL
        server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=True).start()
        wait_for(lambda: _exists_now(client, keys.worker("hb")), what="the heartbeat to re-register")
        since = len(reports)
        wait_for(lambda: judged(since), what="a sweep that judged liveness after the re-registration")
        assert [r.dead_workers for r in reports if r.dead_workers] == []
        assert client.hget(keys.worker_jobs("hb"), "a") == b"streaming"
        assert jobs.view(client, "a").status == "started"
    finally:
        stop.set()
        sweeping.join(5)
        beat.stop()
        client.close()
        server.stop()


def _exists_now(client, key: str) -> bool:
    try:
        return bool(client.exists(key))
    except redis_lib.ConnectionError:
        return False


def test_no_worker_is_judged_dead_within_the_grace_after_redis_came_back(redis_client):
    _dead_worker_holding(redis_client)
    report = sweeper.sweep_once(redis_client, reachable_for_s=liveness.REREGISTER_GRACE_S / 2)
    assert report.paused and report.dead_workers == []
    assert redis_client.sismember(keys.workers(), "dead")
    assert sweeper.sweep_once(redis_client, reachable_for_s=liveness.REREGISTER_GRACE_S).dead_workers == ["dead"]


def test_expired_entries_of_rq_registries_are_pruned_and_live_ones_kept(redis_client):
    for job_id in ("old-done", "new-done", "old-failed", "old-canceled", "new-canceled"):
        _enqueue(redis_client, job_id, 1000.0)
    claims.claim(redis_client, "w", MODEL, 5)
    now = time.time()
    for kind, job_id, expires_at in (
        ("finished", "old-done", now - 10),
        ("finished", "new-done", now + 600),
        ("failed", "old-failed", now - 10),
        ("canceled", "old-canceled", now - 10),
        ("canceled", "new-canceled", now + 600),
    ):
        redis_client.zadd(keys.rq_registry(kind, MODEL), {job_id: expires_at})  # as rq scores them: expiry times
    assert sweeper.prune_registries(redis_client) == 3
    kinds = ("finished", "failed", "canceled")
    left = {kind: redis_client.zrange(keys.rq_registry(kind, MODEL), 0, -1) for kind in kinds}
    assert left == {"finished": [b"new-done"], "failed": [], "canceled": [b"new-canceled"]}


def test_the_sweeper_thread_prunes_registries(redis_url, redis_client):
    _enqueue(redis_client, "old", 1000.0)
    redis_client.zadd(keys.rq_registry("finished", MODEL), {"old": time.time() - 10})
    stop = threading.Event()
    thread = threading.Thread(target=sweeper.run_sweeper, args=(redis_url, 0.05, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while redis_client.zcard(keys.rq_registry("finished", MODEL)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.zcard(keys.rq_registry("finished", MODEL)) == 0
    finally:
        stop.set()
        thread.join(5)
