"""The controller refuses prompt text that no serving worker's context could hold (`contract.limits`), with a 413
naming the limit, before anything is stored or queued."""

from __future__ import annotations

from fastapi.testclient import TestClient

from contract.keys import rq_queue
from contract.limits import max_prompt_chars
from tests.broker.scripted_worker import ScriptedWorker, chat_body

CONTEXT = 2048  # what the `worker` fixture registers


def assert_refused_naming_the_limit(response, redis_client) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert f"limit of {max_prompt_chars(CONTEXT)} characters" in error["message"]
    assert f"context of {CONTEXT} tokens" in error["message"]
    assert redis_client.llen(rq_queue("tiny-llava")) == 0


def test_generate_refuses_a_prompt_longer_than_the_context_could_hold(
    client: TestClient, worker: ScriptedWorker, redis_client
) -> None:
    text = "x" * (max_prompt_chars(CONTEXT) + 1)
    response = client.post("/api/v1/generate", json=chat_body(text=text))
    assert_refused_naming_the_limit(response, redis_client)


def test_the_bound_counts_every_message_and_text_part(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    half = "y" * (max_prompt_chars(CONTEXT) // 2 + 1)
    messages = [{"role": "system", "content": half}, {"role": "user", "content": [{"type": "text", "text": half}]}]
    body = {"model": "tiny-llava", "messages": messages}
    response = client.post("/v1/chat/completions", json=body)
    assert_refused_naming_the_limit(response, redis_client)


def test_legacy_routes_refuse_it_too(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    prompt = "z" * (max_prompt_chars(CONTEXT) + 1)
    response = client.post("/v1/completions", json={"model": "tiny-llava", "prompt": prompt})
    assert_refused_naming_the_limit(response, redis_client)


def test_a_prompt_at_the_limit_is_queued(client: TestClient, worker: ScriptedWorker, redis_client) -> None:
    text = "x" * max_prompt_chars(CONTEXT)
    script = worker.in_thread(lambda w: w.serve_one(["ok"]))
    with client.stream("POST", "/api/v1/generate", json=chat_body(text=text)) as response:
        assert response.status_code == 200
        response.read()
    job = script.result()
    assert job.messages is not None and len(job.messages[0].content[0].text) == max_prompt_chars(CONTEXT)


def test_no_bound_while_a_worker_of_unknown_context_serves_the_model(client: TestClient, redis_client) -> None:
    worker = ScriptedWorker(redis_client).register(context_length=None)
    text = "x" * (max_prompt_chars(CONTEXT) + 1)
    script = worker.in_thread(lambda w: w.serve_one(["ok"]))
    with client.stream("POST", "/api/v1/generate", json=chat_body(text=text)) as response:
        assert response.status_code == 200
        response.read()
    script.result()
