"""The engine's interface and public data: jobs in, prepared jobs, per-step updates out (re-exported by
`workers.engine`). `Engine` is what the worker drives; the transformers engine (`workers.engine`) and the scripted
engine (`workers.scripted`, a deterministic fake for load and fault tests) both implement it.
No engine imports Redis."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from PIL import Image

from contract.errors import LlavaError
from contract.messages import FinishReason, JobMessage, SamplingParams, Usage

if TYPE_CHECKING:  # torch only for annotations: the scripted engine runs without importing it
    import torch


@dataclass
class EngineImage:
    digest: str  # sha256 of the image bytes
    image: Image.Image  # decoded RGB image


@dataclass
class EngineJob:
    job_id: str
    params: SamplingParams
    messages: list[JobMessage] | None = None  # rendered with the model's chat template
    prompt: str | None = None  # or already templated, one image token per image
    images: list[EngineImage] = field(default_factory=list)


@dataclass
class JobUpdate:
    job_id: str
    text: str  # new text since the previous update for this job
    finish_reason: FinishReason | None  # set on the job's last update
    usage: Usage
    error: LlavaError | None = None  # set when finish_reason is FinishReason.error
    token_ids: list[int] = field(default_factory=list)  # tokens sampled since the previous update


@dataclass
class PreparedJob:
    """A job templated, tokenized and with its images preprocessed (CPU tensors), ready for `add`."""

    job: EngineJob
    prompt_tokens: int
    max_new_tokens: int  # after capping by the context length and the token budget
    input_ids: torch.Tensor | None = None  # [prompt_tokens] long; None from the scripted engine (no tokenizer)
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values (+ image_sizes ...)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def kv_tokens(self) -> int:
        """KV cache slots this job may use at most."""
        return self.prompt_tokens + self.max_new_tokens


@runtime_checkable
class Engine(Protocol):
    """A batching engine as the worker drives it: `prepare` a job, `add` it when it `fits`, then `step` until it
    has no work. One loop calls it, except `prepare`: the worker prepares jobs on other threads while `step` runs, so
    `prepare` must be thread-safe and leave the running batch alone. A job's own fault ends that job with an error
    update; only a device that cannot be used any more turns `healthy` False (the worker then exits)."""

    max_batch: int  # jobs running at once, at most
    healthy: bool

    @property
    def active_count(self) -> int:
        """Jobs admitted and not yet finished."""
        ...

    def free_slots(self) -> int:
        """Jobs that could be admitted now, slot-wise."""
        ...

    def has_work(self) -> bool:
        """True while any admitted job has not returned its final update."""
        ...

    def prepare(self, job: EngineJob) -> PreparedJob:
        """Template, tokenize and preprocess; raises a LlavaError (InvalidRequest, ContextTooLong ...) for a bad job."""
        ...

    def fits(self, prepared: PreparedJob) -> bool:
        """True when a slot is free and the job's tokens fit next to the admitted jobs' within the budget."""
        ...

    def add(self, prepared: PreparedJob) -> None:
        """Admit a prepared job; it starts at the next step."""
        ...

    def cancel(self, job_id: str) -> None:
        """Mark a job cancelled; the next step returns its final update. Unknown ids are ignored."""
        ...

    def step(self) -> list[JobUpdate]:
        """One iteration over every admitted job: new text, and a final update for each job that ended."""
        ...
