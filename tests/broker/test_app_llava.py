"""LLaVA wire compatibility: the controller endpoints and the NUL-delimited stream LLaVA clients read."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from broker import jobs
from broker.app import create_app
from contract.keys import rq_queue as rq_queue_key
from tests.broker.scripted_worker import FAST, ScriptedWorker, png_b64, settings_for


def llava_chunks(response) -> list[dict]:
    """How LLaVA's UI reads the stream: `iter_lines(delimiter=b"\\0")`, one JSON object per piece."""
    data = b"".join(response.iter_bytes())
    assert data.endswith(b"\0")
    return [json.loads(piece) for piece in data.split(b"\0") if piece]


PROMPT = "A chat. USER: <image>\nWhat is this? ASSISTANT:"


def llava_body(**overrides) -> dict:
    body = {
        "model": "tiny-llava",
        "prompt": PROMPT,
        "images": [png_b64()],
        "temperature": 0.2,
        "top_p": 0.7,
        "max_new_tokens": 64,
        "stop": "</s>",
    }
    return {**body, **overrides}


def test_stream_is_nul_delimited_cumulative_text_with_the_prompt(client: TestClient, worker: ScriptedWorker) -> None:
    running = worker.in_thread(lambda w: w.serve_one([" A", " red", " square"]))
    with client.stream("POST", "/worker_generate_stream", json=llava_body()) as response:
        assert response.status_code == 200
        chunks = llava_chunks(response)
    job = running.result()
    assert [c["text"] for c in chunks] == [PROMPT + " A", PROMPT + " A red", PROMPT + " A red square"]
    assert all(c["error_code"] == 0 for c in chunks)
    assert job.prompt == PROMPT and len(job.images) == 1
    assert job.params.stop == ["</s>"] and job.params.max_new_tokens == 64


def test_stop_may_be_null(client: TestClient, worker: ScriptedWorker) -> None:
    running = worker.in_thread(lambda w: w.serve_one(["ok"]))
    with client.stream("POST", "/worker_generate_stream", json=llava_body(stop=None)) as response:
        chunks = llava_chunks(response)
    assert running.result().params.stop == []
    assert chunks[-1]["text"] == PROMPT + "ok"


def test_worker_error_becomes_a_nonzero_error_code_with_the_real_message(
    client: TestClient, worker: ScriptedWorker
) -> None:
    def script(w: ScriptedWorker):
        job = w.claim()
        w.start(job)
        w.fail(job, "context_length_exceeded", "prompt is 3000 tokens, the model's context is 2048")

    running = worker.in_thread(script)
    with client.stream("POST", "/worker_generate_stream", json=llava_body()) as response:
        chunks = llava_chunks(response)
    running.result()
    assert chunks[-1]["error_code"] == 1
    assert "2048" in chunks[-1]["text"] and "NETWORK ERROR" not in chunks[-1]["text"]
    assert chunks[-1]["error"]["code"] == "context_length_exceeded"


def test_image_count_must_match_placeholders(client: TestClient, worker: ScriptedWorker) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(images=[png_b64(), png_b64()]))
    assert response.status_code == 422
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert chunk["error_code"] == 1
    assert "1 <image> placeholder" in chunk["text"] and "2 image" in chunk["text"]


def test_literal_image_placeholder_without_an_image_is_refused(client: TestClient, worker: ScriptedWorker) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(images=[]))
    assert response.status_code == 422
    assert "1 <image> placeholder" in json.loads(response.content.rstrip(b"\0"))["text"]


def test_unknown_model_is_error_code_2(client: TestClient, worker: ScriptedWorker) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(model="other"))
    assert response.status_code == 404
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert chunk["error_code"] == 2 and "'tiny-llava'" in chunk["text"]


def test_invalid_sampling_values_are_named(client: TestClient, worker: ScriptedWorker) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(temperature=9))
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert response.status_code == 422 and chunk["error_code"] == 1 and "temperature" in chunk["text"]


def test_disconnect_cancels_the_queued_job(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    with client.stream("POST", "/worker_generate_stream", json=llava_body()) as response:
        assert response.status_code == 200
        job_id = response.headers["x-job-id"]
        assert redis_client.llen(rq_queue_key("tiny-llava")) == 1
    assert redis_client.llen(rq_queue_key("tiny-llava")) == 0
    assert jobs.view(redis_client, job_id).status == "canceled"


def test_controller_endpoints(client: TestClient, worker: ScriptedWorker) -> None:
    assert client.post("/list_models").json() == {"models": ["tiny-llava"]}
    assert client.post("/get_worker_address", json={"model": "tiny-llava"}).json() == {"address": "http://testserver"}
    assert client.post("/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
    status = client.post("/worker_get_status").json()
    assert status == {"model_names": ["tiny-llava"], "speed": 1, "queue_length": 0}
    refresh = client.post("/refresh_all_workers")
    assert refresh.status_code == 200 and refresh.json() is None


def test_public_url_is_the_worker_address(redis_url: str, redis_client, worker: ScriptedWorker) -> None:
    settings = settings_for(redis_url, public_url="https://llava.example.org/")
    with TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client:
        reply = client.post("/get_worker_address", json={"model": "tiny-llava"}).json()
    assert reply == {"address": "https://llava.example.org"}


@pytest.mark.parametrize("path", ["/register_worker", "/receive_heart_beat"])
def test_http_registration_is_gone(client: TestClient, path: str) -> None:
    response = client.post(path, json={"worker_name": "http://x:40000", "check_heart_beat": True})
    assert response.status_code == 410
    error = response.json()["error"]
    assert error["code"] == "endpoint_removed"
    assert "llava-serve worker" in error["message"] and "--redis-url" in error["message"]
