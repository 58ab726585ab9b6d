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
    with pytest.raises(ImageInvalid, match="not an image in an accepted format"):
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


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_accepted_formats_decode(fmt: str) -> None:
    checked = check_image_bytes(encoded(Image.new("RGB", (16, 8), (200, 10, 10)), fmt), "images[0]", LIMITS)
    assert (checked.width, checked.height, checked.format) == (16, 8, fmt)


def test_an_animated_gif_is_accepted_for_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert check_image_bytes(buffer.getvalue(), "images[0]", LIMITS).format == "GIF"


@pytest.mark.parametrize(
    ("fmt", "mode", "params"),
    [
        ("TIFF", "RGB", {}),
        ("PPM", "RGB", {}),
        ("TGA", "RGB", {}),
        ("ICO", "RGB", {}),
        ("SPIDER", "F", {}),
        ("EPS", "RGB", {}),
        ("QOI", "RGB", {}),
        ("DDS", "RGB", {}),
        ("BLP", "P", {}),
    ],
)
def test_formats_outside_the_allowlist_are_refused_by_name(fmt: str, mode: str, params: dict) -> None:
    data = encoded(Image.new(mode, (16, 8)), fmt, **params)
    with pytest.raises(ImageInvalid, match=r"PNG, JPEG, WebP, GIF or BMP") as info:
        check_images([("images[0]", base64.b64encode(data).decode())], LIMITS)
    assert "image 1 at images[0]" in info.value.message


def test_an_error_names_which_image_of_the_request() -> None:
    good = base64.b64encode(png_bytes()).decode()
    bad = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
    with pytest.raises(ImageInvalid, match=r"image 2 at messages\[1\]\.content\[0\]"):
        check_images([("messages[0].content[0]", good), ("messages[1].content[0]", bad)], LIMITS)


def test_bytes_that_are_no_image_do_not_leak_python_object_reprs() -> None:
    with pytest.raises(ImageInvalid) as info:
        check_images([("images[0]", base64.b64encode(b"plain text, valid base64").decode())], LIMITS)
    assert "BytesIO" not in info.value.message
    assert " at 0x" not in info.value.message
    assert "not an image" in info.value.message


@pytest.mark.parametrize("scheme", ["Data", "DATA", "dAtA"])
def test_the_data_url_scheme_is_case_insensitive(scheme: str) -> None:
    data = png_bytes()
    url = f"{scheme}:image/png;base64,{base64.b64encode(data).decode()}"
    assert decode_base64_image(url, "images[0]", LIMITS) == data


def test_exif_orientation_is_applied_so_the_model_sees_the_photo_upright() -> None:
    # A phone photo stored landscape (16x8) with orientation 6: shown rotated 90 degrees clockwise, 8x16.
    photo = Image.new("RGB", (16, 8), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 8, 8))  # the left half red: after rotating it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    checked = check_image_bytes(encoded(photo, "JPEG", exif=exif, quality=95), "images[0]", LIMITS)
    assert (checked.width, checked.height) == (8, 16)
    with Image.open(io.BytesIO(checked.data)) as stored:
        assert stored.size == (8, 16)
        assert stored.getexif().get(0x0112, 1) == 1
        red, _, blue = stored.convert("RGB").getpixel((4, 2))
        assert red > 200 and blue < 60
    assert checked.digest == hashlib.sha256(checked.data).hexdigest()


@pytest.mark.parametrize(("width", "height"), [(2, 20_000), (20_000, 2), (40_000_000, 1)])
def test_extreme_aspect_ratios_are_refused_from_the_header(width: int, height: int) -> None:
    limits = ImageLimits(max_images=2, max_image_bytes=100_000, max_image_pixels=40_000_000, max_aspect_ratio=20)
    data = base64.b64decode(png_header_only(width, height))
    with pytest.raises(ImageInvalid, match=r"aspect ratio .* over the limit of 20:1 \(max_image_aspect_ratio\)"):
        check_image_bytes(data, "images[0]", limits)


def test_an_aspect_ratio_within_the_limit_is_accepted() -> None:
    limits = ImageLimits(max_images=2, max_image_bytes=100_000, max_image_pixels=1_000_000, max_aspect_ratio=20)
    checked = check_image_bytes(png_bytes((400, 20)), "images[0]", limits)
    assert (checked.width, checked.height) == (400, 20)
