"""Iteration-level batching for image-text-to-text models: jobs join and leave the running batch every step.

The engine knows nothing of Redis: it takes prepared jobs and returns per-step text deltas (see `step`).
`TransformersEngine` implements the `Engine` protocol of `workers.engine_types`. A fault stays with the job that
caused it (`workers.faults`): a failing batched forward is split or retried per row to find that job; a forward
out of memory runs again in smaller parts (`workers.decode_parts` for decode steps), and only a job out of memory
alone, or a CUDA error, fails the jobs of the forward it hit.
"""

from __future__ import annotations

import logging

import torch

from contract.errors import ContextTooLong, InvalidRequest
from contract.limits import check_prompt_chars, job_text_chars
from contract.messages import FinishReason
from workers.batch import PaddedBatch, Prefilled, output_cache, prefill_groups, prefill_inputs
from workers.decode_parts import decode_logits
from workers.engine_types import Engine, EngineImage, EngineJob, JobUpdate, PreparedJob
from workers.faults import (
    device_error,
    is_device_fault,
    is_fatal_device_fault,
    job_error,
    release_cached_memory,
    sample_rows,
)
from workers.kv_budget import compiled_slot_batch, default_token_budget
from workers.model import LoadedModel
from workers.positions import AXES, prompt_positions
from workers.preprocess import (
    ImageCache,
    build_inputs,
    check_prompt,
    render_messages,
    special_token_pattern,
    wire_prompt,
)
from workers.running import RunningJob
from workers.slots import SlotBatch

__all__ = ["Engine", "EngineImage", "EngineJob", "JobUpdate", "PreparedJob", "TransformersEngine"]

log = logging.getLogger(__name__)

# Prompt tokens prefilled in one step by default: several LLaVA-1.5 prompts (40 text + 576 image tokens).
DEFAULT_PREFILL_TOKENS = 4096


