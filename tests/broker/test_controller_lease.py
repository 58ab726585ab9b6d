"""A controller that dies (SIGKILL) leaves nobody to read its jobs: its lease lapses, the worker cancels its running
jobs and never starts its queued ones, while the jobs of another controller go on unaffected."""

from __future__ import annotations

import signal
import threading
from typing import Any

from fastapi.testclient import TestClient

from broker.app import create_app
from cli.processes import start_controller
from contract import jobs, keys
from contract.client import ControllerClient
from contract.errors import LlavaError
from contract.messages import ChatMessage, DoneEvent, GenerateRequest, QueuedEvent, TokenEvent
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, read_sse, settings_for
from tests.workers.harness import MODEL, RunningWorker, make_worker, wait_for


class StreamThread:
    """One streaming request through a controller, read in a thread; `events` fills as they arrive."""

    def __init__(self, url: str, text: str) -> None:
        self.events: list[Any] = []
        self.client = ControllerClient(url)
        request = GenerateRequest(
            model=MODEL, messages=[ChatMessage(role="user", content=text)], max_new_tokens=4096, temperature=0
        )

        def read() -> None:
            try:
                for event in self.client.generate(request):
                    self.events.append(event)
            except LlavaError:  # the controller died under it
                pass

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    @property
    def job_id(self) -> str | None:
        return next((e.job_id for e in self.events if isinstance(e, QueuedEvent)), None)

    def tokens(self) -> int:
        return sum(isinstance(e, TokenEvent) for e in self.events)


def test_the_jobs_of_a_killed_controller_are_cancelled_and_its_queued_jobs_never_start(
    redis_client, redis_url, tmp_path
):
    doomed, doomed_url = start_controller(redis_url, tmp_path)
    survivor, survivor_url = start_controller(redis_url, tmp_path)
    try:
        with RunningWorker(make_worker(redis_client, max_batch=3, step_delay_s=0.05)):
            other = StreamThread(survivor_url, "keep [[tokens=200]]")
            wait_for(lambda: other.tokens() >= 1, what="the other controller's job streaming")
            running = [StreamThread(doomed_url, "talk [[tokens=100000]]") for _ in range(2)]
            wait_for(lambda: all(s.tokens() >= 1 for s in running), what="the doomed controller's jobs streaming")
            queued = [StreamThread(doomed_url, "wait [[tokens=100000]]") for _ in range(3)]
            wait_for(lambda: all(s.job_id for s in queued), what="the queued jobs' ids")
            assert all(jobs.view(redis_client, s.job_id).status == "queued" for s in queued)
            doomed.signal(signal.SIGKILL)

            bound_s = 2 * keys.CONTROLLER_LEASE_TTL_S + 10  # the lease lapses, then (fresh Redis) the judging grace
            for stream in (*running, *queued):
                wait_for(
                    lambda s=stream: jobs.view(redis_client, s.job_id).status == "canceled",
                    timeout=bound_s,
                    what=f"job {stream.job_id} of the killed controller cancelled",
                )
            for stream in running:
                outcome = jobs.view(redis_client, stream.job_id).outcome
                assert outcome.finish_reason == "cancelled" and outcome.usage.completion_tokens < 4096
            for stream in queued:
                record = jobs.fetch_job(redis_client, stream.job_id)
                assert record.started_at is None  # never marked started
                assert jobs.view(redis_client, stream.job_id).outcome.usage.completion_tokens == 0

            other.thread.join(60)
            final = other.events[-1]
            assert isinstance(final, DoneEvent) and final.finish_reason == "eos", final
            assert final.text == " ".join(["keep"] * 200)
            assert jobs.view(redis_client, other.job_id).status == "finished"
    finally:
        doomed.stop()
        survivor.stop()


def test_the_controller_holds_its_lease_while_it_runs_and_its_jobs_name_it(redis_url, redis_client):
    with TestClient(create_app(settings_for(redis_url), timings=FAST, run_sweeper=False)) as client:
        controller_id = client.app.state.ctx.controller_id
        lease = keys.controller(controller_id)
        wait_for(lambda: redis_client.exists(lease), what="the lease")
        assert 0 < redis_client.ttl(lease) <= keys.CONTROLLER_LEASE_TTL_S
        worker = ScriptedWorker(redis_client).register()
        script = worker.in_thread(lambda w: w.serve_one(["ok"]))
        with client.stream("POST", "/api/v1/generate", json=chat_body()) as response:
            assert [name for name, _ in read_sse(response.iter_lines())][-1] == "done"
        assert script.result().controller_id == controller_id
    assert not redis_client.exists(lease)  # a controller that stops lets go at once
