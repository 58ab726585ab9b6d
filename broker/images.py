"""Decode and check uploaded images before a job is queued, and store each one once, content-addressed.

Limits are checked from the cheapest evidence first: base64 length, decoded bytes, then the format, width, height
and aspect ratio in the image header, and only then are pixels decoded (which also catches truncated files). Only
the formats in `ACCEPTED_FORMATS` are opened; any decoder failure is a 400 naming the image. A photo with an EXIF
orientation is stored upright, so the model sees what the user saw. Everything here is CPU work: the routes call
it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from contract import keys
from contract.errors import ImageInvalid, ImageTooLarge, InvalidRequest

if TYPE_CHECKING:
    from infra.settings import ControllerSettings

# Pillow's own names; any other of its ~40 formats (EPS runs Ghostscript, SPIDER, BLP, DDS...) is refused.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
ACCEPTED_NAMES = "PNG, JPEG, WebP, GIF or BMP"
DEFAULT_MAX_ASPECT_RATIO = 20.0
_ORIENTATION_TAG = 0x0112
_OBJECT_REPR = re.compile(r"<[^<>]* (?:object )?at 0x[0-9a-fA-F]+>")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class ImageLimits:
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    # Longest side over shortest side: a processor that scales the short side to its input size (336 px) would
    # make a 2 x 20,000 px image 336 x 3,360,000 px, so the ratio bounds the size after the model's resize.
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> ImageLimits:
        """The limits of a `ControllerSettings`."""
        return cls(
            max_images=settings.max_images,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_image_aspect_ratio,
        )


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


def decode_base64_image(value: str, where: str, limits: ImageLimits, number: int | None = None) -> bytes:
    """The bytes of a `data:` URL (scheme in any case) or raw base64 string; 400 invalid_image or 413
    image_too_large naming the image."""
    name = image_name(where, number)
    if not isinstance(value, str):
        raise ImageInvalid(f"{name} is not a string")
    payload = value.strip()
    if payload[:5].lower() == "data:":
        match = _DATA_URL.match(payload)
        if match is None:
            raise ImageInvalid(f"{name} is a data: URL that is not base64 (expected data:<mime>;base64,...)")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise ImageInvalid(f"{name} has media type {mime!r}, not image/*")
        payload = payload[match.end() :]
    elif payload[:8].lower().startswith(("http://", "https://")):
        raise ImageInvalid(f"{name} is a URL; send the image bytes as a data: URL or base64 instead")
    raw = _WHITESPACE.sub(b"", payload.encode("ascii", errors="replace"))
    estimated = len(raw) * 3 // 4
    if estimated > limits.max_image_bytes + 3:
        raise ImageTooLarge(f"{name} is about {estimated} bytes, over the limit of {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInvalid(f"{name} is not valid base64 ({exc})") from exc
    if not data:
        raise ImageInvalid(f"{name} is empty")
    if len(data) > limits.max_image_bytes:
        raise ImageTooLarge(f"{name} is {len(data)} bytes, over the limit of {limits.max_image_bytes} bytes")
    return data


def image_name(where: str, number: int | None = None) -> str:
    """How messages name an image: `image 2 at messages[0].content[1]` (its number in the request when known)."""
    return f"image {number} at {where}" if number is not None else f"image at {where}"


def _reason(exc: BaseException) -> str:
    """A decoder error as text for a client: its type when it says nothing, never a Python object repr."""
    text = _OBJECT_REPR.sub("the image", str(exc)).strip()
    return text[:200] if text else type(exc).__name__


def check_image_bytes(data: bytes, where: str, limits: ImageLimits, number: int | None = None) -> CheckedImage:
    """Open the image (accepted formats only), check its size and aspect ratio from the header, then decode every
    pixel; a photo with an EXIF orientation comes back re-encoded upright. Raises only ImageInvalid (400) or
    ImageTooLarge (413), each naming the image."""
    name = image_name(where, number)
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name} is too large: {_reason(exc)} (limit {limits.max_image_pixels} pixels)") from exc
    except UnidentifiedImageError as exc:
        raise ImageInvalid(
            f"{name} cannot be decoded: it is not an image in an accepted format ({ACCEPTED_NAMES})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types for bad headers
        raise ImageInvalid(f"{name} cannot be decoded: {_reason(exc)}") from exc
    with image:
        width, height = image.size
        _check_header(name, width, height, limits)
        fmt = image.format or "unknown"
        try:
            image.load()
            upright = _upright(image)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(
                f"{name} is too large: {_reason(exc)} (limit {limits.max_image_pixels} pixels)"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data fails in many ways
            raise ImageInvalid(f"{name} ({fmt}, {width}x{height}) cannot be decoded: {_reason(exc)}") from exc
    if upright is not None:
        data, width, height = upright
    return CheckedImage(
        where=where,
        data=data,
        digest=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=fmt,
    )


def _check_header(name: str, width: int, height: int, limits: ImageLimits) -> None:
    """Size checks from the header alone, before any pixel is decoded."""
    if width <= 0 or height <= 0:
        raise ImageInvalid(f"{name} has an empty size {width}x{height}")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageInvalid(
            f"{name} is {width}x{height}, an aspect ratio of {ratio:.0f}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1 (max_image_aspect_ratio): scaled for the model it would be far too large"
        )
    if width * height > limits.max_image_pixels:
        raise ImageTooLarge(
            f"{name} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels} pixels"
        )


def _upright(image: Image.Image) -> tuple[bytes, int, int] | None:
    """`(bytes, width, height)` of the image turned as its EXIF orientation says, or None when already upright."""
    if image.getexif().get(_ORIENTATION_TAG, 1) in (None, 1):
        return None
    turned = ImageOps.exif_transpose(image)
    buffer = io.BytesIO()
    if image.format == "JPEG":
        turned.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        turned.save(buffer, format="PNG")
    return buffer.getvalue(), turned.width, turned.height


def check_images(sources: list[tuple[str, str]], limits: ImageLimits) -> list[CheckedImage]:
    """Decode and check `(where, base64 or data: URL)` pairs in order; raises on the first bad one, naming it by
    its number in the request and its position."""
    check_image_count(len(sources), limits)
    return [
        check_image_bytes(decode_base64_image(value, where, limits, number), where, limits, number)
        for number, (where, value) in enumerate(sources, start=1)
    ]


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
