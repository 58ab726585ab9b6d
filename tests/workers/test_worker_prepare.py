"""Work whose cost the client controls stays off the worker's step loop and is bounded first: a slow preparation
(templating, tokenizing, image preprocessing) holds up no other job, and prompt text longer than any prompt the
context could hold is refused before it is tokenized. Real engine on the tiny model, real Redis."""

from __future__ import annotations

import threading

import pytest

from contract import claims, jobs, keys
from contract.errors import ErrorCode, PayloadTooLarge
from contract.limits import max_prompt_chars
from contract.messages import DoneEvent, ErrorEvent, SamplingParams
from infra.settings import WorkerSettings
from tests.workers.gated_tokenizer import GatedTokenizer
from tests.workers.harness import MODEL, RunningWorker, status, submit, wait_for
from workers.cli import build_engine
from workers.engine import EngineJob
from workers.scripted import ScriptedEngine
from workers.worker import Worker
from workers.worker_lifecycle import EXIT_OK


def gated_worker(redis_client, tiny_model_path, marker: str | None = None) -> tuple[Worker, GatedTokenizer]:
    settings = WorkerSettings(model_path=str(tiny_model_path), worker_id="w1", device="cpu", max_batch=4)
    engine, device = build_engine(settings, "transformers")
    gate = GatedTokenizer(engine.loaded.processor.tokenizer, marker)
    engine.loaded.processor.tokenizer = gate  # the processor tokenizes each job's prompt
    worker = Worker(settings, engine, redis_client, model_name=MODEL, device=device,
                    context_length=engine.context_length)  # fmt: skip
    return worker, gate


def test_other_jobs_get_decode_steps_while_one_job_is_being_prepared(redis_client, tiny_model_path):
    worker, gate = gated_worker(redis_client, tiny_model_path, marker="zebra")
    try:
        with RunningWorker(worker):
            running = submit(redis_client, "running", "hello there", temperature=0, max_new_tokens=24)
            running.wait_tokens(1, timeout=120)
            slow = submit(redis_client, "slow", "a zebra crossing", temperature=0, max_new_tokens=4)
            assert gate.entered.wait(60), "the slow job's tokenization never started"
            later = [submit(redis_client, f"later-{i}", "a crossing", temperature=0, max_new_tokens=4) for i in (1, 2)]
            finals = [s.read_until_final(timeout=60)[-1] for s in (running, *later)]
            # Every other job ran to its end, the ones claimed after the slow one included, while it was held.
            assert not gate.release.is_set()
            assert all(isinstance(f, DoneEvent) for f in finals), finals
            assert sum(f.usage.completion_tokens for f in finals[1:]) >= 2
            gate.release.set()
            slow_final = slow.read_until_final(timeout=60)[-1]
        assert isinstance(slow_final, DoneEvent), slow_final
    finally:
        gate.release.set()


def test_a_prompt_longer_than_the_context_could_hold_is_refused_before_tokenizing(redis_client, tiny_model_path):
    worker, gate = gated_worker(redis_client, tiny_model_path)
    limit = max_prompt_chars(worker.context_length)
    with RunningWorker(worker):
        huge = submit(redis_client, "huge", "word " * (limit // 5 + 1), max_new_tokens=4).read_until_final(60)[-1]
        fine = submit(redis_client, "fine", "hello there", max_new_tokens=2).read_until_final(60)[-1]
    assert isinstance(huge, ErrorEvent) and huge.code == ErrorCode.payload_too_large, huge
    assert f"limit of {limit} characters" in huge.message
    assert isinstance(fine, DoneEvent)
    assert gate.calls == 1  # the fine job's prompt only


def test_the_engine_checks_the_bound_before_tokenizing(redis_client, tiny_model_path):
    worker, gate = gated_worker(redis_client, tiny_model_path)
    engine = worker.engine
    limit = max_prompt_chars(engine.job_limit)
    with pytest.raises(PayloadTooLarge, match=f"limit of {limit} characters"):
        engine.prepare(EngineJob("huge", SamplingParams(), prompt="x" * (limit + 1)))
    assert gate.calls == 0


def test_a_job_still_being_prepared_when_the_worker_stops_goes_back_to_the_queue(redis_client, tiny_model_path):
    worker, gate = gated_worker(redis_client, tiny_model_path, marker="zebra")
    try:
        running = RunningWorker(worker)
        with running:
            submit(redis_client, "slow", "a zebra crossing", subscribe=False, max_new_tokens=4)
            assert gate.entered.wait(60), "the slow job's tokenization never started"
            assert running.stop() == EXIT_OK
        assert jobs.queue_position(redis_client, MODEL, "slow") == 0
        assert status(redis_client, "slow") == "queued"
        assert not redis_client.hexists(keys.worker_jobs("w1"), "slow")
    finally:
        gate.release.set()


def test_when_a_job_does_not_fit_the_jobs_claimed_after_it_go_back_too_in_claim_order(redis_client):
    engine = ScriptedEngine(max_batch=4, token_budget=40)
    engine.add(engine.prepare(EngineJob("big", SamplingParams(max_new_tokens=30), prompt="a big job")))  # 33 of 40
    held = threading.Event()
    prepare = engine.prepare

    def held_prepare(job: EngineJob):  # "b" is still being prepared when the others are ready
        if job.job_id == "b" and not held.wait(30):
            raise AssertionError("never released")
        return prepare(job)

    engine.prepare = held_prepare
    worker = Worker(WorkerSettings(model_path=MODEL, worker_id="w1"), engine, redis_client, model_name=MODEL)
    try:
        for job_id, tokens in (("a", 30), ("b", 1), ("c", 1)):  # "a" does not fit; "c" would
            submit(redis_client, job_id, "x", subscribe=False, max_new_tokens=tokens)
        worker._admit(claims.claim(redis_client, "w1", MODEL, 3))
        wait_for(lambda: all(p.done for p in worker.preparing.in_flight() if p.job_id != "b"), what="a and c ready")
        worker._admit([])
        assert [jobs.queue_position(redis_client, MODEL, j) for j in ("a", "b", "c")] == [0, 1, 2]
        assert not worker.preparing and worker.active == {}
    finally:
        held.set()
        worker.preparing.close()
