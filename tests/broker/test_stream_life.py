"""No stream hangs: a client learns its job id at once, a requeued job is tracked in the queue again, no token is
lost across a relay reconnect, and Stop works at every moment of a request's life. Real Redis, scripted worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from broker.context import ControllerContext
from contract import claims, jobs, keys, sweeper
from contract.keys import rq_queue
from contract.messages import FinishReason, JobRequest, TokenEvent
from tests.broker.scripted_worker import ScriptedWorker, Watchdog, chat_body, read_sse

MODEL = "tiny-llava"


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def claim_at_once(monkeypatch: pytest.MonkeyPatch, worker: ScriptedWorker) -> list[JobRequest]:
    """Make a worker claim each job the instant it is enqueued (before the stream can read its position), with a
    watchdog on it; returns the list the claimed requests go to."""
    claimed: list[JobRequest] = []
    real_enqueue = jobs.enqueue

    def enqueue_then_claim(*args, **kwargs):
        job = real_enqueue(*args, **kwargs)
        claimed.append(worker.claim())
        watchdog = Watchdog(worker.redis, claimed[-1].job_id)
        WATCHDOGS.append(watchdog)
        return job

    monkeypatch.setattr(jobs, "enqueue", enqueue_then_claim)
    return claimed


WATCHDOGS: list[Watchdog] = []


@pytest.fixture(autouse=True)
def _cancel_watchdogs() -> Iterator[None]:
    yield
    while WATCHDOGS:
        WATCHDOGS.pop().cancel()


@pytest.fixture
def left_queue(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once a stream has seen its job gone from the queue (claimed): the real `queue_position`, watched."""
    seen = threading.Event()
    real = ControllerContext.queue_position

    async def watched(self: ControllerContext, model: str, job_id: str) -> int | None:
        position = await real(self, model, job_id)
        if position is None:
            seen.set()
        return position

    monkeypatch.setattr(ControllerContext, "queue_position", watched)
    return seen


def honour_cancel(worker: ScriptedWorker, job: JobRequest) -> None:
    """What a worker does with a claimed or running job whose cancel flag is set: end it as cancelled."""
    wait_for(lambda: jobs.is_cancel_requested(worker.redis, job.job_id))
    worker.finish(job, "", FinishReason.cancelled)


def kill_and_sweep(worker: ScriptedWorker, job_id: str) -> None:
    """The worker stops heartbeating (its liveness key expires); the sweeper puts its unstarted job back."""
    worker.redis.delete(keys.worker(worker.worker_id))
    assert sweeper.sweep_once(worker.redis).requeued == [job_id]


