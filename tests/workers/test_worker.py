"""The worker loop with the scripted engine against a real Redis: streaming, cancel, capacity, failures, drain."""

from __future__ import annotations

import io
import logging

import redis
from PIL import Image

from contract import jobs, keys
from contract.messages import DoneEvent, ErrorEvent, FinishReason, TokenEvent, WorkerInfo
from tests.workers.harness import MODEL, RunningWorker, make_worker, status, submit, wait_for
from workers.scripted import ScriptedEngine
from workers.worker_lifecycle import EXIT_DEVICE_ERROR, EXIT_OK


def test_a_job_streams_tokens_then_done_and_is_recorded(redis_client):
    with RunningWorker(make_worker(redis_client, reply_tokens=4)):
        events = submit(redis_client, "a", "red green blue").read_until_final()
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.seq for t in tokens] == list(range(1, len(tokens) + 1))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.finish_reason == FinishReason.eos
    assert done.text == "".join(t.text for t in tokens) == "red green blue red"
    assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 4
    t = done.timings
    assert t.enqueued_at <= t.started_at <= t.first_token_at <= t.finished_at
    view = wait_for(lambda: jobs.view(redis_client, "a").outcome and jobs.view(redis_client, "a"), what="record")
    assert view.status == "finished"
    assert view.outcome.text == done.text
    assert view.outcome.usage.completion_tokens == 4
    assert view.outcome.worker_id == "w1"


def test_worker_registers_with_a_ttl_and_deregisters_on_stop(redis_client):
    running = RunningWorker(make_worker(redis_client, max_batch=3)).__enter__()
    wait_for(lambda: redis_client.exists(keys.worker("w1")), what="registration")
    info = WorkerInfo.model_validate_json(redis_client.get(keys.worker("w1")))
    assert info.models == [MODEL] and info.max_batch == 3 and not info.draining
    assert 0 < redis_client.ttl(keys.worker("w1")) <= keys.WORKER_TTL_S
    assert redis_client.sismember(keys.workers(), "w1")
    assert running.stop() == EXIT_OK
    assert not redis_client.exists(keys.worker("w1"))
    assert not redis_client.sismember(keys.workers(), "w1")


def test_cancel_flag_stops_a_running_job_and_frees_its_slot(redis_client):
    with RunningWorker(make_worker(redis_client, max_batch=1, reply_tokens=10_000)):
        stream = submit(redis_client, "long")
        stream.wait_tokens(2)
        waiting = submit(redis_client, "next", "short one [[tokens=2]]")
        jobs.request_cancel(redis_client, "long", MODEL)
        final = stream.read_until_final()[-1]
        assert isinstance(final, DoneEvent) and final.finish_reason == FinishReason.cancelled
        assert isinstance(waiting.read_until_final()[-1], DoneEvent)
    assert status(redis_client, "long") == "canceled"
    assert jobs.view(redis_client, "long").outcome.finish_reason == FinishReason.cancelled


def test_a_job_cancelled_while_claimed_never_starts(redis_client):
    stream = submit(redis_client, "a")
    redis_client.set(keys.cancel("a"), "1", ex=60)  # the flag a controller sets once the job left the queue
    with RunningWorker(make_worker(redis_client)):
        final = stream.read_until_final()[-1]
    assert isinstance(final, DoneEvent) and final.finish_reason == FinishReason.cancelled
    assert status(redis_client, "a") == "canceled"


class _CountingEngine(ScriptedEngine):
    """Records the most jobs ever admitted at once and the job table's size at each step."""

    def __init__(self, client, **kwargs):
        super().__init__(**kwargs)
        self.client = client
        self.most_active = 0
        self.most_held = 0

    def add(self, prepared):
        super().add(prepared)
        self.most_active = max(self.most_active, self.active_count)

    def step(self):
        self.most_held = max(self.most_held, self.client.hlen(keys.worker_jobs("w1")))
        return super().step()


