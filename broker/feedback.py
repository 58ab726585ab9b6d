"""Votes and flags: `POST /api/v1/feedback` appends them to the `keys.feedback()` stream; `read_feedback` reads
them back for `llava-serve replay`.

An entry keeps the whole conversation with its images as sha256 digests; each image is stored once under
`keys.image(digest)` and kept as long as the entry, so a flagged conversation stays reproducible from the stream
alone. The stream is capped (`feedback_retention_days`, `feedback_retention_entries`) and its images' TTL matches.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import redis as redis_errors
from fastapi import APIRouter, Request
from redis import Redis

from broker.convlog import KEEP_IMAGES
from broker.images import ImageLimits, check_images
from broker.validation import documented_body
from contract import keys
from contract.errors import ImageInvalid, RedisUnavailable
from contract.feedback_messages import FeedbackAccepted, FeedbackEntry, FeedbackRequest, FeedbackType
from contract.messages import (
    ChatMessage,
    GenerateRequest,
    ImageUrl,
    ImageUrlPart,
    JobImage,
    JobMessage,
    JobText,
    TextPart,
)
from infra.settings import ControllerSettings

ENTRY_FIELD = "entry"

_MIME_BY_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


def build_entry(request: FeedbackRequest, limits: ImageLimits) -> tuple[FeedbackEntry, dict[str, bytes]]:
    """The stream entry for `request`, and the distinct images it references (digest -> bytes), checked with
    the same limits as a generate request."""
    sources = [
        (f"messages[{i}].content[{j}]", part.image_url.url)
        for i, message in enumerate(request.messages)
        if not isinstance(message.content, str)
        for j, part in enumerate(message.content)
        if isinstance(part, ImageUrlPart)
    ]
    checked = iter(check_images(sources, limits))
    images: dict[str, bytes] = {}
    messages: list[JobMessage] = []
    for message in request.messages:
        if isinstance(message.content, str):
            messages.append(JobMessage(role=message.role, content=[JobText(text=message.content)]))
            continue
        parts: list[JobText | JobImage] = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append(JobText(text=part.text))
                continue
            image = next(checked)
            images.setdefault(image.digest, image.data)
            parts.append(JobImage(digest=image.digest))
        messages.append(JobMessage(role=message.role, content=parts))
    entry = FeedbackEntry(
        type=request.type,
        model=request.model,
        reason=request.reason,
        messages=messages,
        images=list(images),
        params=request.params,
        job_ids=request.job_ids,
        conversation_started_at=request.conversation_started_at,
        client_sent_at=request.client_sent_at,
    )
    return entry, images


@dataclass(frozen=True)
class FeedbackRetention:
    """How long the feedback stream keeps entries (age and/or count) and, to match, their images."""

    days: float | None = None
    entries: int | None = None

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> FeedbackRetention:
        return cls(days=settings.feedback_retention_days, entries=settings.feedback_retention_entries)

    @property
    def image_ttl_ms(self) -> int | None:
        return None if self.days is None else int(self.days * 86400 * 1000)


def queue_entry(
    pipe: Any, entry: FeedbackEntry, images: dict[str, bytes], retention: FeedbackRetention | None = None
) -> None:
    """Queue on `pipe` (sync or asyncio) the image writes and the stream append, trimmed to `retention` (exactly:
    each append then evicts about one entry). Images are kept as long as the entry: with a retention in days their
    TTL is raised to it (never lowered: the conversation log may keep them longer), else they are kept for ever."""
    retention = retention or FeedbackRetention()
    ttl_ms = retention.image_ttl_ms
    for digest, data in images.items():
        if ttl_ms is None:
            # SET without EX drops any TTL the generate path gave the same bytes: the entry keeps them.
            pipe.set(keys.image(digest), data)
        else:
            pipe.set(keys.image(digest), data, nx=True, px=ttl_ms)
    if ttl_ms is not None and images:
        pipe.eval(KEEP_IMAGES, len(images), *[keys.image(d) for d in images], ttl_ms)
    minid = None
    if retention.days is not None:
        minid = f"{int((time.time() - retention.days * 86400) * 1000)}-0"
    fields = {ENTRY_FIELD: entry.model_dump_json(exclude={"entry_id"})}
    pipe.xadd(keys.feedback(), fields, minid=minid, approximate=False)
    if retention.entries is not None:
        pipe.xtrim(keys.feedback(), maxlen=retention.entries, approximate=False)


router = APIRouter()


@router.post(
    "/api/v1/feedback",
    response_model=FeedbackAccepted,
    summary="Record a vote or flag on a reply",
    openapi_extra=documented_body(FeedbackRequest),
)
async def post_feedback(request: Request) -> FeedbackAccepted:
    """Append a vote or flag, with its whole conversation and images, to the feedback stream. The body is read
    under `max_body_bytes` like every other endpoint's, and its images are checked in a worker thread."""
    ctx = request.app.state.ctx  # broker.context.ControllerContext
    body = await ctx.bodies.read(request, FeedbackRequest)
    limits = ImageLimits.from_settings(ctx.settings)
    entry, images = await anyio.to_thread.run_sync(build_entry, body, limits)
    retention = FeedbackRetention.from_settings(ctx.settings)
    try:
        async with ctx.redis.pipeline(transaction=True) as pipe:
            queue_entry(pipe, entry, images, retention)
            results = await pipe.execute()
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        raise RedisUnavailable(f"cannot store the feedback: Redis is unavailable ({exc})") from exc
    entry_id = results[-2] if retention.entries is not None else results[-1]  # the XADD's reply
    return FeedbackAccepted(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id), images=list(images)
    )


