"""Redis goes away and comes back: a request or stream waits for it up to the outage allowance (503 after that),
and the controller recovers by itself."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.context import ControllerContext
from contract import jobs
from contract.messages import TokenEvent
from infra.embedded_redis import EmbeddedRedis, free_port
from infra.redis import connect
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, read_sse, settings_for


def wait_ready(client: TestClient, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("controller not ready after Redis came back")


def test_redis_down_is_503_then_the_controller_recovers(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    timings = replace(FAST, redis_outage_s=0.5)  # a new job waits this long for Redis, then 503
    try:
        with TestClient(create_app(settings_for(server.url), timings=timings, run_sweeper=False)) as client:
            wait_ready(client)
            server.stop()

            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "redis_unavailable"
            for response in (
                client.post("/api/v1/generate", json=chat_body()),
                client.get("/api/v1/models"),
                client.post("/worker_generate_stream", json={"model": "tiny-llava", "prompt": "hi"}),
            ):
                assert response.status_code == 503, response.text
            generate = client.post("/api/v1/generate", json=chat_body()).json()["error"]
            assert generate["code"] == "redis_unavailable"
            assert "outage allowance of 0.5 s" in generate["message"], generate
            assert client.get("/healthz").status_code == 200

            server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=False).start()
            wait_ready(client)
            redis_client = connect(server.url)
            worker = ScriptedWorker(redis_client).register()
            running = worker.in_thread(lambda w: w.serve_one(["back"]))
            with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
                assert response.status_code == 200
                events = list(read_sse(response.iter_lines()))
            running.result()
            assert events[-1][0] == "done" and events[-1][1]["text"] == "back"
            redis_client.close()
    finally:
        server.stop()


def test_a_stream_rides_out_a_short_redis_outage(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()  # the queued job survives the restart
    try:
        with TestClient(create_app(settings_for(server.url), timings=FAST, run_sweeper=False)) as client:
            wait_ready(client)
            redis_client = connect(server.url)
            ScriptedWorker(redis_client).register()
            redis_client.close()
            with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
                events = read_sse(response.iter_lines())
                assert next(events)[0] == "queued"
                server.stop()
                time.sleep(0.5)  # the stream's queue checks fail meanwhile
                server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=True).start()
                redis_client = connect(server.url)
                running = ScriptedWorker(redis_client).in_thread(lambda w: w.serve_one(["still", " here"]))
                rest = list(events)
                running.result()
                redis_client.close()
            assert rest[-1][0] == "done" and rest[-1][1]["text"] == "still here"
    finally:
        server.stop()


def test_a_read_only_redis_is_503_in_every_wire_format(tmp_path: Path) -> None:
    """Not only lost connections: any redis-py failure (here READONLY from a replica whose master is gone) is a 503
    `redis_unavailable` in each endpoint's own error format, never a 500."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    try:
        with TestClient(create_app(settings_for(server.url), timings=FAST, run_sweeper=False)) as client:
            wait_ready(client)
            redis_client = connect(server.url)
            ScriptedWorker(redis_client).register()
            redis_client.execute_command("REPLICAOF", "127.0.0.1", free_port())  # reads still served, writes refused
            try:
                generate = client.post("/api/v1/generate", json=chat_body())
                assert generate.status_code == 503, generate.text
                assert generate.json()["error"]["code"] == "redis_unavailable"
                assert "ReadOnlyError" in generate.json()["error"]["message"]

                chat = client.post("/v1/chat/completions", json=chat_body())
                assert chat.status_code == 503, chat.text
                assert chat.json()["error"]["code"] == "redis_unavailable"

                llava = client.post("/worker_generate_stream", json={"model": "tiny-llava", "prompt": "hi"})
                assert llava.status_code == 503, llava.text
                chunk = json.loads(llava.content.rstrip(b"\0"))
                assert chunk["error_code"] == 3 and chunk["error"]["code"] == "redis_unavailable"
            finally:
                redis_client.execute_command("REPLICAOF", "NO", "ONE")
                redis_client.close()
    finally:
        server.stop()


def test_a_running_stream_rides_out_a_redis_outage_longer_than_its_stall_check(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()  # the running job's record survives
    try:
        with TestClient(create_app(settings_for(server.url), timings=FAST, run_sweeper=False)) as client:
            wait_ready(client)
            redis_client = connect(server.url)
            running = ScriptedWorker(redis_client).register().in_thread(lambda w: w.stream_then_hold(["so", " far"]))
            with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
                events = read_sse(response.iter_lines())
                while (event := next(events)) != ("token", event[1]) or event[1]["text"] != " far":
                    assert event[0] in {"queued", "token"}, event
                job = running.result()
                redis_client.close()
                server.stop()
                time.sleep(5 * FAST.stall_check_s)  # the outage: several of the stream's record checks fail
                server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=True).start()
                redis_client = connect(server.url)
                ScriptedWorker(redis_client).finish(job, "so far")
                rest = list(events)
                redis_client.close()
            assert [name for name, _ in rest] == ["done"], rest
            assert rest[-1][1]["text"] == "so far"
    finally:
        server.stop()


