"""The controller's HTTP replies (`/api/v1/...`): what the routes return and what every client reads back.

The stream of `POST /api/v1/generate` is `contract.messages.StreamEvent`; a job's status is
`contract.messages.JobView`; a feedback receipt is `contract.feedback_messages.FeedbackAccepted`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from contract.messages import ImageMode, JobView, WorkerInfo


class ModelInfo(BaseModel):
    """One model of `GET /api/v1/models`: a model served by live workers."""

    name: str
    workers: int = Field(description="live workers serving it")
    queue_depth: int
    max_context: int | None = Field(default=None, description="the smallest context length of its workers")
    image_modes: list[ImageMode] = Field(
        default_factory=lambda: list(ImageMode),
        description="the image pre-processing modes every worker of the model supports (`--image-modes`)",
    )


class ServiceInfo(BaseModel):
    """Body of `GET /api/v1/info`: what the service does with what it is sent, for the page's terms of use."""

    conversation_log: bool = Field(description="every exchange is recorded (`--log-conversations`)")
    log_retention_days: float | None = Field(default=None, description="days a recorded exchange is kept; None: ever")
    log_retention_entries: int | None = Field(default=None, description="the log keeps about this many, the newest")
    feedback_retention_days: float | None = Field(
        default=None, description="days votes and flags (with their conversation) are kept; None: for ever"
    )


class ModelList(BaseModel):
    """Body of `GET /api/v1/models`."""

    models: list[ModelInfo]


class WorkerList(BaseModel):
    """Body of `GET /api/v1/workers`."""

    workers: list[WorkerInfo]


class CancelReply(BaseModel):
    """Body of `POST /api/v1/jobs/{id}/cancel`."""

    job_id: str
    removed_from_queue: bool
    job: JobView


class FieldProblem(BaseModel):
    """One bad field of a 422: its path in the body and what is wrong with it."""

    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="a `contract.errors.ErrorCode` value")
    message: str
    fields: list[FieldProblem] | None = Field(default=None, description="per-field details of a 422")


class ErrorReply(BaseModel):
    """Body of every error answer of the controller's own API: `{"error": {"code", "message"[, "fields"]}}`."""

    error: ErrorDetail