def test_a_job_claimed_at_once_still_sends_queued_first(
    client: TestClient, worker: ScriptedWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    claim_on_enqueue = claim_at_once(monkeypatch, worker)
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = read_sse(response.iter_lines())
        name, data = next(events)
        assert name == "queued"
        assert data["job_id"] == claim_on_enqueue[0].job_id
        job = claim_on_enqueue[0]
        worker.start(job)
        worker.tokens(job, ["hi"])
        worker.finish(job, "hi")
        rest = list(events)
    assert rest[-1][0] == "done" and rest[-1][1]["text"] == "hi"


def test_a_requeued_job_is_queued_again_and_ends_with_no_worker(
    client: TestClient, worker: ScriptedWorker, redis_client: redis.Redis, left_queue: threading.Event
) -> None:
    ahead = JobRequest(job_id="ahead", model=MODEL, prompt="hi", enqueued_at=time.time() - 1)
    jobs.enqueue(redis_client, ahead, max_queue=10, result_ttl=60)
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = read_sse(response.iter_lines())
        name, data = next(events)
        assert (name, data["position"]) == ("queued", 1)
        job_id = data["job_id"]
        claimed = claims.claim(redis_client, worker.worker_id, MODEL, 2)
        assert [j.job_id for j in claimed] == ["ahead", job_id]
        worker.finish(claimed[0], "done ahead", publish=False)
        worker.start(claimed[1])
        assert left_queue.wait(5)  # the stream saw its job claimed; then the worker freezes and is swept
        kill_and_sweep(worker, job_id)  # the job is back at the front of the queue, and no worker is left
        watchdog = Watchdog(redis_client, job_id)
        try:
            rest = list(events)
        finally:
            watchdog.cancel()
    assert ("queued", 0) in [(name, data.get("position")) for name, data in rest]
    assert rest[-1][0] == "error"
    assert rest[-1][1]["code"] == "no_worker"
    assert redis_client.llen(rq_queue(MODEL)) == 0
    assert jobs.view(redis_client, job_id).status == "canceled"


def test_a_requeued_job_is_served_by_the_next_worker(
    client: TestClient, worker: ScriptedWorker, redis_client: redis.Redis, left_queue: threading.Event
) -> None:
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = read_sse(response.iter_lines())
        job_id = next(events)[1]["job_id"]
        worker.start(worker.claim())
        assert left_queue.wait(5)
        kill_and_sweep(worker, job_id)
        watchdog = Watchdog(redis_client, job_id)
        try:
            next_worker = ScriptedWorker(redis_client, worker_id="scripted-2").register()
            served = next_worker.in_thread(lambda w: w.serve_one(["again"]))
            rest = list(events)
            assert served.result().job_id == job_id
        finally:
            watchdog.cancel()
    assert [name for name, _ in rest][-2:] == ["token", "done"]
    assert rest[-1][1]["text"] == "again"


def test_no_token_is_lost_across_a_relay_reconnect(
    client: TestClient, worker: ScriptedWorker, redis_client: redis.Redis
) -> None:
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = read_sse(response.iter_lines())
        job_id = next(events)[1]["job_id"]
        job = worker.claim()
        worker.start(job)
        worker.publish(TokenEvent(job_id=job_id, text="A", seq=1))
        assert next(name for name, _ in events if name == "token")
        channel = keys.chunks(job_id)
        # The relay's connection drops; the two token events published meanwhile reach nobody.
        with redis_client.pipeline(transaction=True) as pipe:
            pipe.client_kill_filter(_type="pubsub")
            pipe.publish(channel, TokenEvent(job_id=job_id, text=" lost", seq=2).model_dump_json())
            pipe.publish(channel, TokenEvent(job_id=job_id, text=" words", seq=3).model_dump_json())
            pipe.execute()
        wait_for(lambda: relay_listens(redis_client, channel))
        worker.publish(TokenEvent(job_id=job_id, text=" back", seq=4))
        worker.finish(job, "A lost words back")
        rest = list(events)
    tokens = [data for name, data in rest if name == "token"]
    assert rest[-1][0] == "done"
    assert "A" + "".join(t["text"] for t in tokens) == rest[-1][1]["text"] == "A lost words back"
    assert [t["seq"] for t in tokens] == list(range(2, len(tokens) + 2))  # the client's seq stay 1, 2, 3, ...


def relay_listens(client: redis.Redis, channel: str) -> bool:
    """Whether a connection is subscribed to `channel` again (or, as before per-job channels, to a pattern)."""
    ((_, subscribers),) = client.pubsub_numsub(channel)
    return subscribers == 1 or client.execute_command("PUBSUB", "NUMPAT") == 1


def held_job(
    moment: str, worker: ScriptedWorker, claimed_at_once: list[JobRequest], job_id: str, left_queue: threading.Event
) -> Iterator[None]:
    """Bring the job to `moment` of its life; yields while Stop is pressed, then plays the worker's part."""
    if moment == "claimed":
        (job,) = claimed_at_once
        finishing = worker.in_thread(lambda w: honour_cancel(w, job))
        yield
        finishing.result()
    elif moment == "running":
        job = worker.claim()
        worker.start(job)
        worker.tokens(job, ["partial"])
        finishing = worker.in_thread(lambda w: honour_cancel(w, job))
        yield
        finishing.result()
    elif moment == "requeued":
        worker.start(worker.claim())
        assert left_queue.wait(5)
        kill_and_sweep(worker, job_id)
        ScriptedWorker(worker.redis, worker_id="scripted-2").register()  # alive, so the job waits for it
        yield
    else:
        yield


@pytest.mark.parametrize("moment", ["queued", "claimed", "running", "requeued"])
def test_stop_works_at_every_moment(
    moment: str,
    client: TestClient,
    worker: ScriptedWorker,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    left_queue: threading.Event,
) -> None:
    claimed = claim_at_once(monkeypatch, worker) if moment == "claimed" else []
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = read_sse(response.iter_lines())
        name, data = next(events)
        assert name == "queued"  # the job id, whatever the moment
        job_id = data["job_id"]
        watchdog = Watchdog(redis_client, job_id)
        try:
            steps = held_job(moment, worker, claimed, job_id, left_queue)
            next(steps)
            reply = client.post(f"/api/v1/jobs/{job_id}/cancel")
            assert reply.status_code == 200
            assert reply.json()["removed_from_queue"] is (moment in {"queued", "requeued"})
            next(steps, None)
            rest = list(events)
        finally:
            watchdog.cancel()
    assert rest[-1][0] == "done"
    assert rest[-1][1]["finish_reason"] == "cancelled"
    if moment in {"queued", "requeued"}:  # the controller ended it (a worker records its own otherwise)
        assert jobs.view(redis_client, job_id).status == "canceled"


def test_text_after_a_lost_token_is_held_back_and_made_up_from_the_final_text(
    client: TestClient, worker: ScriptedWorker
) -> None:
    def script(w: ScriptedWorker) -> None:
        job = w.claim()
        w.start(job)
        w.publish(TokenEvent(job_id=job.job_id, text="A", seq=1))
        # seq 2 never arrives (lost); seq 3 would come out of order, so the stream holds it
        w.publish(TokenEvent(job_id=job.job_id, text="C", seq=3))
        w.publish(TokenEvent(job_id=job.job_id, text="D", seq=4))
        w.finish(job, "ABCD", publish=False)  # and the done message is lost too: the job record has the text

    running = worker.in_thread(script)
    with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
        events = list(read_sse(response.iter_lines()))
    running.result()
    tokens = [data for name, data in events if name == "token"]
    assert [(t["text"], t["seq"]) for t in tokens] == [("A", 1), ("BCD", 2)]
    assert events[-1][0] == "done" and events[-1][1]["text"] == "ABCD"
