"""A scripted engine for load and fault tests of the broker. It is NOT a model and generates nothing real.

`ScriptedEngine` implements the `Engine` protocol of `workers.engine_types` (prepare, fits, add, cancel, step, ...) and
"generates" a deterministic reply: the words of the prompt, cycled, one word per token, at a set pace. Markers in
the prompt text script the faults a broker must survive:

- `[[tokens=N]]`: reply with N tokens (default `reply_tokens`), still capped by `max_new_tokens`.
- `[[invalid]]`: `prepare` raises InvalidRequest; `[[crash]]`: `prepare` raises a plain RuntimeError (a bug).
- `[[device-error]]`: the job fails with DeviceError after `error_after_tokens` tokens; the engine stays healthy.
- `[[device-lost]]`: as above, but every active job fails and `healthy` turns False (an unrecoverable device).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from contract.errors import ContextTooLong, DeviceError, InvalidRequest
from contract.messages import FinishReason, JobText, Usage
from workers.engine_types import EngineJob, JobUpdate, PreparedJob

INVALID_MARKER = "[[invalid]]"
CRASH_MARKER = "[[crash]]"
DEVICE_ERROR_MARKER = "[[device-error]]"
DEVICE_LOST_MARKER = "[[device-lost]]"
_TOKENS_MARKER = re.compile(r"\[\[tokens=(\d+)\]\]")
_ANY_MARKER = re.compile(r"\[\[[^\]]*\]\]")


@dataclass
class _Script:
    """What a job's prompt scripts: the words replied, how many tokens, and the fault to inject."""

    words: list[str]
    reply_tokens: int
    fault: str | None

    @classmethod
    def of(cls, job: EngineJob, default_tokens: int) -> _Script:
        text = job_text(job)
        found = _TOKENS_MARKER.search(text)
        reply = int(found.group(1)) if found else default_tokens
        return cls(
            words=_ANY_MARKER.sub(" ", text).split() or ["ok"],
            reply_tokens=max(reply, 1),
            fault=next((m for m in (DEVICE_LOST_MARKER, DEVICE_ERROR_MARKER) if m in text), None),
        )


@dataclass
class _Row:
    prepared: PreparedJob
    script: _Script
    emitted: str = ""  # text already returned in updates
    held: str = ""  # text held back because it may be the start of a stop string
    tokens: int = 0
    cancelled: bool = False
    stops: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return self.prepared.job_id

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prepared.prompt_tokens, completion_tokens=self.tokens)


