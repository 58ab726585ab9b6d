"""The controller client the UI uses (`contract.client`) against the real controller app, with a scripted worker
(a stand-in, not a model)."""

from __future__ import annotations

import threading

import pytest
import redis

from contract import jobs
from contract.client import ControllerClient
from contract.errors import ControllerUnreachable, ErrorCode, ImageInvalid, ModelNotFound, NoWorker, QueueFull
from contract.messages import (
    DoneEvent,
    ErrorEvent,
    FinishReason,
    GenerateRequest,
    ImageUrl,
    ImageUrlPart,
    JobRequest,
    QueuedEvent,
    TextPart,
    TokenEvent,
)
from infra.embedded_redis import free_port
from tests.frontend.conftest import MODEL


def ask(model: str, text: str = "red green blue", image_url: str | None = None, **params) -> GenerateRequest:
    parts = [TextPart(text=text)]
    if image_url:
        parts.insert(0, ImageUrlPart(image_url=ImageUrl(url=image_url)))
    return GenerateRequest(model=model, messages=[{"role": "user", "content": parts}], **params)


def test_models_list_live_workers(controller_url, scripted_worker):
    models = ControllerClient(controller_url).list_models()
    assert [(m.name, m.workers) for m in models] == [(MODEL, 1)]


def test_a_reply_streams_token_by_token(controller_url, scripted_worker):
    events = list(ControllerClient(controller_url).generate(ask(MODEL, max_new_tokens=5)))
    tokens = [e.text for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == 5
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].text == "".join(tokens) == "red green blue red green"
    assert events[-1].finish_reason is FinishReason.length
    view = ControllerClient(controller_url).job(events[-1].job_id)
    assert view.outcome is not None and view.outcome.text == events[-1].text
    assert all(e.job_id == events[-1].job_id for e in events)


def test_unreachable_controller_is_named():
    client = ControllerClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ControllerUnreachable) as err:
        client.list_models()
    assert err.value.code == ErrorCode.controller_unreachable and "cannot reach the controller" in err.value.message
    with pytest.raises(ControllerUnreachable, match="cannot reach the controller"):
        list(client.generate(ask(MODEL)))


def test_unknown_model_and_model_without_worker(controller_url, redis_client: redis.Redis):
    client = ControllerClient(controller_url)
    with pytest.raises(ModelNotFound) as err:
        list(client.generate(ask("no-such-model")))
    assert (err.value.code, err.value.status_code) == (ErrorCode.model_not_found, 404)
    jobs.enqueue(redis_client, JobRequest(job_id="old", model="orphan"), max_queue=10, result_ttl=60)
    with pytest.raises(NoWorker) as err:
        list(client.generate(ask("orphan")))
    assert (err.value.code, err.value.status_code) == (ErrorCode.no_worker, 503)


def test_rejected_image_says_why(controller_url, scripted_worker):
    with pytest.raises(ImageInvalid) as err:
        list(ControllerClient(controller_url).generate(ask(MODEL, image_url="data:image/png;base64,bm90IGFuIGltYWdl")))
    assert err.value.code == ErrorCode.invalid_image
    assert "cannot be decoded" in err.value.message


def test_queue_full_carries_retry_after(controller_url, idle_worker, redis_client):
    for i in range(2):  # the test controller's max_queue
        jobs.enqueue(redis_client, JobRequest(job_id=f"w{i}", model=idle_worker), max_queue=10, result_ttl=60)
    with pytest.raises(QueueFull) as err:
        list(ControllerClient(controller_url).generate(ask(idle_worker)))
    assert (err.value.code, err.value.status_code) == (ErrorCode.queue_full, 429)
    assert isinstance(err.value.retry_after, int) and err.value.retry_after >= 1


def test_a_queued_job_reports_its_position_and_cancel_ends_it(controller_url, idle_worker, redis_client):
    jobs.enqueue(redis_client, JobRequest(job_id="ahead", model=idle_worker), max_queue=10, result_ttl=60)
    client = ControllerClient(controller_url)
    stream = client.generate(ask(idle_worker))
    first = next(stream)
    assert isinstance(first, QueuedEvent) and first.position == 1
    threading.Thread(target=client.cancel, args=(first.job_id,)).start()
    rest = list(stream)
    assert isinstance(rest[-1], DoneEvent) and rest[-1].finish_reason is FinishReason.cancelled
    assert jobs.queue_position(redis_client, idle_worker, first.job_id) is None


def test_an_error_after_the_stream_started_is_an_event(controller_url, redis_url):
    from tests.frontend.conftest import start_worker

    worker = start_worker(redis_url, context_length=4)
    try:
        events = list(ControllerClient(controller_url).generate(ask(MODEL, text="one two three four five six")))
    finally:
        worker.stop()
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == ErrorCode.context_length_exceeded
