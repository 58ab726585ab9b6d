"""Helpers for worker tests: a Worker with the scripted engine in a thread, job submission, event collection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from contract import jobs, keys
from contract.messages import DoneEvent, ErrorEvent, JobRequest, SamplingParams, parse_event
from infra.settings import WorkerSettings
from workers.scripted import ScriptedEngine
from workers.worker import Worker

MODEL = "scripted-model"


def make_worker(
    client: redis.Redis, *, worker_id: str = "w1", drain_timeout_s: float = 5.0, **engine_kwargs: Any
) -> Worker:
    engine_kwargs.setdefault("step_delay_s", 0.005)
    settings = WorkerSettings(model_path=MODEL, worker_id=worker_id, drain_timeout_s=drain_timeout_s)
    return Worker(settings, ScriptedEngine(**engine_kwargs), client, model_name=MODEL)


class RunningWorker:
    """A Worker's run() in a thread; `stop()` drains it and returns its exit code."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.worker.run()

    def __enter__(self) -> RunningWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, *, now: bool = False, timeout: float = 30.0) -> int | None:
        self.worker.stop(now=now)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the worker did not stop")
        return self.code

    def join(self, timeout: float = 30.0) -> int | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the worker did not exit")
        return self.code


class Stream:
    """A subscription to one job's chunk channel, opened before the job is enqueued (as the controller does)."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.job_id = job_id
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.chunks(job_id))
        self.events: list[Any] = []

    def read_until_final(self, timeout: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            event = parse_event(message["data"])
            self.events.append(event)
            if isinstance(event, (DoneEvent, ErrorEvent)):
                self.pubsub.close()
                return self.events
        self.pubsub.close()
        raise AssertionError(f"no final event for job {self.job_id} within {timeout} s; got {self.events}")

    def wait_tokens(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(e.type == "token" for e in self.events) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} token events for {self.job_id}: {self.events}")
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None:
                self.events.append(parse_event(message["data"]))


def submit(
    client: redis.Redis, job_id: str, prompt: str = "hello brave new world", *, subscribe: bool = True, **params: Any
) -> Stream | None:
    stream = Stream(client, job_id) if subscribe else None
    request = JobRequest(job_id=job_id, model=MODEL, prompt=prompt, params=SamplingParams(**params))
    jobs.enqueue(client, request, max_queue=100, result_ttl=600)
    return stream


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def status(client: redis.Redis, job_id: str) -> str | None:
    view = jobs.view(client, job_id)
    return view.status if view else None


def key_ttls(client: redis.Redis) -> dict[str, int]:
    """Every key in the db with its TTL (-1: none)."""
    return {k.decode(): client.ttl(k) for k in sorted(client.keys("*"))}
