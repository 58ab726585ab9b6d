"""Mutated image files through the real decode path: whatever the bytes, the controller answers 200 or a 400/413
with a message, never a 5xx. Bounded (200 examples, derandomized) so that it runs in the normal suite."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from broker.app import create_app
from broker.images import ImageLimits, check_images
from contract.errors import LlavaError
from infra.settings import ControllerSettings


def _encoded(fmt: str, mode: str = "RGB", **params) -> bytes:
    image = Image.new(mode, (24, 16), (200, 30, 30) if mode == "RGB" else 1)
    image.paste((10, 10, 240) if mode == "RGB" else 2, (0, 0, 12, 16))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (24, 16), colour) for colour in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded("JPEG", exif=exif)


SEEDS = [
    _encoded("PNG"),
    _encoded("JPEG"),
    _rotated_jpeg(),
    _encoded("WEBP"),
    _encoded("WEBP", lossless=True),
    _animated_gif(),
    _encoded("BMP"),
    # Formats that are refused, some of whose decoders raised unusual errors once accepted.
    _encoded("TIFF"),
    _encoded("PPM"),
    _encoded("QOI"),
    _encoded("DDS"),
    _encoded("TGA"),
    _encoded("SPIDER", "F"),
    _encoded("BLP", "P"),
]


@st.composite
def mutated_images(draw) -> bytes:
    """A seed image with a few bytes overwritten, maybe truncated, maybe with bytes inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        # Headers hold the interesting fields: bias positions towards the start.
        limit = draw(st.sampled_from([32, 128, len(data)]))
        data[draw(st.integers(0, min(limit, len(data)) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data.insert(draw(st.integers(0, len(data))), draw(st.integers(0, 255)))
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LIMITS = ImageLimits(max_images=8, max_image_bytes=1_000_000, max_image_pixels=1_000_000)


@FUZZ
@given(mutated_images())
def test_decoding_raises_only_400_or_413_naming_the_image(data: bytes) -> None:
    try:
        check_images([("messages[0].content[0]", base64.b64encode(data).decode())], LIMITS)
    except LlavaError as exc:
        assert exc.status_code in (400, 413)
        assert exc.message.startswith("image 1 at messages[0].content[0]")
        assert " at 0x" not in exc.message


@pytest.fixture
def api(redis_client, redis_url: str) -> Iterator[TestClient]:
    app = create_app(ControllerSettings(redis_url=redis_url, max_image_pixels=1_000_000), run_sweeper=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@FUZZ
@given(data=mutated_images())
def test_feedback_with_a_mutated_image_is_never_a_server_error(api: TestClient, data: bytes) -> None:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this?"}]
    reply = api.post(
        "/api/v1/feedback", json={"type": "flag", "model": "m", "messages": [{"role": "user", "content": content}]}
    )
    assert reply.status_code in (200, 400, 413), reply.text
    if reply.status_code != 200:
        assert "image 1 at messages[0].content[0]" in reply.json()["error"]["message"]
