"""`/v1/chat/completions`, `/v1/completions` and `/v1/models` through the official `openai` client, against real
Redis and a scripted stand-in worker."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import openai
import pytest
import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from contract import jobs, keys
from contract.keys import rq_queue
from contract.messages import FinishReason
from tests.broker.scripted_worker import FAST, ScriptedWorker, png_b64, settings_for
from tests.broker.test_remote_images import IMAGE, policy, server  # noqa: F401 - `server` is a fixture

MODEL = "tiny-llava"


def make_client(redis_url: str, **overrides) -> TestClient:
    return TestClient(create_app(settings_for(redis_url, **overrides), timings=FAST, run_sweeper=False))


@pytest.fixture
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    with make_client(redis_url) as test_client:
        yield test_client


def oai(test_client: TestClient, api_key: str = "unused") -> openai.OpenAI:
    """The official client, speaking to the in-process app (TestClient is an httpx.Client)."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=test_client, max_retries=0)


@pytest.fixture
def worker(redis_client: redis.Redis) -> ScriptedWorker:
    return ScriptedWorker(redis_client, model=MODEL).register()


def user_turn(text: str = "What is in the picture?", image: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image, "detail": "low"}})
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def test_models_lists_models_of_live_workers(client: TestClient, worker: ScriptedWorker) -> None:
    models = oai(client).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "llava-serve"


def test_completion_with_a_data_url_image(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["A", " red", " square."]))
    image = f"data:image/png;base64,{png_b64()}"
    reply = oai(client).chat.completions.create(
        model=MODEL, messages=user_turn(image=image), temperature=0, max_tokens=16, stop="###", seed=7
    )
    job = script.result()
    assert reply.choices[0].message.content == "A red square."
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.id == f"chatcmpl-{job.job_id}" and reply.model == MODEL
    assert reply.usage.completion_tokens == len("A red square.")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Same job as /api/v1/generate would queue: sampling mapped, the image stored by digest.
    assert job.params.temperature == 0 and job.params.max_new_tokens == 16
    assert job.params.stop == ["###"] and job.params.seed == 7
    assert job.messages is not None and [m.role for m in job.messages] == ["system", "user"]
    assert [p.type for p in job.messages[1].content] == ["text", "image"] and len(job.images) == 1


def test_openai_defaults_apply(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["ok"], FinishReason.length))
    reply = oai(client).chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "hi"}])
    job = script.result()
    assert reply.choices[0].finish_reason == "length"
    assert job.params.temperature == 1.0 and job.params.top_p == 1.0
    assert job.messages is not None and job.messages[0].role == "system"


def test_streaming_completion_with_usage(client: TestClient, worker: ScriptedWorker) -> None:
    pieces = ["Two", " cats", "."]
    script = worker.in_thread(lambda w: w.serve_one(pieces))
    stream = oai(client).chat.completions.create(
        model=MODEL, messages=user_turn(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    job = script.result()
    assert all(c.id == f"chatcmpl-{job.job_id}" and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Two cats."
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len("Two cats.")


def test_streaming_without_usage_has_no_usage_chunk(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["x"]))
    chunks = list(oai(client).chat.completions.create(model=MODEL, messages=user_turn(), stream=True))
    script.result()
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_error_after_the_stream_started_raises_in_the_client(client: TestClient, worker: ScriptedWorker) -> None:
    thread = worker.in_thread(lambda w: w.stream_then_fail(["partial"], "device_error", "the GPU fell over"))
    stream = oai(client).chat.completions.create(model=MODEL, messages=user_turn(), stream=True)
    with pytest.raises(openai.APIError, match="the GPU fell over") as raised:
        list(stream)
    thread.result()
    assert raised.value.body["code"] == "device_error"


def test_error_of_a_non_streaming_job_keeps_its_status(client: TestClient, worker: ScriptedWorker) -> None:
    thread = worker.in_thread(lambda w: w.fail(w.claim(), "invalid_image", "image 123 could not be decoded", 400))
    with pytest.raises(openai.BadRequestError, match="could not be decoded") as raised:
        oai(client).chat.completions.create(model=MODEL, messages=user_turn())
    thread.result()
    assert raised.value.body["code"] == "invalid_image"


def test_unknown_model_is_an_openai_404(client: TestClient, worker: ScriptedWorker) -> None:
    with pytest.raises(openai.NotFoundError, match="not served here") as raised:
        oai(client).chat.completions.create(model="gpt-17", messages=user_turn())
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"
    raw = client.post("/v1/chat/completions", json={"model": "gpt-17", "messages": user_turn()})
    assert raw.status_code == 404
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
    ],
)
def test_invalid_request_is_400_naming_the_field(client: TestClient, worker: ScriptedWorker, extra, param) -> None:
    body = {"model": MODEL, "messages": user_turn(), **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == param and param in error["message"]


def test_bad_data_url_is_400(client: TestClient, worker: ScriptedWorker) -> None:
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].content\[1\]") as raised:
        oai(client).chat.completions.create(model=MODEL, messages=user_turn(image="data:image/png;base64,!!!"))
    assert raised.value.body["code"] == "invalid_image"