def test_never_claims_more_than_free_slots(redis_client):
    worker = make_worker(redis_client)
    engine = _CountingEngine(redis_client, max_batch=2, reply_tokens=6, step_delay_s=0.005)
    worker.engine = engine
    streams = [submit(redis_client, f"j{i}") for i in range(6)]
    with RunningWorker(worker):
        for stream in streams:
            assert isinstance(stream.read_until_final()[-1], DoneEvent)
    assert engine.most_active == 2
    assert engine.most_held <= 2


def test_a_job_that_does_not_fit_goes_back_and_runs_later(redis_client):
    worker = make_worker(redis_client)
    worker.engine = ScriptedEngine(max_batch=4, token_budget=40, reply_tokens=30, step_delay_s=0.005)
    first = submit(redis_client, "big", max_new_tokens=30)  # 4 + 30 tokens of the 40
    with RunningWorker(worker):
        first.wait_tokens(1)
        second = submit(redis_client, "other", max_new_tokens=30)
        events = second.read_until_final()
        assert isinstance(first.read_until_final()[-1], DoneEvent)
    done = events[-1]
    assert isinstance(done, DoneEvent)
    view_big = jobs.view(redis_client, "big").outcome
    assert done.timings.started_at >= view_big.timings.finished_at  # it waited for capacity, not failed


def test_a_job_failing_in_prepare_fails_alone(redis_client):
    with RunningWorker(make_worker(redis_client, reply_tokens=3)):
        bad = submit(redis_client, "bad", "please [[invalid]]")
        crash = submit(redis_client, "crash", "please [[crash]]")
        good = submit(redis_client, "good")
        bad_final = bad.read_until_final()[-1]
        crash_final = crash.read_until_final()[-1]
        good_final = good.read_until_final()[-1]
    assert isinstance(bad_final, ErrorEvent) and bad_final.code == "invalid_request"
    assert isinstance(crash_final, ErrorEvent) and crash_final.code == "generation_failed"
    assert isinstance(good_final, DoneEvent)
    assert status(redis_client, "bad") == "failed"
    assert jobs.view(redis_client, "bad").outcome.error.code == "invalid_request"


def test_image_jobs(redis_client):
    from contract.messages import JobRequest

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    redis_client.set(keys.image("d1"), buffer.getvalue(), ex=60)
    streams = {}
    for job_id, digest in (("ok", "d1"), ("missing", "nope")):
        from tests.workers.harness import Stream

        streams[job_id] = Stream(redis_client, job_id)
        request = JobRequest(job_id=job_id, model=MODEL, prompt="<image> look", images=[digest])
        jobs.enqueue(redis_client, request, max_queue=10, result_ttl=600)
    with RunningWorker(make_worker(redis_client, reply_tokens=2, image_tokens=10)):
        ok = streams["ok"].read_until_final()[-1]
        missing = streams["missing"].read_until_final()[-1]
    assert isinstance(ok, DoneEvent) and ok.usage.prompt_tokens == 12
    assert isinstance(missing, ErrorEvent) and missing.code == "invalid_image" and "nope" in missing.message


def test_a_device_error_fails_its_job_and_the_worker_goes_on(redis_client):
    with RunningWorker(make_worker(redis_client, reply_tokens=5, error_after_tokens=2)) as running:
        bad = submit(redis_client, "bad", "boom [[device-error]]")
        final = bad.read_until_final()[-1]
        later = submit(redis_client, "later").read_until_final()[-1]
        assert running.thread.is_alive()
    assert isinstance(final, ErrorEvent) and final.code == "device_error" and final.text == "boom boom"
    assert isinstance(later, DoneEvent)


def test_a_lost_device_stops_the_worker_non_zero_and_requeues_unstarted_jobs(redis_client):
    worker = make_worker(redis_client, max_batch=1, reply_tokens=50, error_after_tokens=3)
    lost = submit(redis_client, "lost", "boom [[device-lost]]")
    queued = submit(redis_client, "queued")
    running = RunningWorker(worker).__enter__()
    assert running.join() == EXIT_DEVICE_ERROR
    final = lost.read_until_final()[-1]
    assert isinstance(final, ErrorEvent) and final.code == "device_error"
    assert status(redis_client, "queued") == "queued"
    assert jobs.queue_position(redis_client, MODEL, "queued") == 0
    assert not redis_client.exists(keys.worker("w1"))
    assert not redis_client.sismember(keys.workers(), "w1")
    # another worker serves what the broken one never started
    with RunningWorker(make_worker(redis_client, worker_id="w2", reply_tokens=2)):
        assert isinstance(queued.read_until_final()[-1], DoneEvent)


