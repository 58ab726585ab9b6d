"""Every fault stays with the job that caused it: a model, sampling or detokenising exception in one job of a running
batch fails that job alone (generation_failed, saying what happened), the other jobs get exactly the tokens they get
without it, and the engine stays healthy. Faults go in through the real engine code path on the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

from contract.errors import ErrorCode
from contract.messages import FinishReason, JobMessage, JobText, SamplingParams
from tests.workers.faulty_models import (
    ModelOutOfMemoryOnBatches,
    ModelOutOfMemoryOnDecodesOver,
    ModelRaisingOnMarkedToken,
)
from tests.workers.tiny_llava import tiny_loaded
from workers.completion import run_to_completion
from workers.engine import EngineJob, TransformersEngine
from workers.slots import SlotBatch, decode_forward


class BrokenGenerator:
    """Stands in for a job's torch.Generator: sampling with it raises (a TypeError inside torch.multinomial)."""


class DecoderRaising:
    """Stands in for a job's incremental decoder: detokenising its next token raises."""

    def push(self, token_id: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    def flush(self) -> str:
        return ""


def job(job_id: str, text: str, params: SamplingParams | None = None) -> EngineJob:
    params = params or SamplingParams(temperature=0, max_new_tokens=8)
    return EngineJob(job_id, params, messages=[JobMessage(role="user", content=[JobText(text=text)])])


SEEDED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)
OTHERS = [job("a", "hello there"), job("s", "tell me a story", SEEDED), job("b", "what is the weather like")]
MARKED = job("x", "a zebra crossing", SamplingParams(temperature=0.7, max_new_tokens=8, seed=3))


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


@pytest.fixture(scope="module")
def clean(loaded):
    """Token ids of every job, run together without any fault."""
    out = run_to_completion(TransformersEngine(loaded, max_batch=8), [*OTHERS, MARKED])
    assert all(c.finish_reason == FinishReason.length for c in out.values())
    return {job_id: c.token_ids for job_id, c in out.items()}


def assert_contained(engine, out, clean, where: str) -> None:
    failed = out[MARKED.job_id]
    assert failed.finish_reason == FinishReason.error, failed
    assert failed.error.code == ErrorCode.generation_failed and where in failed.error.message, failed.error.message
    for other in OTHERS:
        assert out[other.job_id].finish_reason == FinishReason.length
        assert out[other.job_id].token_ids == clean[other.job_id], other.job_id
    assert engine.healthy
    engine.model = engine.loaded.model
    again = run_to_completion(engine, [*OTHERS, MARKED])
    assert {k: c.token_ids for k, c in again.items()} == clean  # and it keeps serving


def test_a_model_exception_in_one_prefill_fails_that_job_alone(loaded, clean):
    engine = TransformersEngine(loaded, max_batch=8)
    marked = min(
        set(engine.prepare(MARKED).input_ids.tolist())
        - {t for j in OTHERS for t in engine.prepare(j).input_ids.tolist()}
        - set(engine.prepare(job("y", "a crossing")).input_ids.tolist())
    )
    error = ValueError("Image features and image tokens do not match")
    engine.model = ModelRaisingOnMarkedToken(loaded.model, marked, "prefill", error)
    out = run_to_completion(engine, [OTHERS[0], MARKED, *OTHERS[1:]])  # one prefill forward for all four
    assert engine.model.raised == 3  # the batch, then the halves down to the job
    assert_contained(engine, out, clean, "prefill (ValueError: Image features and image tokens do not match)")


@pytest.mark.parametrize("slots", [False, True], ids=["padded-batch", "slot-batch"])
def test_a_model_exception_in_one_row_of_a_decode_step_fails_that_job_alone(loaded, clean, slots):
    fed = {j: set(tokens[:-1]) for j, tokens in clean.items()}  # tokens fed back to a decode step
    others = set().union(*(fed[j.job_id] for j in OTHERS))
    marked = next(t for t in clean[MARKED.job_id][:-1] if t not in others)
    engine = TransformersEngine(loaded, max_batch=8, compile=slots, token_budget=8 * 256)
    if slots:  # the compiled engine's slot batch, stepped without compiling so that the wrapper can raise
        assert isinstance(engine._running, SlotBatch)
        engine._running.step = decode_forward
    engine.model = ModelRaisingOnMarkedToken(loaded.model, marked, "decode", ValueError("shape mismatch in row"))
    out = run_to_completion(engine, [OTHERS[0], MARKED, *OTHERS[1:]])
    assert engine.model.raised == 2  # the batch, then the row alone
    assert out[MARKED.job_id].token_ids == clean[MARKED.job_id][: clean[MARKED.job_id].index(marked) + 1]
    assert_contained(engine, out, clean, "decode step (ValueError: shape mismatch in row)")


