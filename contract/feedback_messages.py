"""Wire messages of votes and flags: what the UI posts, and what the feedback stream keeps for `replay`."""

from __future__ import annotations

import time
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from contract.messages import WIRE_VERSION, ChatMessage, JobMessage, SamplingParams

MAX_FEEDBACK_REASON = 2000


class FeedbackType(str, Enum):
    upvote = "upvote"
    downvote = "downvote"
    flag = "flag"


class FeedbackRequest(BaseModel):
    """Body of `POST /api/v1/feedback`: a vote or flag on one reply, with the conversation up to it.

    `messages` is the conversation as it was sent to `POST /api/v1/generate` for that reply, plus the reply being judged
    (so the judged reply is the last message), images as data URLs. `job_ids` lists the job of each assistant message,
    in order (None where a reply has no job).
    """

    model_config = ConfigDict(extra="forbid")
    version: int = WIRE_VERSION
    type: FeedbackType
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    reason: str = Field(default="", max_length=MAX_FEEDBACK_REASON)
    params: SamplingParams = Field(default_factory=SamplingParams)
    job_ids: list[str | None] = Field(default_factory=list)
    conversation_started_at: float | None = Field(default=None, description="client's Unix time of the first turn")
    client_sent_at: float | None = Field(default=None, description="client's Unix time of the vote")


class FeedbackEntry(BaseModel):
    """One vote or flag as the `keys.feedback()` stream keeps it (field `entry`), images as sha256 digests.

    Every digest in `messages` is stored under `keys.image(digest)` without a TTL, so the entry alone reproduces
    the request: `broker.feedback.feedback_generate_request()` rebuilds it.
    """

    version: int = WIRE_VERSION
    entry_id: str | None = Field(default=None, description="the stream id; set when read back, not stored")
    type: FeedbackType
    model: str
    reason: str = ""
    messages: list[JobMessage]
    images: list[str] = Field(default_factory=list, description="distinct image digests, in order of appearance")
    params: SamplingParams = Field(default_factory=SamplingParams)
    job_ids: list[str | None] = Field(default_factory=list)
    received_at: float = Field(default_factory=time.time, description="controller's Unix time")
    conversation_started_at: float | None = None
    client_sent_at: float | None = None


class FeedbackAccepted(BaseModel):
    """Response of `POST /api/v1/feedback`."""

    entry_id: str
    images: list[str] = Field(default_factory=list)
