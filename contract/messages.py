"""Every message that crosses Redis or HTTP: pydantic models, written as JSON, never pickled."""

from __future__ import annotations

import time
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from contract.errors import LlavaError, error_from_code

WIRE_VERSION = 1

# Sampling limits: validated at the edge (HTTP) and trusted inside.
MAX_TEMPERATURE = 2.0
# A temperature at or below this decodes greedily, as LLaVA's own worker does (it samples only above 0.001).
GREEDY_TEMPERATURE = 1e-3
MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 8


class FinishReason(str, Enum):
    stop = "stop"  # a stop string matched
    length = "length"  # max_new_tokens (or the context) was reached
    eos = "eos"  # the model emitted an end-of-sequence token
    cancelled = "cancelled"  # the client went away or asked to stop
    error = "error"


class ClaimState(str, Enum):
    """What a worker holds a job as, in `keys.worker_jobs()`; the sweeper decides by it."""

    claimed = "claimed"  # taken off the queue, not yet admitted into the engine
    started = "started"  # admitted, no token published yet
    streaming = "streaming"  # at least one token reached the client


# ---- Requests -------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = "text"
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(description="a data: URL, or raw base64 of the image bytes")


class ImageUrlPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImageUrlPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """An OpenAI-format chat message as clients send it."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(
        default=0.2,
        ge=0.0,
        le=MAX_TEMPERATURE,
        description=f"0 means greedy, and so does any value up to {GREEDY_TEMPERATURE}",
    )
    top_p: float = Field(
        default=0.7,
        gt=0.0,
        le=1.0,
        description="nucleus mass; the most likely token is always kept, so a tiny top_p means greedy",
    )
    max_new_tokens: int = Field(default=512, ge=1, le=MAX_NEW_TOKENS)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class GenerateRequest(SamplingParams):
    """Body of `POST /api/v1/generate`."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)


# What a worker receives. Images travel as sha256 digests of bytes stored once under `keys.image()`.


class JobText(BaseModel):
    type: Literal["text"] = "text"
    text: str


class JobImage(BaseModel):
    type: Literal["image"] = "image"
    digest: str


JobPart = Annotated[JobText | JobImage, Field(discriminator="type")]


class JobMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: list[JobPart]


class JobRequest(BaseModel):
    """One generation job as it sits in a model's rq queue (the job's only kwarg, as JSON).

    Exactly one of `messages` (rendered with the model's chat template) and `prompt` (already templated, with
    one `<image>` per image, as LLaVA clients send it) is set. `images` lists the digests in prompt order.
    """

    version: int = WIRE_VERSION
    job_id: str
    model: str
    messages: list[JobMessage] | None = None
    prompt: str | None = None
    images: list[str] = Field(default_factory=list)
    params: SamplingParams = Field(default_factory=SamplingParams)
    enqueued_at: float = Field(default_factory=time.time)
    controller_id: str | None = Field(
        default=None, description="the controller process streaming the job; its lease (`keys.controller()`) ending "
        "cancels the job. None: no controller follows it (the job runs to its end)",
    )  # fmt: skip


# ---- Stream events (worker -> Redis pub/sub -> controller -> SSE) --------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(BaseModel):
    """Unix times in seconds; None until the moment happened."""

    enqueued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


class QueuedEvent(BaseModel):
    type: Literal["queued"] = "queued"
    job_id: str
    position: int = Field(description="0 = next to be claimed")


class TokenEvent(BaseModel):
    type: Literal["token"] = "token"
    job_id: str
    text: str = Field(description="the new text since the previous token event")
    seq: int = Field(default=0, description="1 for a job's first token event, then 2, 3, ...")


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    job_id: str
    finish_reason: FinishReason
    text: str = Field(default="", description="the whole generated text")
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    job_id: str
    code: str
    message: str
    status_code: int = 500
    text: str = Field(default="", description="what was generated before the error")


def error_event(job_id: str, error: LlavaError, text: str = "") -> ErrorEvent:
    """The wire form of `error` as a job's final stream event, after `text` was generated."""
    return ErrorEvent(job_id=job_id, code=error.code, message=error.message, status_code=error.status_code, text=text)


def error_from_event(event: ErrorEvent) -> LlavaError:
    """The error class an error event names, with its message and status (the reverse of `error_event`)."""
    error = error_from_code(event.code, event.message)
    error.status_code = event.status_code
    return error


# One event of a job's stream: on its chunk channel in Redis, and as one SSE event of `POST /api/v1/generate`
# (the SSE `event:` field repeats `type`).
StreamEvent = QueuedEvent | TokenEvent | DoneEvent | ErrorEvent
STREAM_EVENT: TypeAdapter[StreamEvent] = TypeAdapter(Annotated[StreamEvent, Field(discriminator="type")])


def parse_event(raw: str | bytes) -> StreamEvent:
    """Read one event published on a job's chunk channel."""
    return STREAM_EVENT.validate_json(raw)


# ---- Records ------------------------------------------------------------------------------------------------


class ImageMode(str, Enum):
    """How a client may make a non-square image square before sending it; a worker lists those its model was
    trained with (`--image-modes`), and `GET /api/v1/models` each model's."""

    crop = "crop"  # center-crop to a square
    resize = "resize"  # stretch to a square
    pad = "pad"  # pad to a square with the model's mean colour
    default = "default"  # as uploaded (the model's own processor resizes it)


def parse_image_modes(text: str) -> list[ImageMode]:
    """Comma-separated mode names as modes, in the order given; ValueError naming an unknown one and the choices."""
    modes = []
    for name in (part.strip().lower() for part in text.split(",")):
        if not name:
            continue
        try:
            mode = ImageMode(name)
        except ValueError:
            choices = ", ".join(m.value for m in ImageMode)
            raise ValueError(f"image mode {name!r} is not one of {choices}") from None
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise ValueError(f"no image mode given: name at least one of {', '.join(m.value for m in ImageMode)}")
    return modes


class WorkerInfo(BaseModel):
    """Value of `keys.worker()`."""

    version: int = WIRE_VERSION
    worker_id: str
    models: list[str]
    max_batch: int
    busy_slots: int = 0
    device: str
    host: str
    pid: int
    software_version: str
    started_at: float
    heartbeat_at: float
    context_length: int | None = None
    draining: bool = False
    image_modes: list[ImageMode] | None = Field(default=None, description="None: every mode (an older worker)")


class JobOutcome(BaseModel):
    """The final result of a job, kept in its rq job record (meta `outcome`) for a few minutes."""

    job_id: str
    status: str
    finish_reason: FinishReason | None = None
    text: str = ""
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    error: ErrorEvent | None = None
    worker_id: str | None = None


class JobView(BaseModel):
    """Body of `GET /api/v1/jobs/{id}`."""

    job_id: str
    model: str | None = None
    status: str
    position: int | None = None
    outcome: JobOutcome | None = None
