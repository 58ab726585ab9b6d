"""Moderation, off by default: user text is checked before its job is enqueued, and a flagged request is refused
with `ContentRefused` (400, code `content_refused`, the message naming the rule or categories).

Two implementations: `WordList`, regular expressions from a file (one a line, `#` comments; a plain word is a
regular expression too), matched case-insensitively; and `ModerationApi`, a client of OpenAI's moderation API shape
(`POST <url>` with `{"input": [texts]}`, answered with `{"results": [{"flagged", "categories"}]}`) at any URL. A
moderation service that fails or times out refuses the request (503): a public demo fails closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from contract.errors import ContentRefused, ModerationUnavailable
from contract.messages import JobRequest, JobText
from infra.settings import ControllerSettings


class Moderator(Protocol):
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

    async def check(self, texts: list[str]) -> None:
        for text in texts:
            for pattern in self.patterns:
                if pattern.search(text):
                    raise ContentRefused(
                        f"the request was refused by moderation: its text matches the word list entry "
                        f"`{pattern.pattern}`"
                    )


@dataclass
class ModerationApi:
    url: str
    api_key: str | None = None
    timeout_s: float = 5.0
    transport: httpx.AsyncBaseTransport | None = None

    async def check(self, texts: list[str]) -> None:
        texts = [text for text in texts if text]
        if not texts:
            return
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
            named = ", ".join(flagged) or "unnamed categories"
            raise ContentRefused(f"the request was refused by moderation: flagged for {named}")


def moderators(settings: ControllerSettings) -> list[Moderator]:
    """The moderators `settings` turn on (none by default)."""
    found: list[Moderator] = []
    if settings.moderation_words_file is not None:
        found.append(WordList.from_file(settings.moderation_words_file))
    if settings.moderation_url:
        found.append(ModerationApi(settings.moderation_url, settings.moderation_api_key, settings.moderation_timeout_s))
    return found
