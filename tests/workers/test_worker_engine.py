"""The worker loop driving the real batching engine on the tiny random-weight LLaVA (CPU), through cli's loader."""

from __future__ import annotations

from contract.errors import ErrorCode
from contract.messages import DoneEvent, ErrorEvent, SamplingParams, TokenEvent
from infra.settings import WorkerSettings
from tests.workers.faulty_models import ModelRaisingOnMarkedToken
from tests.workers.harness import MODEL, RunningWorker, submit
from workers.cli import build_engine
from workers.engine import EngineJob
from workers.worker import Worker
from workers.worker_lifecycle import EXIT_OK

PROMPTS = ("hello there", "a zebra crossing", "a crossing")


def test_worker_streams_from_the_real_engine(redis_client, tiny_model_path):
    settings = WorkerSettings(model_path=str(tiny_model_path), worker_id="w1", device="cpu", max_batch=2)
    engine, device = build_engine(settings, "transformers")
    worker = Worker(settings, engine, redis_client, model_name=MODEL, device=device)
    with RunningWorker(worker):
        streams = [submit(redis_client, f"j{i}", "hello there", temperature=0, max_new_tokens=6) for i in range(3)]
        finals = [s.read_until_final(timeout=120) for s in streams]
    for events in finals:
        done = events[-1]
        assert isinstance(done, DoneEvent), events
        assert done.usage.completion_tokens <= 6
        assert done.text == "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert finals[0][-1].text == finals[1][-1].text  # greedy: same prompt, same answer


def test_a_model_exception_on_one_job_fails_it_alone_and_the_worker_keeps_serving(redis_client, tiny_model_path):
    settings = WorkerSettings(model_path=str(tiny_model_path), worker_id="w1", device="cpu", max_batch=4)
    engine, device = build_engine(settings, "transformers")
    prepared = {p: engine.prepare(EngineJob(p, SamplingParams(), prompt=p)).input_ids.tolist() for p in PROMPTS}
    marked = min(set(prepared["a zebra crossing"]) - set(prepared["hello there"]) - set(prepared["a crossing"]))
    error = ValueError("Image features and image tokens do not match")
    engine.model = ModelRaisingOnMarkedToken(engine.model, marked, "prefill", error)
    worker = Worker(settings, engine, redis_client, model_name=MODEL, device=device)
    with RunningWorker(worker) as running:
        streams = {p: submit(redis_client, p.replace(" ", "-"), p, temperature=0, max_new_tokens=4) for p in PROMPTS}
        finals = {p: s.read_until_final(timeout=120)[-1] for p, s in streams.items()}
        later = submit(redis_client, "later", "hello there", temperature=0, max_new_tokens=4).read_until_final(120)
        assert running.thread.is_alive() and engine.healthy
    failed = finals["a zebra crossing"]
    assert isinstance(failed, ErrorEvent) and failed.code == ErrorCode.generation_failed
    assert "Image features and image tokens do not match" in failed.message
    assert isinstance(finals["hello there"], DoneEvent) and isinstance(finals["a crossing"], DoneEvent)
    assert isinstance(later[-1], DoneEvent) and later[-1].text == finals["hello there"].text
    assert running.code == EXIT_OK