def test_remote_images_are_refused_by_default(client: TestClient, worker: ScriptedWorker) -> None:
    with pytest.raises(openai.BadRequestError, match="--allow-remote-images"):
        oai(client).chat.completions.create(model=MODEL, messages=user_turn(image="https://example.com/cat.png"))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.1.2.3"])
def test_allowed_remote_images_still_refuse_private_hosts(redis_url, redis_client, host: str) -> None:
    ScriptedWorker(redis_client, model=MODEL).register()
    with make_client(redis_url, allow_remote_images=True) as allowing:
        with pytest.raises(openai.BadRequestError, match="non-public address") as raised:
            oai(allowing).chat.completions.create(model=MODEL, messages=user_turn(image=f"http://{host}:9/cat.png"))
    assert raised.value.body["code"] == "invalid_image"


def test_queue_full_is_429(redis_url: str, redis_client: redis.Redis) -> None:
    ScriptedWorker(redis_client, model=MODEL).register()
    with make_client(redis_url, max_queue=1) as small:
        from contract.messages import JobRequest

        jobs.enqueue(redis_client, JobRequest(job_id="waiting", model=MODEL), max_queue=1, result_ttl=60)
        with pytest.raises(openai.RateLimitError, match="queue of model") as raised:
            oai(small).chat.completions.create(model=MODEL, messages=user_turn())
    assert raised.value.body["type"] == "rate_limit_error" and raised.value.response.headers["retry-after"]


def test_allowed_remote_image_is_fetched_and_stored(redis_url, redis_client, server: int) -> None:  # noqa: F811
    worker = ScriptedWorker(redis_client, model=MODEL).register()
    app = create_app(settings_for(redis_url, allow_remote_images=True), timings=FAST, run_sweeper=False)
    app.state.remote_image_policy = policy()  # resolves images.test to the local server, treated as public
    with TestClient(app) as allowing:
        script = worker.in_thread(lambda w: w.serve_one(["a cat"]))
        image = f"http://images.test:{server}/cat.png"
        reply = oai(allowing).chat.completions.create(model=MODEL, messages=user_turn(image=image))
        job = script.result()
    assert reply.choices[0].message.content == "a cat"
    assert job.images == [hashlib.sha256(IMAGE).hexdigest()]
    assert redis_client.get(keys.image(job.images[0])) == IMAGE


# ---- /v1/completions ----------------------------------------------------------------------------------------


def test_text_completion(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["Paris", "."]))
    reply = oai(client).completions.create(
        model=MODEL, prompt="USER: The capital of France?\nASSISTANT:", max_tokens=8, temperature=0, seed=3, user="u"
    )
    job = script.result()
    assert reply.object == "text_completion" and reply.id == f"cmpl-{job.job_id}" and reply.model == MODEL
    assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [(0, "Paris.", "stop")]
    assert reply.usage.completion_tokens == len("Paris.")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The prompt goes to the worker as is, like LLaVA's /worker_generate_stream, with no chat template around it.
    assert job.prompt == "USER: The capital of France?\nASSISTANT:" and job.messages is None and job.images == []
    assert (job.params.max_new_tokens, job.params.temperature, job.params.seed) == (8, 0, 3)


def test_text_completion_defaults_and_a_one_string_list(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["a b c"], FinishReason.length))
    reply = oai(client).completions.create(model=MODEL, prompt=["Once upon a time"])
    job = script.result()
    assert reply.choices[0].finish_reason == "length"
    assert job.prompt == "Once upon a time"
    assert (job.params.temperature, job.params.top_p, job.params.max_new_tokens) == (1.0, 1.0, 16)


@pytest.mark.parametrize(("stop", "sent"), [("###", ["###"]), (["\n\n", "Q:"], ["\n\n", "Q:"])])
def test_text_completion_stop_strings(client: TestClient, worker: ScriptedWorker, stop, sent) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["4"], FinishReason.stop))
    reply = oai(client).completions.create(model=MODEL, prompt="Q: 2+2?\nA:", stop=stop)
    job = script.result()
    assert job.params.stop == sent
    assert reply.choices[0].text == "4" and reply.choices[0].finish_reason == "stop"


