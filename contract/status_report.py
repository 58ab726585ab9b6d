"""What `llava-serve status` shows (its `--json` output) and the controller's `/metrics` gauges read: live workers,
one row per model's queue, and per-model rates over the last minutes. Built from Redis by `broker.status`."""

from __future__ import annotations

from pydantic import BaseModel, Field

from contract.messages import WorkerInfo


class ModelRates(BaseModel):
    """Totals over a window of whole minutes, and the rates they make (`broker.stats.read_rates`)."""

    model: str
    window_s: float
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def requests_per_minute(self) -> float:
        return self.requests * 60.0 / self.window_s if self.window_s else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second over the window."""
        return self.completion_tokens / self.window_s if self.window_s else 0.0


class QueueRow(BaseModel):
    """One model's queue and the live workers serving it."""

    model: str
    depth: int
    oldest_wait_s: float | None = Field(default=None, description="how long the next job to be claimed has waited")
    workers: int = 0
    running: int = 0
    slots: int = 0


class StatusReport(BaseModel):
    """Everything `llava-serve status` shows, at Unix time `at`."""

    at: float
    workers: list[WorkerInfo]
    queues: list[QueueRow]
    rates: dict[str, ModelRates] = Field(default_factory=dict)
    conversation_log_entries: int = Field(default=0, description="entries in the conversation log now")
    refusals: dict[str, int] = Field(
        default_factory=dict, description="requests refused, by code (rate_limited, content_refused, reply_flagged)"
    )