def test_stop_drains_running_jobs_then_exits_zero(redis_client):
    with RunningWorker(make_worker(redis_client, reply_tokens=30)) as running:
        stream = submit(redis_client, "a")
        stream.wait_tokens(1)
        assert running.stop() == EXIT_OK
    assert isinstance(stream.read_until_final()[-1], DoneEvent)
    assert status(redis_client, "a") == "finished"


class _QuietEngine(ScriptedEngine):
    """Holds back the text of job `quiet`, so it is admitted but has streamed nothing."""

    def step(self):
        return [u for u in super().step() if u.job_id != "quiet" or u.finish_reason is not None]


def test_drain_timeout_requeues_unstarted_and_fails_streaming_jobs(redis_client):
    worker = make_worker(redis_client, drain_timeout_s=0.0)
    worker.engine = _QuietEngine(max_batch=2, reply_tokens=10_000, step_delay_s=0.005)
    streaming = submit(redis_client, "streaming")
    submit(redis_client, "quiet", subscribe=False)
    running = RunningWorker(worker).__enter__()
    streaming.wait_tokens(1)
    wait_for(lambda: status(redis_client, "quiet") == "started", what="quiet job started")
    assert running.stop() == EXIT_OK
    final = streaming.read_until_final()[-1]
    assert isinstance(final, ErrorEvent) and final.code == "worker_lost"
    assert "regenerate" in final.message.lower()
    assert status(redis_client, "streaming") == "failed"
    assert status(redis_client, "quiet") == "queued"
    assert jobs.queue_position(redis_client, MODEL, "quiet") == 0
    assert not redis_client.sismember(keys.workers(), "w1")
    assert not redis_client.exists(keys.worker_jobs("w1"))


def test_a_busy_worker_admits_a_job_arriving_mid_batch(redis_client):
    worker = make_worker(redis_client, max_batch=2, reply_tokens=40, step_delay_s=0.02)
    with RunningWorker(worker):
        first = submit(redis_client, "long")
        first.wait_tokens(2)
        second = submit(redis_client, "short", "[[tokens=3]] hi")
        second_events = second.read_until_final()
        assert isinstance(second_events[-1], DoneEvent)
        # the first job was still running when the second one (claimed between its decode steps) finished
        assert status(redis_client, "long") == "started"
        assert isinstance(first.read_until_final()[-1], DoneEvent)


class _FinalPublishFailsOnce(redis.Redis):
    """A real Redis client whose first plain PUBLISH (the worker's final event) fails as a dropped connection."""

    failed = False

    def publish(self, channel, message, **kwargs):
        if not self.failed:
            self.failed = True
            raise redis.ConnectionError("connection dropped before the final event went out")
        return super().publish(channel, message, **kwargs)


def test_a_retried_final_event_records_the_outcome_once_without_metrics(redis_client, monkeypatch, caplog):
    finished = []
    real_finish = jobs.finish
    monkeypatch.setattr(jobs, "finish", lambda *a, **kw: (finished.append(a[2].job_id), real_finish(*a, **kw)))
    flaky = _FinalPublishFailsOnce(connection_pool=redis_client.connection_pool)
    worker = make_worker(flaky, reply_tokens=3)
    assert worker.metrics is None
    caplog.set_level(logging.INFO, logger="workers.worker")
    with RunningWorker(worker):
        events = submit(redis_client, "a").read_until_final()
    assert isinstance(events[-1], DoneEvent) and flaky.failed
    assert finished == ["a"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("job a ")] == [
        "job a finished (3 tokens)"
    ]