class TransformersEngine:
    """The `Engine` of a transformers model: continuous batching over its forward and one left-padded KV cache.
    Not thread-safe."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = 8,
        token_budget: int | None = None,
        image_cache_size: int = 128,
        compile: bool = False,
        compile_backend: str = "inductor",
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, not {prefill_tokens}")
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.max_batch = max_batch
        self.context_length = loaded.context_length
        self.token_budget = token_budget if token_budget is not None else default_token_budget(loaded, max_batch)
        if self.token_budget < 2:
            raise ValueError(f"token_budget must be >= 2, not {self.token_budget}")
        self.images = ImageCache(image_cache_size)
        self._specials = special_token_pattern(loaded.tokenizer)
        # Prompt tokens prefilled per step at most (vLLM's max_num_batched_tokens): bounds how long the running
        # batch waits for new jobs; a longer prompt still goes, alone.
        self.prefill_tokens = prefill_tokens
        self.healthy = True
        self._pending: list[RunningJob] = []
        # compile: one slot per job in a cache allocated once, and a torch.compile'd decode step (CUDA graphs on
        # CUDA) over a few bucketed shapes, so jobs joining and leaving never recompile it.
        if compile and not loaded.family.compiled:
            log.warning(
                "model family %s: the compiled decode step is not exact for it (its attention masks); running eager",
                loaded.family.name,
            )
            compile = False
        self.compiled = compile
        self.position_axes = AXES[loaded.family.positions]
        self._running: PaddedBatch | SlotBatch
        if compile:
            self._running = compiled_slot_batch(
                loaded, max_batch, self.token_budget, compile_backend, self.position_axes
            )
        else:
            self._running = PaddedBatch(self.device, loaded.cache_kwarg, self.position_axes)

    @torch.inference_mode()
    def warmup(self) -> list[tuple[int, int]]:
        """Compiled engines: build the decode step for its bucketed shapes now, before jobs come. The (rows,
        columns) shapes run; none for an eager engine."""
        if not isinstance(self._running, SlotBatch):
            return []
        return self._running.warm_up(self.model)

    # ---- capacity -------------------------------------------------------------------------------------------

    @property
    def _rows(self) -> list[RunningJob]:
        return self._running.rows

    @property
    def job_limit(self) -> int:
        """Tokens (prompt + new) one job may hold: the context length, the budget, or a compiled slot's size."""
        if isinstance(self._running, SlotBatch):
            return self._running.max_columns
        return min(self.context_length, self.token_budget)

    @property
    def active_count(self) -> int:
        return len(self._pending) + len(self._rows)

    def free_slots(self) -> int:
        return max(self.max_batch - self.active_count, 0)

    def has_work(self) -> bool:
        return bool(self._pending or self._rows)

    def reserved_tokens(self) -> int:
        """KV slots promised to admitted jobs (prompt + max_new_tokens each)."""
        return sum(r.prepared.kv_tokens for r in (*self._pending, *self._rows))

    def fits(self, prepared: PreparedJob) -> bool:
        """True when a slot is free and the job's KV cache fits next to the admitted jobs' within the budget."""
        if not self.healthy or self.free_slots() == 0:
            return False
        return self.reserved_tokens() + prepared.kv_tokens <= self.token_budget

    # ---- admission ------------------------------------------------------------------------------------------

    def prepare(self, job: EngineJob) -> PreparedJob:
        """Template the conversation and run the model's own processor once on it with all its images (prompt
        ids and every extra input); raise InvalidRequest, ImageInvalid, ContextTooLong, or PayloadTooLarge for prompt
        text longer than any prompt that fits (checked first, in characters). It touches no engine state but the
        image cache (locked), so the worker runs it on its preparation threads while `step` runs."""
        loaded, images = self.loaded, job.images
        if (job.messages is None) == (job.prompt is None):
            raise InvalidRequest("exactly one of messages and prompt must be set")
        check_prompt_chars(job_text_chars(job.messages, job.prompt), self.job_limit)
        if job.messages is not None:
            prompt = render_messages(
                loaded.processor,
                job.messages,
                loaded.image_token,
                len(images),
                specials=self._specials,
                chat_template=loaded.chat_template,
            )
        else:
            prompt = wire_prompt(str(job.prompt), loaded.family.image_text.format(loaded.image_token))
            check_prompt(prompt, loaded.image_token, len(images))
        built = build_inputs(
            loaded.processor, loaded.family, prompt, [(img.digest, img.image) for img in images], self.images
        )
        ids = built.input_ids
        prompt_tokens = len(ids)
        limit = self.job_limit
        if prompt_tokens >= limit:
            what = "context length" if limit == self.context_length else "KV cache room per job"
            raise ContextTooLong(
                f"prompt is {prompt_tokens} tokens (images included); the model's {what} is {limit}, "
                "which leaves no room for new tokens"
            )
        max_new = min(job.params.max_new_tokens, limit - prompt_tokens)
        return PreparedJob(
            job=job,
            input_ids=ids.to(torch.long),
            image_inputs=built.extras,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new,
        )

    def add(self, prepared: PreparedJob) -> None:
        """Admit a prepared job: it is prefilled at the next step and joins the running batch."""
        if any(r.job_id == prepared.job_id for r in (*self._pending, *self._rows)):
            raise InvalidRequest(f"job {prepared.job_id} is already running")
        self._pending.append(RunningJob(prepared, self.loaded))

    def cancel(self, job_id: str) -> None:
        """Mark a job cancelled; the next step returns its final update. Unknown ids are ignored."""
        for r in (*self._pending, *self._rows):
            if r.job_id == job_id:
                r.cancelled = True

    # ---- stepping -------------------------------------------------------------------------------------------

    def step(self) -> list[JobUpdate]:
        """One iteration: drop cancelled jobs, one decode step for the running batch, prefill new jobs."""
        updates = self._drop_cancelled()
        if self._rows:
            updates += self._decode()
        if self._pending:
            updates += self._prefill_pending()
        return updates

    def _drop_cancelled(self) -> list[JobUpdate]:
        updates = [r.finish(FinishReason.cancelled) for r in self._pending if r.cancelled]
        self._pending = [r for r in self._pending if not r.cancelled]
        rows = self._rows
        if any(r.cancelled for r in rows):
            updates += [r.finish(FinishReason.cancelled) for r in rows if r.cancelled]
            self._running.keep([i for i, r in enumerate(rows) if not r.cancelled])
        return updates

    @torch.inference_mode()
    def _decode(self) -> list[JobUpdate]:
        """One decode step of the running batch. A job whose row makes the forward, sampling or detokenising raise
        fails alone (see `_decode_forward`); a device fault fails the batch."""
        logits, updates = self._decode_forward(list(self._rows))
        rows = list(self._rows)
        ran = [r for r in rows if r.finish_reason is None]  # a row that ran out of memory alone has ended
        if logits is None or not ran:
            self._running.keep([])
            return updates
        try:
            tokens, faults = sample_rows(logits, [r.params for r in ran], [r.generator for r in ran])
        except Exception as exc:  # sample_rows raises device faults only
            self._running.clear()
            return updates + self._fail_device(ran, exc, "sampling")
        sampled = dict(zip(map(id, ran), tokens, strict=True))
        fed = [sampled.get(id(r)) for r in rows]
        fed = [self.loaded.pad_token_id if t is None else t for t in fed]
        self._running.advance(torch.tensor(fed, dtype=torch.long, device=self.device))
        for i, (row, token) in enumerate(zip(ran, tokens, strict=True)):
            if token is None:
                updates.append(row.finish(FinishReason.error, error=job_error(faults[i], "sampling")))
                continue
            update = self._accept(row, token)
            if update is not None:
                updates.append(update)
        self._running.keep([i for i, r in enumerate(rows) if r.finish_reason is None])
        return updates

    def _decode_forward(self, rows: list[RunningJob]) -> tuple[torch.Tensor | None, list[JobUpdate]]:
        """The next-token logits of the batch's rows that ran (None when none is left), and the final updates of
        failed jobs.

        Out of memory runs the step again in parts (`decode_logits`): only a row out of memory alone fails. When the
        forward raises (not a device fault), each row is run alone to find the jobs that make it raise; they fail,
        and the batch without them runs again. Any other device fault fails every row."""
        updates: list[JobUpdate] = []
        try:
            try:
                return self._decode_logits(rows)
            except Exception as exc:
                if is_device_fault(exc):
                    raise
                first = exc
            self._running.rollback()
            culprits: dict[int, BaseException] = {}
            for i in range(len(rows)) if len(rows) > 1 else ():
                fault = self._running.try_row(self.model, i)
                if fault is not None and is_device_fault(fault):
                    raise fault
                if fault is not None:
                    culprits[i] = fault
            if not culprits:  # a single row, or no row fails alone: the step's fault is theirs
                culprits = dict.fromkeys(range(len(rows)), first)
            log.warning("decode step failed on %d of %d job(s): %s", len(culprits), len(rows), first)
            for i, fault in culprits.items():
                updates.append(rows[i].finish(FinishReason.error, error=job_error(fault, "decode step")))
            self._running.keep([i for i in range(len(rows)) if i not in culprits])
            if not self._rows:
                return None, updates
            logits, failed = self._decode_logits(list(self._rows))
            return logits, updates + failed
        except Exception as exc:
            rest = [r for r in self._rows if r.finish_reason is None]
            self._running.clear()
            if is_device_fault(exc):
                return None, updates + self._fail_device(rest, exc, "decode step")
            error = job_error(exc, "decode step")
            return None, updates + [r.finish(FinishReason.error, error=error) for r in rest]

    def _decode_logits(self, rows: list[RunningJob]) -> tuple[torch.Tensor | None, list[JobUpdate]]:
        logits, out_of_memory = decode_logits(self._running, self.model, self.device)
        failed = [u for i, exc in out_of_memory.items() for u in self._fail_device([rows[i]], exc, "decode step")]
        return logits, failed

    def _accept(self, row: RunningJob, token: int) -> JobUpdate | None:
        """`row.accept(token)`; a job whose detokenising or stop matching raises fails alone."""
        try:
            return row.accept(token)
        except Exception as exc:
            log.warning("job %s failed while detokenising: %s", row.job_id, exc)
            return row.finish(FinishReason.error, error=job_error(exc, "detokenising or stop matching"))

    def _take_prefill_work(self) -> list[RunningJob]:
        """Pending jobs, in order, whose prompts fit this step's prefill token budget (at least one)."""
        taken, tokens = [], 0
        for row in self._pending:
            if taken and tokens + row.prepared.prompt_tokens > self.prefill_tokens:
                break
            taken.append(row)
            tokens += row.prepared.prompt_tokens
        self._pending = self._pending[len(taken) :]
        return taken

    @torch.inference_mode()
    def _prefill_pending(self) -> list[JobUpdate]:
        """Prefill this step's share of the pending jobs, one forward per group of same-shaped images."""
        updates: list[JobUpdate] = []
        parts: list[Prefilled] = []
        for group in prefill_groups(self._take_prefill_work()):
            done, failed = self._prefill_contained(group)
            updates += failed
            for part, faults in done:
                for i, (row, token) in enumerate(zip(part.rows, part.first_tokens, strict=True)):
                    if i in faults:
                        updates.append(row.finish(FinishReason.error, error=job_error(faults[i], "sampling")))
                        continue
                    update = self._accept(row, token)
                    if update is not None:
                        updates.append(update)
                part.keep = [i for i, r in enumerate(part.rows) if r.finish_reason is None]
                if part.keep:
                    parts.append(part)
        if parts:
            joining = [p.rows[i] for p in parts for i in p.keep]
            try:
                self._running.join(parts)
            except Exception as exc:
                if is_device_fault(exc):
                    failed = [*self._rows, *(r for r in joining if r not in self._rows)]
                    self._running.clear()
                    updates += self._fail_device(failed, exc, "batch merge")
                else:
                    error = job_error(exc, "joining the batch")
                    updates += [r.finish(FinishReason.error, error=error) for r in joining if r not in self._rows]
        return updates

    def _prefill_contained(
        self, rows: list[RunningJob]
    ) -> tuple[list[tuple[Prefilled, dict[int, BaseException]]], list[JobUpdate]]:
        """Prefill `rows` in one forward; when it raises, in halves (bisecting down to the job that raises, or,
        out of memory, to forwards small enough), so a fault fails only the jobs that cause it. The prefilled
        parts with their sampling faults, and the final updates of the failed jobs."""
        try:
            return [self._prefill_group(rows)], []
        except Exception as exc:
            if len(rows) > 1 and not is_fatal_device_fault(exc):
                half = len(rows) // 2
                first, first_failed = self._prefill_contained(rows[:half])
                second, second_failed = self._prefill_contained(rows[half:])
                return first + second, first_failed + second_failed
            if is_device_fault(exc):
                return [], self._fail_device(rows, exc, "prefill")
            log.warning("prefill of job %s failed: %s", rows[0].job_id, exc)
            return [], [rows[0].finish(FinishReason.error, error=job_error(exc, "prefill"))]

    def _prefill_group(self, rows: list[RunningJob]) -> tuple[Prefilled, dict[int, BaseException]]:
        """One forward over the left-padded prompts of `rows` (images included): their cache and first tokens, and
        the rows whose sampling raised (their first token is a pad)."""
        from transformers import DynamicCache

        prepared = [r.prepared for r in rows]
        family = self.loaded.family
        inputs = prefill_inputs(prepared, self.loaded.pad_token_id, self.device, self.loaded.dtype, family.per_token)
        inputs["position_ids"], deltas = prompt_positions(self.model, family.positions, inputs)
        inputs[self.loaded.cache_kwarg] = DynamicCache()
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        tokens, faults = sample_rows(out.logits[:, -1, :], [r.params for r in rows], [r.generator for r in rows])
        first = [self.loaded.pad_token_id if t is None else t for t in tokens]
        part = Prefilled(output_cache(out), inputs["attention_mask"], first, rows, keep=[], rope_deltas=deltas)
        return part, faults

    def _fail_device(self, rows: list[RunningJob], exc: BaseException, where: str) -> list[JobUpdate]:
        """Fail `rows` with DeviceError, free their memory and decide whether the engine can go on."""
        if is_fatal_device_fault(exc):
            self.healthy = False
        error = device_error(exc, where)
        log.error("%s; failing %d job(s)", error.message, len(rows))
        release_cached_memory(self.device)
        return [r.finish(FinishReason.error, error=error) for r in rows]
