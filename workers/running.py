"""Per-job generation state inside the engine: sampling generator, detokenisation, stop strings, counts."""

from __future__ import annotations

from contract.errors import LlavaError
from contract.messages import FinishReason, Usage
from workers.engine_types import JobUpdate, PreparedJob
from workers.model import LoadedModel
from workers.sampling import make_generator
from workers.text import IncrementalDecoder, StopMatcher


class RunningJob:
    """Per-job generation state: sampling, detokenisation, stop strings and counts."""

    def __init__(self, prepared: PreparedJob, loaded: LoadedModel) -> None:
        params = prepared.job.params
        self.prepared = prepared
        self.job_id = prepared.job_id
        self.params = params
        self.generator = make_generator(params, loaded.device)
        self.decoder = IncrementalDecoder(loaded.tokenizer, prepared.input_ids.tolist())
        self.stop = StopMatcher(params.stop)
        self.eos_ids = loaded.eos_token_ids
        self.completion_tokens = 0
        self._unreported: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.cancelled = False

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prepared.prompt_tokens, completion_tokens=self.completion_tokens)

    def accept(self, token_id: int) -> JobUpdate | None:
        """Take one sampled token; return an update when there is new text or the job finished."""
        self.completion_tokens += 1
        self._unreported.append(token_id)
        if token_id in self.eos_ids:
            return self.finish(FinishReason.eos)
        text, stopped = self.stop.push(self.decoder.push(token_id))
        if stopped:
            self.finish_reason = FinishReason.stop
            return self._update(text, FinishReason.stop)
        if self.completion_tokens >= self.prepared.max_new_tokens:
            return self.finish(FinishReason.length, text)
        return self._update(text, None) if text else None

    def _update(self, text: str, reason: FinishReason | None, error: LlavaError | None = None) -> JobUpdate:
        tokens, self._unreported = self._unreported, []
        return JobUpdate(self.job_id, text, reason, self.usage(), error, tokens)

    def finish(self, reason: FinishReason, text: str = "", error: LlavaError | None = None) -> JobUpdate:
        """The job's last update; flushes held-back text unless it was cancelled or failed."""
        if reason not in (FinishReason.cancelled, FinishReason.error):
            tail, stopped = self.stop.push(self.decoder.flush())
            text += tail if stopped else tail + self.stop.flush()
            if stopped:
                reason = FinishReason.stop
        self.finish_reason = reason
        return self._update(text, reason, error)
