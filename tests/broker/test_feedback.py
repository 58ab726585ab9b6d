"""`POST /api/v1/feedback` and `read_feedback`: votes and flags kept in Redis with everything replay needs."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from broker.app import create_app
from broker.feedback import feedback_generate_request, read_feedback
from contract import keys
from contract.errors import ImageInvalid
from contract.feedback_messages import FeedbackType
from infra.settings import ControllerSettings


def png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def body(kind: str = "flag", images: tuple[bytes, ...] = (), **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    content.append({"type": "text", "text": "what is this?"})
    return {
        "type": kind,
        "model": "m",
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": "a red square"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}}]}
            if images
            else {"role": "user", "content": "and now?"},
            {"role": "assistant", "content": "the same square"},
        ],
        "reason": "wrong colour",
        "params": {"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 64, "seed": 7},
        "job_ids": ["j1", "j2"],
        "conversation_started_at": 1000.0,
        "client_sent_at": 1010.0,
        **extra,
    }


@pytest.fixture
def api(redis_client: redis.Redis, redis_url: str) -> Iterator[TestClient]:
    app = create_app(ControllerSettings(redis_url=redis_url, max_images=3), run_sweeper=False)
    with TestClient(app) as client:
        yield client


def test_a_flag_is_appended_with_its_images_kept(api, redis_client):
    red = png()
    redis_client.set(keys.image(hashlib.sha256(red).hexdigest()), red, ex=60)  # stored by generate
    reply = api.post("/api/v1/feedback", json=body("flag", (red, png((0, 0, 255)))))
    assert reply.status_code == 200, reply.text
    accepted = reply.json()
    (entry,) = read_feedback(redis_client)
    assert entry.entry_id == accepted["entry_id"]
    assert entry.type is FeedbackType.flag and entry.reason == "wrong colour" and entry.model == "m"
    assert entry.job_ids == ["j1", "j2"] and entry.params.seed == 7
    assert entry.conversation_started_at == 1000.0 and entry.client_sent_at == 1010.0 and entry.received_at > 1010
    assert entry.images == accepted["images"] and len(entry.images) == 2  # the repeated image is stored once
    assert [p.type for p in entry.messages[0].content] == ["image", "image", "text"]
    assert entry.messages[2].content[0].digest == entry.images[0]
    for digest in entry.images:  # kept as long as the feedback stream keeps its entries (365 days by default)
        assert redis_client.ttl(keys.image(digest)) > 364 * 86400
    assert redis_client.get(keys.image(entry.images[0])) == red


def test_replay_rebuilds_the_request(api, redis_client):
    red = png()
    api.post("/api/v1/feedback", json=body("downvote", (red,)))
    (entry,) = read_feedback(redis_client)
    request = feedback_generate_request(redis_client, entry)
    assert request.model == "m" and request.seed == 7 and request.temperature == 0.5 and request.max_new_tokens == 64
    assert [m.role for m in request.messages] == ["user", "assistant", "user"]  # the judged reply is left out
    assert request.messages[0].content[0].image_url.url == data_url(red)
    full = feedback_generate_request(redis_client, entry, include_last_reply=True)
    assert full.messages[-1].content[0].text == "the same square"


def test_read_filters_by_type_and_count(api, redis_client):
    for kind in ("upvote", "flag", "downvote", "flag"):
        assert api.post("/api/v1/feedback", json=body(kind)).status_code == 200
    assert [e.type.value for e in read_feedback(redis_client)] == ["upvote", "flag", "downvote", "flag"]
    assert len(read_feedback(redis_client, types={FeedbackType.flag})) == 2
    first, second = read_feedback(redis_client, count=2)
    assert [e.type.value for e in read_feedback(redis_client, start=f"({second.entry_id}")] == ["downvote", "flag"]


def test_a_lost_image_is_reported(api, redis_client):
    api.post("/api/v1/feedback", json=body("flag", (png(),)))
    (entry,) = read_feedback(redis_client)
    redis_client.delete(keys.image(entry.images[0]))
    with pytest.raises(ImageInvalid, match="no longer stored"):
        feedback_generate_request(redis_client, entry)


def test_bad_feedback_is_refused_and_nothing_is_kept(api, redis_client):
    broken = body("flag", (png(),))
    broken["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,bm90IGFuIGltYWdl"
    reply = api.post("/api/v1/feedback", json=broken)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_image"
    reply = api.post("/api/v1/feedback", json=body("like"))
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "invalid_request"
    reply = api.post("/api/v1/feedback", json=body("flag", (png(), png((0, 1, 0)), png((0, 2, 0)), png((0, 3, 0)))))
    assert reply.status_code == 422 and "too many images" in reply.json()["error"]["message"]
    assert redis_client.xlen(keys.feedback()) == 0
    assert not redis_client.keys(keys.image("*"))


def test_the_body_limit_applies_to_feedback(redis_client, redis_url):
    app = create_app(ControllerSettings(redis_url=redis_url, max_body_bytes=4096), run_sweeper=False)
    long = body("flag")
    long["messages"][0]["content"][-1]["text"] = "x" * 10_000
    with TestClient(app) as client:
        reply = client.post("/api/v1/feedback", json=long)
        assert reply.status_code == 413, reply.text
        assert reply.json()["error"]["code"] == "payload_too_large"
        assert "4096 bytes" in reply.json()["error"]["message"]
        assert client.post("/api/v1/feedback", json=body("flag")).status_code == 200
    assert redis_client.xlen(keys.feedback()) == 1


def test_feedback_documents_its_body(api):
    schema = api.get("/openapi.json").json()
    operation = schema["paths"]["/api/v1/feedback"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/FeedbackRequest"
    assert "FeedbackRequest" in schema["components"]["schemas"]


def test_the_stream_keeps_its_retention_and_images_live_as_long(redis_client, redis_url):
    settings = ControllerSettings(redis_url=redis_url, feedback_retention_days=2, feedback_retention_entries=3)
    redis_client.xadd(keys.feedback(), {"entry": "{}"}, id="1000-0")  # older than two days
    kept_by_log = png((0, 9, 0))
    redis_client.set(keys.image(hashlib.sha256(kept_by_log).hexdigest()), kept_by_log, ex=10 * 86400)
    with TestClient(create_app(settings, run_sweeper=False)) as client:
        for kind in ("upvote", "flag", "downvote", "flag"):
            assert client.post("/api/v1/feedback", json=body(kind, (png(), kept_by_log))).status_code == 200
    entries = read_feedback(redis_client)
    assert [e.type.value for e in entries] == ["flag", "downvote", "flag"]
    red, green = entries[0].images
    assert 86400 < redis_client.ttl(keys.image(red)) <= 2 * 86400  # as long as the entry
    assert redis_client.ttl(keys.image(green)) > 9 * 86400  # never shortened


def test_without_a_retention_in_days_images_are_kept_for_ever(redis_client, redis_url):
    settings = ControllerSettings(redis_url=redis_url, feedback_retention_days=None, feedback_retention_entries=None)
    with TestClient(create_app(settings, run_sweeper=False)) as client:
        assert client.post("/api/v1/feedback", json=body("flag", (png(),))).status_code == 200
    (entry,) = read_feedback(redis_client)
    assert redis_client.ttl(keys.image(entry.images[0])) == -1