def test_streamed_text_completion_with_usage(client: TestClient, worker: ScriptedWorker) -> None:
    pieces = ["Once", " there", " was", " a cat."]
    script = worker.in_thread(lambda w: w.serve_one(pieces))
    stream = oai(client).completions.create(
        model=MODEL, prompt="Tell a story:", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    job = script.result()
    assert all(c.id == f"cmpl-{job.job_id}" and c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once there was a cat."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len("Once there was a cat.")
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_text_completion_ends_with_done(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["x", "y"]))
    body = {"model": MODEL, "prompt": "p", "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        data = [line[len("data:") :].strip() for line in response.iter_lines() if line.startswith("data:")]
    script.result()
    assert data[-1] == "[DONE]"
    assert [json.loads(d)["choices"][0]["text"] for d in data[:-1]] == ["x", "y", ""]  # no usage chunk unasked


def test_streamed_text_completion_error_raises_in_the_client(client: TestClient, worker: ScriptedWorker) -> None:
    thread = worker.in_thread(lambda w: w.stream_then_fail(["partial"], "device_error", "the GPU fell over"))
    with pytest.raises(openai.APIError, match="the GPU fell over"):
        list(oai(client).completions.create(model=MODEL, prompt="p", stream=True))
    thread.result()


def test_text_completion_disconnect_cancels_the_job(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    running = worker.in_thread(lambda w: w.stream_then_hold(["first"]))
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "p", "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        job = running.result()
        assert not jobs.is_cancel_requested(redis_client, job.job_id)
    assert jobs.is_cancel_requested(redis_client, job.job_id)


def test_text_completion_unknown_model_is_404_listing_models(client: TestClient, worker: ScriptedWorker) -> None:
    with pytest.raises(openai.NotFoundError, match=f"models served: '{MODEL}'") as raised:
        oai(client).completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"
    assert raised.value.body["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"prompt": [1, 2, 3]}, "prompt", "token arrays are not supported"),
        ({"prompt": [[1, 2], [3]]}, "prompt", "token arrays are not supported"),
        ({"prompt": ["a", "b"]}, "prompt", "exactly one string"),
        ({"prompt": 7}, "prompt", "valid string"),
        ({"prompt": "<image> what is this?"}, "prompt", "/v1/chat/completions"),
        ({"n": 2}, "n", "only n=1"),
        ({"echo": True}, "echo", "only false"),
        ({"logprobs": 1}, "logprobs", "not returned"),
        ({"best_of": 3}, "best_of", "only 1"),
        ({"suffix": "end"}, "suffix", "not supported"),
        ({"max_tokens": 5000}, "max_tokens", "4096"),
    ],
)
def test_text_completion_bad_field_is_400_naming_it(client: TestClient, worker: ScriptedWorker, extra, param, says):
    body = {"model": MODEL, "prompt": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as raised:
        oai(client).completions.create(**body)
    error = raised.value.body
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == param and param in error["message"] and says in error["message"]
    assert worker.redis.llen(rq_queue(MODEL)) == 0


@pytest.mark.parametrize("prompt", ["", [""]])
def test_text_completion_empty_prompt_is_400_naming_it(client: TestClient, redis_client: redis.Redis, prompt) -> None:
    """An empty prompt gives the model no token to start from; refused at the edge (it was a 500 device_error)."""
    ScriptedWorker(redis_client, model=MODEL).register()
    reply = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "stream": True})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "prompt" and "empty" in error["message"]
    assert redis_client.llen(rq_queue(MODEL)) == 0


def test_text_completion_accepts_the_neutral_values(client: TestClient, worker: ScriptedWorker) -> None:
    script = worker.in_thread(lambda w: w.serve_one(["ok"]))
    reply = oai(client).completions.create(
        model=MODEL, prompt="hi", n=1, echo=False, best_of=1, suffix="", logprobs=None, presence_penalty=0.5
    )
    script.result()
    assert reply.choices[0].text == "ok"


def test_text_completion_needs_an_api_key(redis_url: str, redis_client: redis.Redis) -> None:
    worker = ScriptedWorker(redis_client, model=MODEL).register()
    with make_client(redis_url, api_keys="key-one") as keyed:
        with pytest.raises(openai.AuthenticationError, match="invalid API key") as raised:
            oai(keyed, api_key="wrong").completions.create(model=MODEL, prompt="hi")
        assert raised.value.body["type"] == "authentication_error"
        assert redis_client.llen(rq_queue(MODEL)) == 0
        script = worker.in_thread(lambda w: w.serve_one(["ok"]))
        reply = oai(keyed, api_key="key-one").completions.create(model=MODEL, prompt="hi")
        script.result()
    assert reply.choices[0].text == "ok"
