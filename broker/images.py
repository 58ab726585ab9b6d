"""Decode and check uploaded images before a job is queued, and store each one once, content-addressed.

Limits are checked from the cheapest evidence first: base64 length, decoded bytes, then the width and height in
the image header, and only then are pixels decoded (which also catches truncated files).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from contract import keys
from contract.errors import ImageInvalid, ImageTooLarge, InvalidRequest

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class ImageLimits:
    max_images: int
    max_image_bytes: int
    max_image_pixels: int


@dataclass(frozen=True)
class CheckedImage:
    """An image that decoded fully within the limits; `digest` is the sha256 of its bytes."""

    where: str
    data: bytes
    digest: str
    width: int
    height: int
    format: str


def install_pil_guard(max_image_pixels: int) -> None:
    """Make PIL itself refuse images far over the limit (DecompressionBombError past twice this value)."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    # Between the limit and twice it PIL only warns; `check_image_bytes` refuses those with a clearer message.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_image_count(count: int, limits: ImageLimits) -> None:
    if count > limits.max_images:
        raise InvalidRequest(f"too many images: the request has {count}, the limit is {limits.max_images} (max_images)")


def decode_base64_image(value: str, where: str, limits: ImageLimits) -> bytes:
    """The bytes of a `data:` URL or raw base64 string; 400 invalid_image or 413 image_too_large naming `where`."""
    if not isinstance(value, str):
        raise ImageInvalid(f"image at {where} is not a string")
    payload = value.strip()
    if payload.startswith(("data:", "DATA:")):
        match = _DATA_URL.match(payload)
        if match is None:
            raise ImageInvalid(f"image at {where} is a data: URL that is not base64 (expected data:<mime>;base64,...)")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise ImageInvalid(f"image at {where} has media type {mime!r}, not image/*")
        payload = payload[match.end() :]
    elif payload.startswith(("http://", "https://")):
        raise ImageInvalid(f"image at {where} is a URL; send the image bytes as a data: URL or base64 instead")
    raw = _WHITESPACE.sub(b"", payload.encode("ascii", errors="replace"))
    estimated = len(raw) * 3 // 4
    if estimated > limits.max_image_bytes + 3:
        raise ImageTooLarge(
            f"image at {where} is about {estimated} bytes, over the limit of {limits.max_image_bytes} bytes"
        )
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInvalid(f"image at {where} is not valid base64 ({exc})") from exc
    if not data:
        raise ImageInvalid(f"image at {where} is empty")
    if len(data) > limits.max_image_bytes:
        raise ImageTooLarge(f"image at {where} is {len(data)} bytes, over the limit of {limits.max_image_bytes} bytes")
    return data


def check_image_bytes(data: bytes, where: str, limits: ImageLimits) -> CheckedImage:
    """Open the image, check width x height against the limit from the header, then decode every pixel."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image at {where} is too large: {exc} (limit {limits.max_image_pixels} pixels)") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInvalid(f"image at {where} cannot be decoded: not a known image format ({exc})") from exc
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageInvalid(f"image at {where} has an empty size {width}x{height}")
        if width * height > limits.max_image_pixels:
            raise ImageTooLarge(
                f"image at {where} is {width}x{height} = {width * height} pixels, "
                f"over the limit of {limits.max_image_pixels} pixels"
            )
        fmt = image.format or "unknown"
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(
                f"image at {where} is too large: {exc} (limit {limits.max_image_pixels} pixels)"
            ) from exc
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            raise ImageInvalid(f"image at {where} ({fmt}, {width}x{height}) cannot be decoded: {exc}") from exc
    return CheckedImage(
        where=where,
        data=data,
        digest=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=fmt,
    )


def check_images(sources: list[tuple[str, str]], limits: ImageLimits) -> list[CheckedImage]:
    """Decode and check `(where, base64 or data: URL)` pairs in order; raises on the first bad one."""
    check_image_count(len(sources), limits)
    return [check_image_bytes(decode_base64_image(value, where, limits), where, limits) for where, value in sources]


async def store_images(redis, images: list[CheckedImage]) -> None:
    """Store each distinct image once under `keys.image(digest)`, keeping an existing copy alive at least an hour
    (a copy kept forever by a feedback entry stays without TTL)."""
    unique = {image.digest: image for image in images}
    if not unique:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for digest, image in unique.items():
            pipe.set(keys.image(digest), image.data, nx=True, ex=keys.IMAGE_TTL_S)
            pipe.ttl(keys.image(digest))
        replies = await pipe.execute()
    refresh = [
        digest
        for digest, created, ttl in zip(unique, replies[::2], replies[1::2], strict=True)
        if not created and ttl is not None and 0 <= int(ttl) < keys.IMAGE_TTL_S // 2
    ]
    if refresh:
        async with redis.pipeline(transaction=False) as pipe:
            for digest in refresh:
                pipe.expire(keys.image(digest), keys.IMAGE_TTL_S)
            await pipe.execute()
