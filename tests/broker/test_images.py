"""Image decoding and limits, from the cheapest check to the full decode; and content-addressed storage."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from PIL import Image

from broker.images import (
    ImageLimits,
    check_image_bytes,
    check_images,
    decode_base64_image,
    store_images,
)
from contract import keys
from contract.errors import ImageInvalid, ImageTooLarge, InvalidRequest
from infra.redis import async_connect
from tests.broker.scripted_worker import png_header_only

LIMITS = ImageLimits(max_images=2, max_image_bytes=100_000, max_image_pixels=1_000_000)


def png_bytes(size: tuple[int, int] = (16, 8), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_data_url_and_raw_base64_give_the_same_bytes() -> None:
    data = png_bytes()
    b64 = base64.b64encode(data).decode()
    assert decode_base64_image(f"data:image/png;base64,{b64}", "x", LIMITS) == data
    assert decode_base64_image(b64, "x", LIMITS) == data
    assert decode_base64_image(b64[:20] + "\n" + b64[20:], "x", LIMITS) == data


def test_checked_image_has_size_format_and_digest() -> None:
    data = png_bytes((16, 8), "RGBA")
    checked = check_image_bytes(data, "images[0]", LIMITS)
    assert (checked.width, checked.height, checked.format) == (16, 8, "PNG")
    assert checked.digest == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("data:text/plain;base64,aGVsbG8=", "text/plain"),
        ("data:image/png,rawdata", "not base64"),
        ("https://example.org/cat.png", "is a URL"),
        ("!!!!", "base64"),
        ("", "empty"),
    ],
)
def test_undecodable_strings_are_invalid_image(value: str, words: str) -> None:
    with pytest.raises(ImageInvalid, match=words) as info:
        decode_base64_image(value, "messages[2].content[0]", LIMITS)
    assert "messages[2].content[0]" in info.value.message


def test_byte_limit_is_checked_before_decoding_base64() -> None:
    huge = "A" * 1_000_000
    with pytest.raises(ImageTooLarge, match="over the limit of 100000 bytes"):
        decode_base64_image(huge, "images[0]", LIMITS)


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = base64.b64decode(png_header_only(2000, 1000))
    with pytest.raises(ImageTooLarge, match=r"2000x1000 = 2000000 pixels, over the limit of 1000000"):
        check_image_bytes(data, "images[0]", LIMITS)


def test_truncated_and_garbage_bytes_are_invalid() -> None:
    noisy = io.BytesIO()
    Image.effect_noise((32, 32), 40).save(noisy, format="PNG")
    with pytest.raises(ImageInvalid, match="cannot be decoded"):
        check_image_bytes(noisy.getvalue()[:-100], "images[0]", LIMITS)
    with pytest.raises(ImageInvalid, match="not a known image format"):
        check_image_bytes(b"GIF89a-not-really", "images[0]", LIMITS)


def test_count_limit_names_count_and_limit() -> None:
    b64 = base64.b64encode(png_bytes()).decode()
    with pytest.raises(InvalidRequest, match="has 3, the limit is 2"):
        check_images([(f"images[{i}]", b64) for i in range(3)], LIMITS)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_images_are_stored_once_with_a_ttl(redis_url: str, redis_client, anyio_backend) -> None:
    data = png_bytes()
    b64 = base64.b64encode(data).decode()
    checked = check_images([("a", b64), ("b", b64)], LIMITS)
    client = async_connect(redis_url)
    try:
        await store_images(client, checked)
        redis_client.expire(keys.image(checked[0].digest), 10)  # nearly expired: storing again refreshes it
        await store_images(client, checked)
    finally:
        await client.aclose()
    assert redis_client.keys(keys.image("*")) == [keys.image(checked[0].digest).encode()]
    assert redis_client.get(keys.image(checked[0].digest)) == data
    assert redis_client.ttl(keys.image(checked[0].digest)) > 10