def run_with(engine, jobs, fault_after_prefill) -> dict:
    """`jobs` through `engine`; after the step that prefilled them, `fault_after_prefill(row)` on the marked job."""
    for j in jobs:
        engine.add(engine.prepare(j))
    first = engine.step()
    (row,) = [r for r in engine._rows if r.job_id == MARKED.job_id]
    fault_after_prefill(row)
    out = run_to_completion(engine, [])
    for update in first:
        out[update.job_id].token_ids[:0] = update.token_ids
    return out


def test_a_sampling_exception_in_one_job_fails_that_job_alone(loaded, clean):
    engine = TransformersEngine(loaded, max_batch=8)
    out = run_with(engine, [*OTHERS[:2], MARKED, OTHERS[2]], lambda row: setattr(row, "generator", BrokenGenerator()))
    assert out[MARKED.job_id].token_ids == clean[MARKED.job_id][:1]
    assert_contained(engine, out, clean, "sampling (TypeError")


def test_a_detokenising_exception_in_one_job_fails_that_job_alone(loaded, clean):
    engine = TransformersEngine(loaded, max_batch=8)
    out = run_with(engine, [MARKED, *OTHERS], lambda row: setattr(row, "decoder", DecoderRaising()))
    assert_contained(engine, out, clean, "detokenising or stop matching (UnicodeDecodeError")


def test_out_of_memory_in_a_batched_prefill_retries_it_split_before_failing_anyone(loaded, clean):
    engine = TransformersEngine(loaded, max_batch=8)
    engine.model = ModelOutOfMemoryOnBatches(loaded.model)
    out = run_to_completion(engine, [*OTHERS, MARKED])
    assert engine.model.raised == 3  # four rows, then two pairs, then four prefills of one
    assert {k: c.token_ids for k, c in out.items()} == clean
    assert engine.healthy


def engine_for(loaded, slots: bool) -> TransformersEngine:
    engine = TransformersEngine(loaded, max_batch=8, compile=slots, token_budget=8 * 256)
    if slots:  # the compiled engine's slot batch, stepped without compiling so that a wrapper can raise
        assert isinstance(engine._running, SlotBatch)
        engine._running.step = decode_forward
    return engine


@pytest.mark.parametrize("slots", [False, True], ids=["padded-batch", "slot-batch"])
def test_out_of_memory_in_a_decode_step_runs_it_in_parts_before_failing_anyone(loaded, clean, slots):
    engine = engine_for(loaded, slots)
    engine.model = ModelOutOfMemoryOnDecodesOver(loaded.model, rows=1)
    out = run_to_completion(engine, [*OTHERS, MARKED])
    assert engine.model.raised == 7 * 3  # each of the 7 decode steps: four rows, then two pairs
    assert {k: c.token_ids for k, c in out.items()} == clean
    assert all(c.finish_reason == FinishReason.length for c in out.values())
    assert engine.healthy


@pytest.mark.parametrize("slots", [False, True], ids=["padded-batch", "slot-batch"])
def test_a_row_out_of_memory_alone_in_a_decode_step_fails_alone(loaded, clean, slots):
    fed = {j: set(tokens[:-1]) for j, tokens in clean.items()}
    others = set().union(*(fed[j.job_id] for j in OTHERS))
    marked = next(t for t in clean[MARKED.job_id][:-1] if t not in others)
    engine = engine_for(loaded, slots)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    engine.model = ModelRaisingOnMarkedToken(loaded.model, marked, "decode", oom)
    out = run_to_completion(engine, [OTHERS[0], MARKED, *OTHERS[1:]])
    assert engine.model.raised == 3  # four rows, the pair holding it, then the row alone
    failed = out[MARKED.job_id]
    assert failed.token_ids == clean[MARKED.job_id][: clean[MARKED.job_id].index(marked) + 1]
    assert failed.finish_reason == FinishReason.error and failed.error.code == ErrorCode.device_error
    assert "decode step (out of memory)" in failed.error.message, failed.error.message
    for other in OTHERS:
        assert out[other.job_id].token_ids == clean[other.job_id], other.job_id
        assert out[other.job_id].finish_reason == FinishReason.length
    assert engine.healthy