# ---- Reading back (llava-serve replay) -------------------------------------------------------------------------


def read_feedback(
    redis: Redis,
    *,
    start: str = "-",
    end: str = "+",
    count: int | None = None,
    types: set[FeedbackType] | None = None,
) -> list[FeedbackEntry]:
    """Entries of the feedback stream between stream ids `start` and `end`, oldest first, `entry_id` set."""
    entries = []
    for raw_id, fields in redis.xrange(keys.feedback(), min=start, max=end, count=count):
        raw = fields.get(ENTRY_FIELD.encode()) or fields.get(ENTRY_FIELD)
        if raw is None:
            continue
        entry = FeedbackEntry.model_validate_json(raw)
        if types and entry.type not in types:
            continue
        entry.entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        entries.append(entry)
    return entries


def feedback_images(redis: Redis, entry: FeedbackEntry) -> dict[str, bytes]:
    """The bytes of every image an entry references; ImageInvalid names a digest no longer stored."""
    if not entry.images:
        return {}
    found = redis.mget([keys.image(d) for d in entry.images])
    missing = [d for d, data in zip(entry.images, found, strict=True) if data is None]
    if missing:
        raise ImageInvalid(f"feedback entry {entry.entry_id}: images no longer stored: {', '.join(missing)}")
    return dict(zip(entry.images, found, strict=True))


def _data_url(data: bytes) -> str:
    mime = next((m for magic, m in _MIME_BY_MAGIC if data.startswith(magic)), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def feedback_generate_request(
    redis: Redis, entry: FeedbackEntry, *, include_last_reply: bool = False
) -> GenerateRequest:
    """The `POST /api/v1/generate` body that produced the judged reply (the reply itself dropped unless asked)."""
    images = feedback_images(redis, entry)
    messages = list(entry.messages)
    if not include_last_reply and messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    chat = []
    for message in messages:
        parts: list[TextPart | ImageUrlPart] = [
            TextPart(text=p.text)
            if isinstance(p, JobText)
            else ImageUrlPart(image_url=ImageUrl(url=_data_url(images[p.digest])))
            for p in message.content
        ]
        chat.append(ChatMessage(role=message.role, content=parts))
    return GenerateRequest(model=entry.model, messages=chat, **entry.params.model_dump())
