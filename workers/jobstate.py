"""What the worker loop keeps per job and per Redis connection: in-flight job state, image loading, back-off."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field

from redis import Redis
from rq.job import JobStatus

from contract import keys
from contract.errors import GenerationFailed, ImageInvalid, LlavaError
from contract.messages import (
    DoneEvent,
    ErrorEvent,
    FinishReason,
    JobOutcome,
    JobRequest,
    Timings,
    Usage,
    error_event,
)

log = logging.getLogger(__name__)


def failure_update(job_id: str, usage: Usage, error: LlavaError):
    """A final engine update failing `job_id` with `error`."""
    from workers.engine_types import JobUpdate

    return JobUpdate(job_id, "", FinishReason.error, usage, error)


def load_images(redis: Redis, digests: list[str]) -> list:
    """The job's images from `keys.image()`, decoded to RGB; ImageInvalid names a missing or broken one."""
    if not digests:
        return []
    from PIL import Image

    from workers.engine_types import EngineImage

    images = []
    for digest, raw in zip(digests, redis.mget([keys.image(d) for d in digests]), strict=True):
        if raw is None:
            raise ImageInvalid(
                f"image {digest} is not in the image store (never uploaded, or expired after "
                f"{keys.IMAGE_TTL_S} s); send the image again"
            )
        try:
            with Image.open(io.BytesIO(raw)) as img:
                images.append(EngineImage(digest=digest, image=img.convert("RGB")))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise ImageInvalid(f"image {digest} could not be decoded: {exc}") from exc
    return images


@dataclass
class ActiveJob:
    """One claimed job as the worker tracks it, from admission to its recorded outcome."""

    request: JobRequest
    text: str = ""  # everything generated so far
    unsent: str = ""  # generated but not yet published (Redis away, or this step's delta)
    seq: int = 0  # token events published
    streaming: bool = False  # a token event reached Redis: the job can no longer be retried
    usage: Usage = field(default_factory=Usage)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: FinishReason | None = None
    error: LlavaError | None = None
    recorded: bool = False  # the outcome is in the job record
    cancel_sent: bool = False

    @classmethod
    def from_request(cls, request: JobRequest) -> ActiveJob:
        return cls(request=request)

    @property
    def job_id(self) -> str:
        return self.request.job_id

    def engine_job(self, images: list):
        from workers.engine_types import EngineJob

        r = self.request
        return EngineJob(job_id=r.job_id, params=r.params, messages=r.messages, prompt=r.prompt, images=images)

    def take(self, update, now: float) -> None:
        """Fold one engine update in."""
        if update.text:
            self.text += update.text
            self.unsent += update.text
            if self.first_token_at is None:
                self.first_token_at = now
        if update.usage is not None:
            self.usage = update.usage
        if update.finish_reason is not None:
            self.end(update.finish_reason, update.error)

    def end(self, reason: FinishReason, error: LlavaError | None = None) -> None:
        if reason == FinishReason.error and error is None:
            error = GenerationFailed("generation failed")
        self.finish_reason = reason
        self.error = error
        self.finished_at = time.time()

    def sent(self) -> None:
        self.seq += 1
        self.unsent = ""
        self.streaming = True

    @property
    def status(self) -> str:
        if self.error is not None:
            return JobStatus.FAILED.value
        if self.finish_reason == FinishReason.cancelled:
            return JobStatus.CANCELED.value
        return JobStatus.FINISHED.value

    def timings(self) -> Timings:
        return Timings(
            enqueued_at=self.request.enqueued_at,
            started_at=self.started_at,
            first_token_at=self.first_token_at,
            finished_at=self.finished_at,
        )

    def final_event(self) -> DoneEvent | ErrorEvent:
        if self.error is not None:
            return error_event(self.job_id, self.error, self.text)
        return DoneEvent(
            job_id=self.job_id,
            finish_reason=self.finish_reason or FinishReason.stop,
            text=self.text,
            usage=self.usage,
            timings=self.timings(),
        )

    def outcome(self) -> JobOutcome:
        return JobOutcome(
            job_id=self.job_id,
            status=self.status,
            finish_reason=FinishReason.error if self.error is not None else self.finish_reason,
            text=self.text,
            usage=self.usage,
            timings=self.timings(),
            error=error_event(self.job_id, self.error, self.text) if self.error is not None else None,
        )


class Backoff:
    """Exponential back-off after Redis errors, logged once per outage."""

    def __init__(self, base_s: float = 0.1, cap_s: float = 2.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.delay_s = 0.0
        self.until = 0.0
        self.down = False
        self.last_failure = time.monotonic()  # until `reachable_for` says more, Redis was reached just now

    def reachable_for_s(self) -> float:
        """Seconds since the last Redis error (or since Redis was first reached)."""
        return time.monotonic() - self.last_failure

    def reachable_for(self, seconds: float) -> None:
        """Redis has answered for `seconds` without this process seeing an error (e.g. its uptime, at start)."""
        if not self.down:
            self.last_failure = min(self.last_failure, time.monotonic() - seconds)

    def ready(self) -> bool:
        return time.monotonic() >= self.until

    def failed(self, what: str, exc: BaseException) -> None:
        if not self.down:
            log.warning("Redis unreachable during %s (%s); backing off and retrying", what, exc)
        self.down = True
        self.last_failure = time.monotonic()
        self.delay_s = min(self.cap_s, max(self.base_s, self.delay_s * 2))
        self.until = time.monotonic() + self.delay_s

    def ok(self) -> None:
        if self.down:
            log.info("Redis reachable again")
        self.down = False
        self.delay_s = 0.0
        self.until = 0.0

    def wait_if_down(self) -> bool:
        """Sleep out the current back-off; True when there was one."""
        remaining = self.until - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
            return True
        return False
