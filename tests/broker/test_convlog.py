"""The conversation log across two controller replicas: every exchange that ends (done, error, client gone), from
every endpoint, is one record with its conversation, images, parameters, timings and who asked; images are kept as
long as the log; retention trims it. Real Redis, scripted worker."""

from __future__ import annotations

import base64
import hashlib

import redis

from broker.convlog import read_conversations
from broker.limits import key_name
from contract import keys
from contract.messages import FinishReason, JobImage, JobText
from tests.broker.scripted_worker import ScriptedWorker, chat_body, png_b64, read_sse
from tests.broker.test_limits import KEY_A, A, two_controllers
from tests.broker.test_stream_life import wait_for


def test_every_ended_exchange_is_logged_once_from_any_replica_and_endpoint(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    image = png_b64(color=(1, 2, 3))
    digest = hashlib.sha256(base64.b64decode(image)).hexdigest()
    with two_controllers(redis_url, log_conversations=True, log_retention_days=2) as (first, second):
        # done, streamed, with an image, through the controller's own API on the first replica
        thread = worker.in_thread(lambda w: w.serve_one(["a ", "cat"]))
        with first.stream(
            "POST", "/api/v1/generate", json=chat_body(text="what is it?", images=[image], temperature=0.5), headers=A
        ) as response:
            assert [name for name, _ in read_sse(response.iter_lines())][-1] == "done"
        thread.result()
        # an error, not streamed, through OpenAI's API on the second replica
        thread = worker.in_thread(lambda w: w.stream_then_fail(["par"], "generation_failed", "boom"))
        assert second.post("/v1/chat/completions", json=chat_body(text="fail"), headers=A).status_code == 500
        thread.result()
        # a client that goes away after the first tokens, on LLaVA's wire
        body = {"model": "tiny-llava", "prompt": "USER: hi ASSISTANT:", "max_new_tokens": 32}
        with second.stream("POST", "/worker_generate_stream", json=body, headers=A) as response:
            chunks = response.iter_bytes()
            job = worker.stream_then_hold(["hel", "lo"])
            received = b""
            while b"hello" not in received:
                received += next(chunks)
        wait_for(lambda: redis_client.xlen(keys.conversations()) == 3)

    done, failed, gone = read_conversations(redis_client)
    assert (done.endpoint, failed.endpoint, gone.endpoint) == (
        "/api/v1/generate",
        "/v1/chat/completions",
        "/worker_generate_stream",
    )
    assert done.model == "tiny-llava" and done.finish_reason == FinishReason.eos.value
    assert done.reply == "a cat" and done.usage is not None and done.usage.completion_tokens == 5
    assert done.messages is not None and done.messages[0].content == [
        JobImage(digest=digest),
        JobText(text="what is it?"),
    ]
    assert done.images == [digest] and done.params.temperature == 0.5
    assert done.timings.enqueued_at is not None and done.timings.finished_at >= done.timings.enqueued_at
    assert done.api_key_name == key_name(KEY_A) and done.client_address == "testclient"
    assert (failed.finish_reason, failed.error_code, failed.reply) == ("error", "generation_failed", "par")
    assert gone.job_id == job.job_id and gone.finish_reason == "cancelled" and gone.reply == "hello"
    assert gone.prompt == "USER: hi ASSISTANT:" and gone.messages is None
    raw = redis_client.xrange(keys.conversations())
    assert all(KEY_A.encode() not in fields[b"record"] for _, fields in raw)
    # the image is kept as long as the log keeps the record (2 days), not the upload hour
    assert redis_client.ttl(keys.image(digest)) > keys.IMAGE_TTL_S


def test_the_log_keeps_its_retention_and_never_shortens_a_kept_image(
    redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker
) -> None:
    image = png_b64(color=(9, 9, 9))
    digest = hashlib.sha256(base64.b64decode(image)).hexdigest()
    redis_client.set(keys.image(digest), base64.b64decode(image))  # kept without TTL, as feedback keeps one
    redis_client.xadd(keys.conversations(), {"record": "{}"}, id="1000-0")  # older than any retention
    with two_controllers(redis_url, log_conversations=True, log_retention_days=1, log_retention_entries=2) as (
        first,
        second,
    ):
        for controller in (first, second, first):
            thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
            assert controller.post("/v1/chat/completions", json=chat_body(images=[image]), headers=A).status_code == 200
            thread.result()
    records = read_conversations(redis_client)
    assert len(records) == 2 and all(r.record_id != "1000-0" for r in records)
    assert redis_client.ttl(keys.image(digest)) == -1


def test_the_log_is_off_by_default(redis_url: str, redis_client: redis.Redis, worker: ScriptedWorker) -> None:
    with two_controllers(redis_url) as (first, _):
        thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
        assert first.post("/v1/chat/completions", json=chat_body(), headers=A).status_code == 200
        thread.result()
    assert not redis_client.exists(keys.conversations())
