"""A worker frozen past its TTL (SIGSTOP, a partition) loses its jobs to the sweeper; when it wakes up it publishes
nothing more for them, even when it claims one of them again, and goes on serving new jobs.

The freeze is made in-process: the engine's step and the heartbeat both wait on one gate, so nothing of the worker
runs while it is closed (as under SIGSTOP), and the test knows the exact moment it froze."""

from __future__ import annotations

import signal
import threading
from typing import Any

import redis

from contract import jobs, keys, liveness, sweeper
from contract.messages import DoneEvent, ErrorEvent, TokenEvent, parse_event
from tests.workers.harness import RunningWorker, make_worker, status, submit, wait_for
from tests.workers.test_worker_process import _start_worker_process
from workers.heartbeat import Heartbeat
from workers.worker import Worker


class FreezingEngine:
    """The scripted engine, frozen (the step waits on `thawed`) at the first step where `freeze_when(rows)` holds."""

    def __init__(self, inner: Any, thawed: threading.Event, freeze_when: Any) -> None:
        self.inner = inner
        self.thawed = thawed
        self.freeze_when = freeze_when
        self.frozen = threading.Event()

    def step(self):  # noqa: ANN201 - the inner engine's updates
        if not self.frozen.is_set() and self.freeze_when([r.job_id for r in self.inner._rows]):
            self.thawed.clear()
            self.frozen.set()
        self.thawed.wait()
        return self.inner.step()

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the inner engine's
        return getattr(self.inner, name)


class GatedHeartbeat(Heartbeat):
    """A heartbeat that beats only while `thawed` is set."""

    def __init__(self, client: redis.Redis, info: Any, thawed: threading.Event) -> None:
        super().__init__(client, info)
        self.thawed = thawed

    def beat(self) -> bool:
        self.thawed.wait()
        return super().beat()


def freezable_worker(client: redis.Redis, worker_id: str, freeze_when: Any, **engine_kwargs: Any) -> Worker:
    worker = make_worker(client, worker_id=worker_id, **engine_kwargs)
    thawed = threading.Event()
    thawed.set()
    worker.engine = FreezingEngine(worker.engine, thawed, freeze_when)
    worker.heartbeat = GatedHeartbeat(client, worker.info, thawed)
    return worker


