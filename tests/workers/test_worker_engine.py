"""The worker loop driving the real batching engine on the tiny random-weight LLaVA (CPU), through cli's loader."""

from __future__ import annotations

from contract.messages import DoneEvent, TokenEvent
from infra.settings import WorkerSettings
from tests.workers.harness import MODEL, RunningWorker, submit
from workers.cli import build_engine
from workers.worker import Worker


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