def job_text(job: EngineJob) -> str:
    """The plain text of a job's prompt or messages (images left out)."""
    if job.prompt is not None:
        return job.prompt
    parts = [p.text for m in job.messages or [] for p in m.content if isinstance(p, JobText)]
    return " ".join(parts)


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class ScriptedEngine:
    """A scripted engine for load and fault tests of the broker, not a model (see the module docstring)."""

    def __init__(
        self,
        *,
        max_batch: int = 4,
        reply_tokens: int = 16,
        step_delay_s: float = 0.0,
        token_budget: int | None = None,
        context_length: int = 4096,
        image_tokens: int = 16,
        error_after_tokens: int = 2,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.max_batch = max_batch
        self.reply_tokens = reply_tokens
        self.step_delay_s = step_delay_s
        self.context_length = context_length
        self.token_budget = token_budget if token_budget is not None else max_batch * context_length
        self.image_tokens = image_tokens
        self.error_after_tokens = error_after_tokens
        self.healthy = True
        self.steps = 0
        self._rows: list[_Row] = []

    # ---- capacity ---------------------------------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        return len(self._rows)

    def free_slots(self) -> int:
        return max(self.max_batch - self.active_count, 0)

    def has_work(self) -> bool:
        return bool(self._rows)

    def reserved_tokens(self) -> int:
        return sum(r.prepared.kv_tokens for r in self._rows)

    def fits(self, prepared: PreparedJob) -> bool:
        if not self.healthy or self.free_slots() == 0:
            return False
        return self.reserved_tokens() + prepared.kv_tokens <= self.token_budget

    # ---- admission --------------------------------------------------------------------------------------------

    def prepare(self, job: EngineJob) -> PreparedJob:
        if (job.messages is None) == (job.prompt is None):
            raise InvalidRequest("exactly one of messages and prompt must be set")
        text = job_text(job)
        if INVALID_MARKER in text:
            raise InvalidRequest(f"the prompt contains the scripted marker {INVALID_MARKER}")
        if CRASH_MARKER in text:
            raise RuntimeError(f"scripted crash in prepare ({CRASH_MARKER})")
        prompt_tokens = len(text.split()) + self.image_tokens * len(job.images)
        limit = min(self.context_length, self.token_budget)
        if prompt_tokens >= limit:
            raise ContextTooLong(f"prompt is {prompt_tokens} tokens; the scripted context length is {limit}")
        return PreparedJob(
            job=job, prompt_tokens=prompt_tokens, max_new_tokens=min(job.params.max_new_tokens, limit - prompt_tokens)
        )

    def add(self, prepared: PreparedJob) -> None:
        if any(r.job_id == prepared.job_id for r in self._rows):
            raise InvalidRequest(f"job {prepared.job_id} is already running")
        script = _Script.of(prepared.job, self.reply_tokens)
        self._rows.append(_Row(prepared, script, stops=list(prepared.job.params.stop)))

    def cancel(self, job_id: str) -> None:
        for r in self._rows:
            if r.job_id == job_id:
                r.cancelled = True

    # ---- stepping ---------------------------------------------------------------------------------------------

    def step(self) -> list[JobUpdate]:
        """One scripted decode step: one token for every active job (after `step_delay_s` seconds)."""
        if not self._rows:
            return []
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.steps += 1
        updates: list[JobUpdate] = []
        keep: list[_Row] = []
        lost = False
        for row in self._rows:
            if row.cancelled:
                updates.append(JobUpdate(row.job_id, "", FinishReason.cancelled, row.usage()))
                continue
            fault = row.script.fault
            if fault and row.tokens >= self.error_after_tokens:
                lost = lost or fault == DEVICE_LOST_MARKER
                error = DeviceError(f"scripted device error ({fault}) after {row.tokens} tokens")
                updates.append(JobUpdate(row.job_id, "", FinishReason.error, row.usage(), error))
                continue
            update = self._next_token(row)
            updates.append(update)
            if update.finish_reason is None:
                keep.append(row)
        if lost:
            self.healthy = False
            for row in keep:
                error = DeviceError("scripted device lost: the device cannot be used any more")
                updates.append(JobUpdate(row.job_id, "", FinishReason.error, row.usage(), error))
            keep = []
        self._rows = keep
        return [u for u in updates if u.text or u.finish_reason is not None]

    def _next_token(self, row: _Row) -> JobUpdate:
        prepared, script = row.prepared, row.script
        word = script.words[row.tokens % len(script.words)]
        row.tokens += 1
        text = row.held + ("" if row.tokens == 1 else " ") + word
        for stop in row.stops:
            at = (row.emitted + text).find(stop)
            if at >= 0:
                delta = (row.emitted + text)[len(row.emitted) : at]
                row.emitted += delta
                return JobUpdate(row.job_id, delta, FinishReason.stop, row.usage())
        reason = None
        if row.tokens >= prepared.max_new_tokens:
            reason = FinishReason.length
        elif row.tokens >= script.reply_tokens:
            reason = FinishReason.eos
        hold = 0 if reason else min(_held_suffix(row.emitted + text, row.stops), len(text))
        row.held = text[len(text) - hold :] if hold else ""
        delta = text[: len(text) - hold]
        row.emitted += delta
        return JobUpdate(row.job_id, delta, reason, row.usage())
