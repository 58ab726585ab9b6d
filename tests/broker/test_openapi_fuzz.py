"""Schemathesis over the controller's OpenAPI spec, in-process on real Redis: no server error, and every answer's
status, content type and body is one the spec documents.

Bounded and repeatable: a fixed number of examples per operation, derandomized, no example database. A scripted
worker serves `tiny-llava` (it answers every job it claims), and about half of the generated bodies are pointed at
that model, so the generate paths stream to the end; other models are unknown (404) and never wait for a worker.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator

import httpx
import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.app import create_app
from tests.broker.scripted_worker import FAST, ScriptedWorker, settings_for

EXAMPLES_PER_OPERATION = 25
SERVED_MODEL = "tiny-llava"

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# The spec as the app serves it at /openapi.json (building it needs no Redis).
schema = schemathesis.openapi.from_dict(create_app(settings_for("redis://unused:1")).openapi())


class ServingWorker:
    """A scripted worker of `tiny-llava` that, in its own thread, answers every job it claims with two tokens.
    Should the script fail, the worker leaves (so requests get `no_worker` at once instead of waiting for it) and
    the failure is raised when the block ends."""

    def __init__(self, client: redis.Redis) -> None:
        self.worker = ScriptedWorker(client, model=SERVED_MODEL).register()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="fuzz-worker", daemon=True)

    def _serve(self) -> None:
        try:
            while not self.stop.is_set():
                self.worker.register()  # its liveness key lasts 60 s and nothing else refreshes it
                try:
                    job = self.worker.claim(timeout=0.2)
                except TimeoutError:
                    continue  # no job this round; look at the stop flag again
                self.worker.start(job)
                self.worker.tokens(job, ["hello", " there"])
                self.worker.finish(job, "hello there")
        except BaseException as exc:  # noqa: BLE001 - raised again by __exit__
            self.error = exc
            self.worker.unregister()

    def __enter__(self) -> ServingWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def fuzz_client(redis_url: str) -> Iterator[TestClient]:
    """One app and one serving worker for every operation (the database emptied once, at the start)."""
    from infra.redis import connect

    redis_client = connect(redis_url)
    redis_client.flushdb()
    app = create_app(settings_for(redis_url, max_queue=4), timings=FAST, run_sweeper=False)
    try:
        with ServingWorker(redis_client), TestClient(app) as client:
            yield client
    finally:
        redis_client.close()


def aim_at_served_model(case: schemathesis.Case) -> None:
    """Point about half of the generated bodies (deterministically: by the parity of the name's length) at the model
    the scripted worker serves, so that generation runs to its end rather than stopping at 404."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) % 2 == 0:
        body["model"] = SERVED_MODEL


def send(client: TestClient, case: schemathesis.Case):
    """Send `case` through the app's own test client (its lifespan holds the Redis clients and the relay)."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    if "data" in kwargs:
        data = kwargs.pop("data")
        if isinstance(data, (bytes, str)):
            kwargs["content"] = data
        else:
            kwargs["data"] = data
    kwargs.pop("verify", None)
    kwargs.pop("allow_redirects", None)
    cookies = kwargs.pop("cookies", None)
    if cookies:
        kwargs.setdefault("headers", {})["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
    return client.request(**kwargs)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_the_spec_tells_the_truth(case: schemathesis.Case, fuzz_client: TestClient) -> None:
    aim_at_served_model(case)
    response = send(fuzz_client, case)
    case.validate_response(response, checks=CHECKS)


def responses_of(path: str, method: str = "post") -> dict:
    return schema.raw_schema["paths"][path][method]["responses"]


def test_generate_routes_document_their_refusals_and_streams() -> None:
    for path in ("/api/v1/generate", "/v1/chat/completions", "/worker_generate_stream"):
        documented = responses_of(path)
        for status in ("401", "404", "413", "429", "503"):
            assert status in documented, f"{path} does not document {status}"
        assert "Retry-After" in documented["429"]["headers"]
    assert "422" in responses_of("/api/v1/generate")
    assert "422" not in responses_of("/v1/chat/completions")  # OpenAI's routes answer a bad body with 400
    assert "text/event-stream" in responses_of("/api/v1/generate")["200"]["content"]
    assert set(responses_of("/v1/chat/completions")["200"]["content"]) == {"application/json", "text/event-stream"}
    llava = responses_of("/worker_generate_stream")
    assert set(llava["200"]["content"]) == {"application/octet-stream"}
    assert set(llava["404"]["content"]) == {"application/octet-stream"}  # LLaVA's error chunk


def test_error_bodies_are_documented_in_the_shape_each_route_answers() -> None:
    def body_ref(responses: dict, status: str) -> str:
        return responses[status]["content"]["application/json"]["schema"]["$ref"]

    assert body_ref(responses_of("/api/v1/jobs/{job_id}", "get"), "404").endswith("/ErrorReply")
    assert body_ref(responses_of("/v1/completions"), "404").endswith("/OpenAIError")
    assert body_ref(responses_of("/api/v1/feedback"), "413").endswith("/ErrorReply")
    assert set(responses_of("/metrics", "get")["200"]["content"]) == {"text/plain"}


def sse_reply(data: str) -> httpx.Response:
    request = httpx.Request("POST", "http://testserver/api/v1/generate")
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=f"event: x\ndata: {data}\n\n".encode(),
        request=request,
    )
    response.read()
    response.elapsed = datetime.timedelta(0)
    return response


def test_the_spec_checks_each_generate_event_against_the_event_models() -> None:
    case = schema["/api/v1/generate"]["POST"].Case(body={"model": "m"}, media_type="application/json")
    case.validate_response(sse_reply('{"type": "queued", "job_id": "a", "position": 0}'), checks=CHECKS)
    with pytest.raises(FailureGroup, match="SSE event payload violates content schema"):
        case.validate_response(sse_reply('{"type": "bogus"}'), checks=CHECKS)


# ---- Server errors the fuzz run found, one test each -----------------------------------------------------------


def test_an_empty_llava_stop_string_is_refused_by_name(client: TestClient, worker: ScriptedWorker) -> None:
    body = {"model": worker.model, "prompt": "USER: hi ASSISTANT:", "stop": ""}
    response = client.post("/worker_generate_stream", json=body)
    assert response.status_code == 422
    assert "stop" in response.content.decode()