def test_a_request_arriving_during_a_short_outage_waits_for_redis(tmp_path: Path) -> None:
    """A new request rides out an outage within the allowance instead of failing at once with 503."""
    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()  # the worker's liveness key survives
    try:
        with TestClient(create_app(settings_for(server.url), timings=FAST, run_sweeper=False)) as client:
            wait_ready(client)
            redis_client = connect(server.url)
            ScriptedWorker(redis_client).register()
            redis_client.close()
            server.stop()
            with ThreadPoolExecutor(1) as pool:
                sent = pool.submit(client.post, "/api/v1/generate", json=chat_body())
                time.sleep(2.0)  # the outage, with the request in it
                assert not sent.done(), sent.result().text  # waiting for Redis, not refused
                server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=True).start()
                redis_client = connect(server.url)
                running = ScriptedWorker(redis_client).in_thread(lambda w: w.serve_one(["back"]))
                response = sent.result(timeout=30)
                running.result()
                redis_client.close()
            assert response.status_code == 200, response.text
            events = list(read_sse(iter(response.text.splitlines())))
            assert events[0][0] == "queued"
            assert events[-1][0] == "done" and events[-1][1]["text"] == "back"
    finally:
        server.stop()


def test_a_stream_rides_out_an_outage_that_starts_right_after_its_job_is_enqueued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis goes away between enqueueing the job and the stream's first read of its queue position: the stream
    still starts with `queued` (position 0, as nothing better is known) and ends `done` once Redis is back."""
    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()  # the queued job survives the restart
    real_enqueue = jobs.enqueue

    def enqueue_then_lose_redis(*args, **kwargs):
        job = real_enqueue(*args, **kwargs)
        server.stop()
        return job

    try:
        with TestClient(create_app(settings_for(server.url), timings=FAST, run_sweeper=False)) as client:
            wait_ready(client)
            redis_client = connect(server.url)
            ScriptedWorker(redis_client).register()
            redis_client.close()
            monkeypatch.setattr(jobs, "enqueue", enqueue_then_lose_redis)
            with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
                assert response.status_code == 200
                events = read_sse(response.iter_lines())
                name, data = next(events)
                assert (name, data.get("position")) == ("queued", 0), data
                server = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=True).start()
                redis_client = connect(server.url)
                running = ScriptedWorker(redis_client).in_thread(lambda w: w.serve_one(["after", " all"]))
                rest = list(events)
                assert running.result().job_id == data["job_id"]
                redis_client.close()
            assert rest[-1][0] == "done" and rest[-1][1]["text"] == "after all", rest
    finally:
        server.stop()


class FailingReads:
    """The stream's reads of the queue and the job record fail as in an outage while `down` is set (its events
    still come through the relay); `failed` is set by the first read that fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = threading.Event()
        self.failed = threading.Event()
        real_view, real_position = jobs.view, ControllerContext.queue_position

        def view(*args, **kwargs):
            self.fail_if_down()
            return real_view(*args, **kwargs)

        async def queue_position(ctx: ControllerContext, model: str, job_id: str) -> int | None:
            self.fail_if_down()
            return await real_position(ctx, model, job_id)

        monkeypatch.setattr(jobs, "view", view)
        monkeypatch.setattr(ControllerContext, "queue_position", queue_position)

    def fail_if_down(self) -> None:
        if self.down.is_set():
            self.failed.set()
            raise redis.ConnectionError("Redis is down (the test's outage)")


def test_two_short_outages_are_measured_each_on_its_own(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event heard between two outages ends the first: together they last longer than the allowance, each of
    them does not, and the stream ends done."""
    allowance_s = 2.0
    outage_s = 0.65 * allowance_s
    reads = FailingReads(monkeypatch)
    worker = ScriptedWorker(redis_client).register()
    timings = replace(FAST, redis_outage_s=allowance_s)
    with TestClient(create_app(settings_for(redis_url), timings=timings, run_sweeper=False)) as client:
        with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
            events = read_sse(response.iter_lines())
            assert next(events)[0] == "queued"
            job = worker.claim()
            worker.start(job)
            worker.publish(TokenEvent(job_id=job.job_id, text="one", seq=1))
            assert next(events)[0] == "token"
            reads.down.set()
            assert reads.failed.wait(5)  # the stream's record check failed: the first outage has begun
            time.sleep(outage_s)  # the first outage
            worker.publish(TokenEvent(job_id=job.job_id, text=" two", seq=2))  # Redis answers through the relay
            assert next(events) == ("token", {"job_id": job.job_id, "type": "token", "text": " two", "seq": 2})
            reads.failed.clear()
            assert reads.failed.wait(5)  # the second outage
            time.sleep(outage_s)
            reads.down.clear()
            worker.finish(job, "one two")
            rest = list(events)
    assert [name for name, _ in rest] == ["done"], rest
    assert rest[-1][1]["text"] == "one two"