class Listener:
    """Every event on some job channels, in arrival order (not stopping at a final event)."""

    def __init__(self, client: redis.Redis, *job_ids: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(*[keys.chunks(j) for j in job_ids])
        self.events: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None:
                self.events.append(parse_event(message["data"]))

    def of(self, job_id: str) -> list[Any]:
        return [e for e in self.events if e.job_id == job_id]

    def final(self, job_id: str) -> Any:
        return next((e for e in self.of(job_id) if isinstance(e, (DoneEvent, ErrorEvent))), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()


def _freeze_and_sweep(client: redis.Redis, engine: FreezingEngine, worker_id: str) -> sweeper.SweepReport:
    wait_for(engine.frozen.is_set, what="the freeze")
    wait_for(lambda: not client.exists(keys.worker(worker_id)), timeout=keys.WORKER_TTL_S + 10, what="key expiry")
    return sweeper.sweep_once(client)


def _assert_one_clean_stream(events: list[Any], expected_text: str) -> None:
    """One run's events: token seqs 1..n, exactly one final event, last, whose text is the tokens joined."""
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.seq for e in tokens] == list(range(1, len(tokens) + 1)), events
    assert isinstance(events[-1], DoneEvent) and sum(isinstance(e, (DoneEvent, ErrorEvent)) for e in events) == 1
    assert "".join(e.text for e in tokens) == events[-1].text == expected_text


def test_a_woken_worker_does_not_publish_into_a_stream_another_worker_now_owns(redis_client):
    listener = Listener(redis_client, "a", "b", "c")
    frozen = freezable_worker(redis_client, "w1", lambda rows: "b" in rows, max_batch=2, step_delay_s=0.01)
    first = RunningWorker(frozen).__enter__()
    try:
        submit(redis_client, "a", "talk [[tokens=100000]]", subscribe=False)
        wait_for(lambda: len(listener.of("a")) >= 2, what="a streaming")
        submit(redis_client, "b", "bee [[tokens=30]]", subscribe=False)  # admitted, then w1 freezes before a token
        report = _freeze_and_sweep(redis_client, frozen.engine, "w1")
        assert (report.failed, report.requeued) == (["a"], ["b"])
        with RunningWorker(make_worker(redis_client, worker_id="w2", step_delay_s=0.05)):
            wait_for(lambda: len(listener.of("b")) >= 2, what="b streaming from w2")
            frozen.engine.thawed.set()  # w1 wakes up with a and b in its engine
            wait_for(lambda: listener.final("b"), what="b's final event")
        _assert_one_clean_stream(listener.of("b"), " ".join(["bee"] * 30))
        wait_for(lambda: redis_client.exists(keys.worker("w1")), what="w1 registered again")
        submit(redis_client, "c", "sea [[tokens=3]]", subscribe=False)
        wait_for(lambda: listener.final("c"), what="c served by the woken worker")
        _assert_one_clean_stream(listener.of("c"), "sea sea sea")
        a_events = listener.of("a")
        assert isinstance(a_events[-1], ErrorEvent) and a_events[-1].code == "worker_lost", a_events[-3:]
    finally:
        first.stop(now=True)
        listener.close()
    assert status(redis_client, "a") == "failed"
    assert status(redis_client, "b") == "finished"


def test_a_job_taken_away_and_claimed_again_by_the_same_worker_runs_cleanly(redis_client):
    listener = Listener(redis_client, "a", "b")
    frozen = freezable_worker(redis_client, "w1", lambda rows: "b" in rows, max_batch=3, step_delay_s=0.01)
    with RunningWorker(frozen):
        submit(redis_client, "a", "talk [[tokens=100000]]", subscribe=False)
        wait_for(lambda: len(listener.of("a")) >= 2, what="a streaming")
        submit(redis_client, "b", "bee [[tokens=5]]", subscribe=False)
        report = _freeze_and_sweep(redis_client, frozen.engine, "w1")
        assert (report.failed, report.requeued) == (["a"], ["b"])
        frozen.engine.thawed.set()  # w1 claims b again from the queue while its engine still holds the old run
        wait_for(lambda: listener.final("b"), what="b's final event")
    listener.close()
    _assert_one_clean_stream(listener.of("b"), "bee bee bee bee bee")
    assert status(redis_client, "b") == "finished"
    assert status(redis_client, "a") == "failed"


def test_a_worker_process_woken_from_sigstop_stays_silent_on_its_lost_job_and_serves_again(redis_client, redis_url):
    stop_sweeper = threading.Event()
    sweeping = threading.Thread(
        target=sweeper.run_sweeper, args=(redis_url, liveness.SWEEP_INTERVAL_S, stop_sweeper), daemon=True
    )
    sweeping.start()
    listener = Listener(redis_client, "long", "next")
    process = _start_worker_process(redis_url, "sleeper")
    try:
        submit(redis_client, "long", "talk [[tokens=100000]]", subscribe=False)
        wait_for(lambda: len(listener.of("long")) >= 2, timeout=60, what="long streaming")
        process.send_signal(signal.SIGSTOP)
        wait_for(lambda: listener.final("long"), timeout=liveness.DEATH_TO_ERROR_S + 10, what="worker_lost")
        process.send_signal(signal.SIGCONT)
        wait_for(lambda: redis_client.exists(keys.worker("sleeper")), what="registered again")
        submit(redis_client, "next", "new [[tokens=3]]", subscribe=False)
        wait_for(lambda: listener.final("next"), timeout=30, what="the next job served")
    finally:
        stop_sweeper.set()
        sweeping.join(5)
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)
        listener.close()
    _assert_one_clean_stream(listener.of("next"), "new new new")
    assert jobs.view(redis_client, "next").outcome.worker_id == "sleeper"
    long_events = listener.of("long")
    assert isinstance(long_events[-1], ErrorEvent) and long_events[-1].code == "worker_lost", long_events[-3:]
    assert status(redis_client, "long") == "failed"
