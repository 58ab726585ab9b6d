"""What happens as a job's stream ends: a cancelled or abandoned job's images are released at once, unless a
feedback entry or the conversation log keeps them, or another job uses them. Real Redis, scripted worker."""

from __future__ import annotations

import base64
import hashlib

import redis
from fastapi.testclient import TestClient

from broker.app import create_app
from contract import keys
from tests.broker.scripted_worker import FAST, ScriptedWorker, chat_body, png_b64, read_sse, settings_for
from tests.broker.test_stream_life import wait_for


def digest_of(b64: str) -> str:
    return hashlib.sha256(base64.b64decode(b64)).hexdigest()


def abandon(client: TestClient, worker: ScriptedWorker, image: str) -> str:
    """Stream a request with `image`, let the worker start it, then go away; returns the job id."""
    with client.stream("POST", "/api/v1/generate", json=chat_body(images=[image])) as response:
        events = read_sse(response.iter_lines())
        assert next(events)[0] == "queued"
        job = worker.stream_then_hold(["so"])
        assert next(events)[0] == "token"
    wait_for(lambda: worker.redis.exists(keys.cancel(job.job_id)))
    return job.job_id


def bookkeeping_done(client: redis.Redis) -> None:
    """Wait until every job of the test client has left its fair share, the last step as a stream ends."""
    wait_for(lambda: client.zcard(keys.client_jobs("testclient")) == 0)


def test_an_abandoned_jobs_images_are_released_at_once(
    client: TestClient, worker: ScriptedWorker, redis_client: redis.Redis
) -> None:
    image = png_b64(color=(5, 6, 7))
    abandon(client, worker, image)
    wait_for(lambda: not redis_client.exists(keys.image(digest_of(image))))


def test_a_served_jobs_images_stay_for_the_next_turn(
    client: TestClient, worker: ScriptedWorker, redis_client: redis.Redis
) -> None:
    image = png_b64(color=(5, 6, 8))
    thread = worker.in_thread(lambda w: w.serve_one(["ok"]))
    assert client.post("/v1/chat/completions", json=chat_body(images=[image])).status_code == 200
    thread.result()
    assert 0 < redis_client.ttl(keys.image(digest_of(image))) <= keys.IMAGE_TTL_S


def test_images_kept_by_feedback_or_the_log_are_not_released(
    redis_url: str, worker: ScriptedWorker, redis_client: redis.Redis
) -> None:
    by_feedback, by_log = png_b64(color=(1, 1, 1)), png_b64(color=(2, 2, 2))
    redis_client.set(keys.image(digest_of(by_feedback)), base64.b64decode(by_feedback), ex=365 * 86400)
    with TestClient(create_app(settings_for(redis_url, max_jobs_per_client=5), timings=FAST, run_sweeper=False)) as c:
        abandon(c, worker, by_feedback)
        bookkeeping_done(redis_client)
    logged = settings_for(redis_url, log_conversations=True, max_jobs_per_client=5)
    with TestClient(create_app(logged, timings=FAST, run_sweeper=False)) as c:
        abandon(c, worker, by_log)
        bookkeeping_done(redis_client)
    assert redis_client.ttl(keys.image(digest_of(by_feedback))) > 364 * 86400
    assert redis_client.ttl(keys.image(digest_of(by_log))) > 29 * 86400


def test_an_image_another_job_uses_is_not_released(
    redis_url: str, worker: ScriptedWorker, redis_client: redis.Redis
) -> None:
    image = png_b64(color=(3, 3, 3))
    settings = settings_for(redis_url, max_jobs_per_client=5)
    with (
        TestClient(create_app(settings, timings=FAST, run_sweeper=False)) as client,
        client.stream("POST", "/api/v1/generate", json=chat_body(images=[image])) as waiting,
    ):
        events = read_sse(waiting.iter_lines())  # kept: a dropped reader closes the stream
        assert next(events)[0] == "queued"
        with client.stream("POST", "/api/v1/generate", json=chat_body(images=[image])) as second:
            assert next(read_sse(second.iter_lines()))[0] == "queued"
        # the second request went away while the first, with the same image, still waits
        wait_for(lambda: redis_client.zcard(keys.client_jobs("testclient")) == 1)
        assert redis_client.exists(keys.image(digest_of(image)))
        job = worker.claim()
        worker.start(job)
        worker.finish(job, "ok")
        assert list(events)[-1][0] == "done"
