"""Every request the controller refuses, with the status, the stable code and a message naming the problem."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from broker.app import create_app
from contract import jobs
from contract.keys import rq_queue
from contract.messages import JobRequest
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, png_b64, png_header_only, settings_for


def make_client(redis_url: str, **overrides) -> TestClient:
    return TestClient(create_app(settings_for(redis_url, **overrides), timings=FAST, run_sweeper=False))


@pytest.fixture
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    ScriptedWorker(redis_client).register()
    with make_client(redis_url) as test_client:
        yield test_client


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    return body["error"]


def test_unknown_model_is_404_listing_served_models(client: TestClient) -> None:
    error = error_of(client.post("/api/v1/generate", json=chat_body(model="llava-13b")), 404)
    assert error["code"] == "model_not_found"
    assert "'llava-13b'" in error["message"] and "'tiny-llava'" in error["message"]


def test_model_with_a_queue_but_no_live_worker_is_503(client: TestClient, redis_client) -> None:
    jobs.enqueue(redis_client, JobRequest(job_id="old", model="gone-model", prompt="x"), max_queue=10, result_ttl=60)
    error = error_of(client.post("/api/v1/generate", json=chat_body(model="gone-model")), 503)
    assert error["code"] == "no_worker"
    assert "'gone-model'" in error["message"]


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/api/v1/generate", content=b'{"model": ', headers={"content-type": "application/json"})
    error = error_of(response, 422)
    assert error["code"] == "invalid_request"
    assert "malformed JSON" in error["message"]


@pytest.mark.parametrize(
    ("params", "field", "limit"),
    [
        ({"temperature": 2.5}, "temperature", "<= 2"),
        ({"temperature": -1}, "temperature", ">= 0"),
        ({"top_p": 0}, "top_p", "> 0"),
        ({"top_p": 1.5}, "top_p", "<= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
        ({"max_new_tokens": 100_000}, "max_new_tokens", "<= 4096"),
        ({"temperature": "hot"}, "temperature", ""),
    ],
)
def test_out_of_range_or_wrong_type_names_the_field(client: TestClient, params, field, limit) -> None:
    error = error_of(client.post("/api/v1/generate", json=chat_body(**params)), 422)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"invalid request: {field}:")
    assert limit in error["message"]
    assert error["fields"][0]["field"] == field


def test_wrong_type_in_a_content_part_names_its_path(client: TestClient) -> None:
    body = chat_body()
    body["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": 7}}
    error = error_of(client.post("/api/v1/generate", json=body), 422)
    assert "messages[0].content[0].image_url.url" in error["message"]


def test_undecodable_image_is_400_naming_its_position(client: TestClient) -> None:
    garbage = base64.b64encode(b"this is not an image at all").decode()
    error = error_of(client.post("/api/v1/generate", json=chat_body(images=[png_b64(), garbage])), 400)
    assert error["code"] == "invalid_image"
    assert "messages[0].content[1]" in error["message"]


def test_bad_base64_is_400(client: TestClient) -> None:
    error = error_of(client.post("/api/v1/generate", json=chat_body(images=["@@not base64@@"])), 400)
    assert error["code"] == "invalid_image" and "base64" in error["message"]


def test_truncated_image_is_400(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    truncated = base64.b64encode(buffer.getvalue()[: len(buffer.getvalue()) // 2]).decode()
    error = error_of(client.post("/api/v1/generate", json=chat_body(images=[truncated])), 400)
    assert error["code"] == "invalid_image"
    assert "messages[0].content[0]" in error["message"] and "64x64" in error["message"]


def test_image_over_the_pixel_limit_is_413_before_decoding(redis_url: str, redis_client) -> None:
    ScriptedWorker(redis_client).register()
    with make_client(redis_url, max_image_pixels=10_000) as client:
        error = error_of(client.post("/api/v1/generate", json=chat_body(images=[png_header_only(200, 100)])), 413)
    assert error["code"] == "image_too_large"
    assert "200x100" in error["message"] and "10000" in error["message"]
    assert "messages[0].content[0]" in error["message"]


def test_decompression_bomb_is_413(client: TestClient) -> None:
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels claimed in a few bytes
    error = error_of(client.post("/api/v1/generate", json=chat_body(images=[bomb])), 413)
    assert error["code"] == "image_too_large"
    assert "messages[0].content[0]" in error["message"]


def test_image_over_the_byte_limit_is_413(redis_url: str, redis_client) -> None:
    ScriptedWorker(redis_client).register()
    with make_client(redis_url, max_image_bytes=100) as client:
        error = error_of(client.post("/api/v1/generate", json=chat_body(images=[png_b64(64, 64)])), 413)
    assert error["code"] == "image_too_large"
    assert "100 bytes" in error["message"]


def test_too_many_images_names_count_and_limit(redis_url: str, redis_client) -> None:
    ScriptedWorker(redis_client).register()
    with make_client(redis_url, max_images=2) as client:
        error = error_of(client.post("/api/v1/generate", json=chat_body(images=[png_b64()] * 3)), 422)
    assert "has 3" in error["message"] and "limit is 2" in error["message"]


def test_body_over_the_limit_is_413_by_content_length(redis_url: str, redis_client) -> None:
    ScriptedWorker(redis_client).register()
    with make_client(redis_url, max_body_bytes=1000) as client:
        error = error_of(client.post("/api/v1/generate", json=chat_body(text="x" * 2000)), 413)
    assert error["code"] == "payload_too_large" and "1000 bytes" in error["message"]


def test_body_over_the_limit_is_413_while_reading(redis_url: str, redis_client) -> None:
    ScriptedWorker(redis_client).register()
    payload = json.dumps(chat_body(text="x" * 2000)).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for i in range(0, len(payload), 256):
            yield payload[i : i + 256]

    with make_client(redis_url, max_body_bytes=1000) as client:
        response = client.post("/api/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert error_of(response, 413)["code"] == "payload_too_large"


def test_full_queue_is_429_with_retry_after(redis_url: str, redis_client) -> None:
    ScriptedWorker(redis_client).register()
    jobs.enqueue(redis_client, JobRequest(job_id="first", model="tiny-llava", prompt="x"), max_queue=10, result_ttl=60)
    with make_client(redis_url, max_queue=1) as client:
        response = client.post("/api/v1/generate", json=chat_body())
    error = error_of(response, 429)
    assert error["code"] == "queue_full" and "limit 1" in error["message"]
    assert int(response.headers["retry-after"]) >= 1


def test_body_that_is_not_an_object_is_422(client: TestClient) -> None:
    error = error_of(client.post("/api/v1/generate", json=[1, 2]), 422)
    assert error["code"] == "invalid_request" and "body" in error["message"]


def test_missing_fields_are_named(client: TestClient) -> None:
    error = error_of(client.post("/api/v1/generate", json={"model": "tiny-llava"}), 422)
    assert "messages: Field required" in error["message"]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def image_part() -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64()}"}}


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ([image_part(), text("<ima"), text("ge> what is this?")], "messages[0].content[1..2]"),
        ([text("a <image> here"), image_part()], "messages[0].content[0]"),
        ("what is <image>?", "messages[0].content"),
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/generate", "/v1/chat/completions"])
def test_text_that_forms_the_image_placeholder_is_refused_naming_it(
    client: TestClient, redis_client: redis.Redis, path: str, content, field: str
) -> None:
    """The template joins adjacent text parts: `<ima` + `ge>` would be an image token without an image (a 500
    generation_failed from the worker); refused before the job is queued."""
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": content}]}
    response = client.post(path, json=body)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and field in error["message"] and "`<image>`" in error["message"]
    assert redis_client.llen(rq_queue("tiny-llava")) == 0


def test_text_parts_apart_from_each_other_are_not_joined(client: TestClient, redis_client: redis.Redis) -> None:
    body = chat_body()
    body["messages"][0]["content"] = [text("<ima"), image_part(), text("ge>")]
    with client.stream("POST", "/api/v1/generate", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["X-Job-Id"]
