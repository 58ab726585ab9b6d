"""LLaVA wire compatibility: the controller endpoints and the NUL-delimited stream LLaVA clients read."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.context import StreamTimings
from contract import jobs, keys
from contract.keys import rq_queue
from tests.broker.scripted_worker import FAST, ScriptedWorker, Watchdog, png_b64, settings_for


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


def test_tags_in_error_texts_are_quoted_for_llavas_page(client: TestClient, worker: ScriptedWorker) -> None:
    """LLaVA's Gradio page renders an error chunk's text as Markdown, where a bare `<image>` or `</s>` is an HTML tag
    and vanishes; the text quotes them as code (once), the `error` object keeps the message as is."""
    message = "prompt has 2 <image> tokens but 1 image was given; `<image>` stays; stop at </s>"

    def script(w: ScriptedWorker):
        job = w.claim()
        w.start(job)
        w.fail(job, "invalid_request", message, status_code=422)

    running = worker.in_thread(script)
    with client.stream("POST", "/worker_generate_stream", json=llava_body()) as response:
        chunks = llava_chunks(response)
    running.result()
    assert chunks[-1]["text"] == "prompt has 2 `<image>` tokens but 1 image was given; `<image>` stays; stop at `</s>`"
    assert chunks[-1]["error"] == {"code": "invalid_request", "message": message}


def test_image_count_must_match_placeholders(client: TestClient, worker: ScriptedWorker) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(images=[png_b64(), png_b64()]))
    assert response.status_code == 422
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert chunk["error_code"] == 1
    assert "1 `<image>` placeholder" in chunk["text"] and "2 image" in chunk["text"]
    assert "1 <image> placeholder" in chunk["error"]["message"]  # the API's own field keeps the message as is


def test_literal_image_placeholder_without_an_image_is_refused(client: TestClient, worker: ScriptedWorker) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(images=[]))
    assert response.status_code == 422
    assert "1 `<image>` placeholder" in json.loads(response.content.rstrip(b"\0"))["text"]


def test_empty_prompt_is_refused_naming_it(client: TestClient, worker: ScriptedWorker) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(prompt="", images=[]))
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert response.status_code == 422 and chunk["error_code"] == 1
    assert chunk["error"]["code"] == "invalid_request" and "prompt" in chunk["text"] and "empty" in chunk["text"]
    assert worker.redis.llen(rq_queue("tiny-llava")) == 0


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
        assert redis_client.llen(rq_queue("tiny-llava")) == 1
    assert redis_client.llen(rq_queue("tiny-llava")) == 0
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


# The original page's sliders (llava/serve/gradio_web_server.py): temperature and top_p 0 to 1 in steps of 0.1,
# max output tokens 0 to 1024 in steps of 64; it sends min(max_new_tokens, 1536).
SLIDER_TENTHS = [round(k * 0.1, 1) for k in range(11)]
SLIDER_TOKENS = list(range(0, 1025, 64))


@pytest.mark.parametrize(
    "field, value",
    [("temperature", v) for v in SLIDER_TENTHS]
    + [("top_p", v) for v in SLIDER_TENTHS]
    + [("max_new_tokens", v) for v in SLIDER_TOKENS],
)
def test_every_value_of_the_original_sliders_is_accepted(
    client: TestClient, worker: ScriptedWorker, field: str, value: float
) -> None:
    generates = not (field == "max_new_tokens" and value == 0)
    running = worker.in_thread(lambda w: w.serve_one(["ok"])) if generates else None
    with client.stream("POST", "/worker_generate_stream", json=llava_body(**{field: value})) as response:
        assert response.status_code == 200
        chunks = llava_chunks(response)
    assert all(c["error_code"] == 0 for c in chunks)
    if running is not None:
        running.result()


def test_top_p_zero_is_greedy(client: TestClient, worker: ScriptedWorker) -> None:
    # LLaVA's worker keeps only the most likely token when top_p is 0: greedy decoding, whatever the temperature.
    running = worker.in_thread(lambda w: w.serve_one(["ok"]))
    with client.stream("POST", "/worker_generate_stream", json=llava_body(temperature=0.7, top_p=0)) as response:
        assert response.status_code == 200
        chunks = llava_chunks(response)
    job = running.result()
    assert job.params.temperature == 0
    assert chunks[-1] == {"text": PROMPT + "ok", "error_code": 0}


def test_max_new_tokens_zero_generates_nothing_and_ends_at_once(
    client: TestClient, worker: ScriptedWorker, redis_client
) -> None:
    # LLaVA's worker returns at once without generating when max_new_tokens < 1: one chunk, error_code 0.
    with client.stream("POST", "/worker_generate_stream", json=llava_body(max_new_tokens=0)) as response:
        assert response.status_code == 200
        chunks = llava_chunks(response)
    assert chunks == [{"text": PROMPT, "error_code": 0}]
    assert redis_client.llen(rq_queue("tiny-llava")) == 0


def test_max_new_tokens_zero_still_checks_the_request(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    response = client.post("/worker_generate_stream", json=llava_body(max_new_tokens=0, model="other"))
    assert response.status_code == 404
    response = client.post("/worker_generate_stream", json=llava_body(max_new_tokens=0, images=[]))
    assert response.status_code == 422
    response = client.post("/worker_generate_stream", json=llava_body(max_new_tokens=0, images=["bm90IGFuIGltYWdl"]))
    assert response.status_code == 400 and "images[0]" in json.loads(response.content.rstrip(b"\0"))["text"]
    client.post("/worker_generate_stream", json=llava_body(max_new_tokens=0))
    assert redis_client.keys(keys.image("*")) == []
    response = client.post("/worker_generate_stream", json=llava_body(max_new_tokens=-1))
    assert response.status_code == 422 and "max_new_tokens" in json.loads(response.content.rstrip(b"\0"))["text"]


def test_a_queued_job_keeps_llavas_clients_reading(redis_url: str, worker: ScriptedWorker) -> None:
    """LLaVA's clients give up after 10 s without a byte; a job waiting longer than the keepalive interval gets bare
    separators, which they skip, and then its text."""
    patient = StreamTimings(stall_check_s=0.3, no_worker_timeout_s=60.0)  # the job waits, unclaimed, past 5 s
    app = create_app(settings_for(redis_url), timings=patient, run_sweeper=False)
    with TestClient(app) as client, client.stream("POST", "/worker_generate_stream", json=llava_body()) as response:
        assert response.status_code == 200
        pieces = response.iter_raw()
        first = next(pieces)  # nothing claims the job: only a keepalive can arrive
        assert first == b"\0"
        running = worker.in_thread(lambda w: w.serve_one([" A", " square"]))
        data = first + b"".join(pieces)
    running.result()
    assert data.startswith(b"\0") and data.endswith(b"\0")
    chunks = [json.loads(piece) for piece in data.split(b"\0") if piece]
    assert [c["text"] for c in chunks] == [PROMPT + " A", PROMPT + " A square"]
    assert b"\0\0" not in data.split(b"{", 1)[1]  # no keepalive once the text has started


def test_a_claimed_job_silent_for_long_keeps_llavas_clients_reading(
    client: TestClient, worker: ScriptedWorker, redis_client
) -> None:
    """A job claimed by a worker that makes no text for longer than LLaVA's 10 s read timeout (a long prefill, or a
    frozen worker the sweeper has not caught yet) still gets a bare separator at most every keepalive interval."""
    keepalive_s = 5.0
    start = time.monotonic()
    arrivals: list[float] = []  # of each bare keepalive separator
    with client.stream("POST", "/worker_generate_stream", json=llava_body()) as response:
        assert response.status_code == 200
        job = worker.claim()
        worker.start(job)  # and then silence
        watchdog = Watchdog(redis_client, job.job_id, after_s=30.0)
        try:
            data = b""
            for piece in response.iter_raw():
                data += piece
                while data.startswith(b"\0"):
                    arrivals.append(time.monotonic())
                    data = data[1:]
                    if len(arrivals) == 3:  # more than 10 s of silence kept alive: the text comes now
                        worker.tokens(job, [" A", " square"])
                        worker.finish(job, " A square")
        finally:
            watchdog.cancel()
    chunks = [json.loads(piece) for piece in data.split(b"\0") if piece]
    assert [c["text"] for c in chunks] == [PROMPT + " A", PROMPT + " A square"], chunks
    assert len(arrivals) == 3
    gaps = [later - earlier for earlier, later in zip([start, *arrivals[:-1]], arrivals, strict=True)]
    assert all(gap <= keepalive_s + 1.0 for gap in gaps), gaps
