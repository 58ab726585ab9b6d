"""Image decoding runs in a worker thread: while one request's images are being checked, the controller's event
loop keeps answering everyone else. The check is held on an event the test sets only after `/healthz` answered, so
a check run on the event loop would never see it set."""

from __future__ import annotations

import threading

import pytest

from broker import images
from contract.errors import ImageInvalid
from tests.broker.scripted_worker import png_b64

MODEL = "tiny-llava"

HOLD_S = 10.0
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(8, 8)}}
MESSAGES = [{"role": "user", "content": [IMAGE_URL, {"type": "text", "text": "what is this?"}]}]
BODIES = {
    "/api/v1/generate": {"model": MODEL, "messages": MESSAGES},
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES},
    "/api/v1/feedback": {"type": "flag", "model": MODEL, "messages": MESSAGES},
}


@pytest.mark.parametrize("path", list(BODIES))
def test_healthz_answers_while_an_image_is_being_checked(client, worker, monkeypatch, path):
    decoding, release = threading.Event(), threading.Event()
    released: list[bool] = []

    def held_check(*args, **kwargs):
        decoding.set()
        released.append(release.wait(HOLD_S))
        raise ImageInvalid("image 1 at messages[0].content[0] held by the test")

    monkeypatch.setattr(images, "check_image_bytes", held_check)
    replies = []
    poster = threading.Thread(target=lambda: replies.append(client.post(path, json=BODIES[path])))
    poster.start()
    try:
        assert decoding.wait(HOLD_S), "the image check never started"
        assert client.get("/healthz").status_code == 200
    finally:
        release.set()
        poster.join(HOLD_S * 2)
    assert released == [True], "/healthz answered only after the image check gave up: it ran on the event loop"
    (reply,) = replies
    assert reply.status_code == 400 and "held by the test" in reply.json()["error"]["message"]
