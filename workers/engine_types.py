"""The engine's public data: jobs in, prepared jobs, per-step updates out (re-exported by `workers.engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    input_ids: torch.Tensor  # [prompt_tokens] long
    image_inputs: dict[str, torch.Tensor]  # pixel_values (+ image_sizes ...), empty without images
    prompt_tokens: int
    max_new_tokens: int  # after capping by the context length and the token budget

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def kv_tokens(self) -> int:
        """KV cache slots this job may use at most."""
        return self.prompt_tokens + self.max_new_tokens
