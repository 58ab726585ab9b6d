"""Moderation, off by default: user text is checked before its job is enqueued, and a flagged request is refused
with `ContentRefused` (400, code `content_refused`, the message naming the rule or categories). With
`moderate_replies`, `ReplyModeration` also checks each reply as it streams (every `moderation_reply_interval_chars`
characters and at the end): a flagged reply stops its job and ends its stream with `reply_flagged`.

Two implementations: `WordList`, regular expressions from a file (one a line, `#` comments; a plain word is a
regular expression too), matched case-insensitively; and `ModerationApi`, a client of OpenAI's moderation API shape
(`POST <url>` with `{"input": [texts]}`, answered with `{"results": [{"flagged", "categories"}]}`) at any URL. A
moderation service that fails or times out refuses the request (503): a public demo fails closed.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from contract import jobs, keys
from contract.errors import ContentRefused, ModerationUnavailable, ReplyFlagged
from contract.messages import DoneEvent, ErrorEvent, JobRequest, JobText, StreamEvent, TokenEvent, error_event
from infra.settings import ControllerSettings

if TYPE_CHECKING:
    from broker.context import ControllerContext

log = logging.getLogger(__name__)

REFUSED_PREFIX = "the request was refused by moderation"


class Moderator(Protocol):
    async def flagged(self, texts: list[str]) -> str | None:
        """None when every text passes, else what flagged one; ModerationUnavailable when it cannot tell."""

    async def check(self, texts: list[str]) -> None:
        """Return when every text passes; raise ContentRefused naming what flagged one."""


def user_texts(job: JobRequest) -> list[str]:
    """What a user wrote in a job: each user turn's text (the whole prompt for a raw prompt)."""
    if job.prompt is not None:
        return [job.prompt]
    return [
        "".join(part.text for part in message.content if isinstance(part, JobText))
        for message in job.messages or []
        if message.role == "user"
    ]


@dataclass
class WordList:
    patterns: list[re.Pattern[str]]

    @classmethod
    def from_file(cls, path: Path) -> WordList:
        lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
        patterns = [re.compile(line, re.IGNORECASE) for line in lines if line]
        if not patterns:
            raise ValueError(f"moderation word list {path} holds no pattern")
        return cls(patterns)

    async def flagged(self, texts: list[str]) -> str | None:
        for text in texts:
            for pattern in self.patterns:
                if pattern.search(text):
                    return f"its text matches the word list entry `{pattern.pattern}`"
        return None

    async def check(self, texts: list[str]) -> None:
        reason = await self.flagged(texts)
        if reason is not None:
            raise ContentRefused(f"{REFUSED_PREFIX}: {reason}")


@dataclass
class ModerationApi:
    url: str
    api_key: str | None = None
    timeout_s: float = 5.0
    transport: httpx.AsyncBaseTransport | None = None

    async def flagged(self, texts: list[str]) -> str | None:
        texts = [text for text in texts if text]
        if not texts:
            return None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport) as client:
                response = await client.post(self.url, json={"input": texts}, headers=headers)
                response.raise_for_status()
                results = response.json()["results"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ModerationUnavailable(f"the moderation service did not answer ({exc}); retry shortly") from exc
        flagged = sorted(
            {
                name
                for result in results
                if result.get("flagged")
                for name, on in result.get("categories", {}).items()
                if on
            }
        )
        if any(result.get("flagged") for result in results):
            return f"flagged for {', '.join(flagged) or 'unnamed categories'}"
        return None

    async def check(self, texts: list[str]) -> None:
        reason = await self.flagged(texts)
        if reason is not None:
            raise ContentRefused(f"{REFUSED_PREFIX}: {reason}")


def moderators(settings: ControllerSettings) -> list[Moderator]:
    """The moderators `settings` turn on (none by default)."""
    found: list[Moderator] = []
    if settings.moderation_words_file is not None:
        found.append(WordList.from_file(settings.moderation_words_file))
    if settings.moderation_url:
        found.append(ModerationApi(settings.moderation_url, settings.moderation_api_key, settings.moderation_timeout_s))
    return found


def reply_moderators(settings: ControllerSettings) -> list[Moderator]:
    """The moderators that check replies: those of user text, when `moderate_replies` is on; ValueError when it is
    on with no moderator to use."""
    if not settings.moderate_replies:
        return []
    found = moderators(settings)
    if not found:
        raise ValueError("moderate_replies needs a moderator: set moderation_words_file or moderation_url")
    return found


class ReplyModeration:
    """Checks replies as they stream, for every endpoint (`broker.streams.follow_job` passes each job's events
    through `screen`). A flagged reply, or a moderation service that cannot tell, stops the job: the stream ends
    with `reply_flagged` (or `moderation_unavailable`: a public demo fails closed) instead of its next text."""

    def __init__(self, ctx: ControllerContext, checkers: list[Moderator], interval_chars: int) -> None:
        self.ctx = ctx
        self.checkers = checkers
        self.interval_chars = interval_chars

    async def screen(self, events: AsyncIterator[StreamEvent], job_id: str, model: str) -> AsyncIterator[StreamEvent]:
        """`events`, checked each time the reply grew by `interval_chars` characters and once more at its end."""
        text = ""
        checked = 0
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TokenEvent):
                    text += event.text
                    due = len(text) - checked >= self.interval_chars
                elif isinstance(event, DoneEvent):
                    text = event.text or text
                    due = len(text) > checked
                else:
                    due = False
                if due:
                    checked = len(text)
                    refusal = await self.verdict(job_id, text)
                    if refusal is not None:
                        await self.stop(job_id, model, refusal)
                        yield refusal
                        return
                yield event

    async def verdict(self, job_id: str, text: str) -> ErrorEvent | None:
        """None when the reply so far passes every moderator, else the error event that ends its stream."""
        try:
            for checker in self.checkers:
                reason = await checker.flagged([text])
                if reason is not None:
                    return error_event(job_id, ReplyFlagged(f"the reply was stopped by moderation: {reason}"))
        except ModerationUnavailable as exc:
            return error_event(job_id, exc)
        return None

    async def stop(self, job_id: str, model: str, refusal: ErrorEvent) -> None:
        """Cancel the job and count and log the refusal; best effort (the stream ends either way)."""
        log.warning("job %s: reply stopped by moderation: %s", job_id, refusal.message)
        try:
            await self.ctx.run_sync(jobs.request_cancel, self.ctx.redis_sync, job_id, model)
            if refusal.code == ReplyFlagged.code:
                await self.ctx.redis.hincrby(keys.refusals(), refusal.code, 1)
        except Exception as exc:  # noqa: BLE001 - Redis may be down; max_new_tokens bounds the waste
            log.warning("job %s: could not stop the flagged reply's job (%s)", job_id, exc)
