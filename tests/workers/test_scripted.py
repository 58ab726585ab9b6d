"""The scripted engine (a fake for broker load and fault tests, not a model) keeps the Engine interface."""

from __future__ import annotations

import pytest
from PIL import Image

from contract.errors import ContextTooLong, DeviceError, InvalidRequest
from contract.messages import FinishReason, JobMessage, JobText, SamplingParams
from workers.engine import Engine, EngineImage, EngineJob, PreparedJob
from workers.scripted import ScriptedEngine


def _job(job_id: str, prompt: str = "alpha beta gamma", **params) -> EngineJob:
    return EngineJob(job_id=job_id, params=SamplingParams(**params), prompt=prompt)


def _run(engine: ScriptedEngine, *jobs: EngineJob) -> dict[str, tuple[str, FinishReason | None, object]]:
    results = {j.job_id: ["", None, None] for j in jobs}
    for job in jobs:
        engine.add(engine.prepare(job))
    for _ in range(1000):
        if not engine.has_work():
            break
        for update in engine.step():
            results[update.job_id][0] += update.text
            if update.finish_reason is not None:
                results[update.job_id][1] = update.finish_reason
                results[update.job_id][2] = update.error
    return {k: tuple(v) for k, v in results.items()}


def test_reply_cycles_the_prompt_words_and_ends_with_eos():
    engine = ScriptedEngine(reply_tokens=5)
    text, reason, _ = _run(engine, _job("a"))["a"]
    assert text == "alpha beta gamma alpha beta"
    assert reason == FinishReason.eos


def test_max_new_tokens_gives_length_and_the_marker_sets_the_reply_length():
    engine = ScriptedEngine(reply_tokens=50)
    results = _run(engine, _job("a", max_new_tokens=2), _job("b", "x [[tokens=3]]"))
    assert results["a"][:2] == ("alpha beta", FinishReason.length)
    assert results["b"][:2] == ("x x x", FinishReason.eos)


def test_messages_are_read_as_text():
    engine = ScriptedEngine(reply_tokens=2)
    job = EngineJob(
        job_id="a",
        params=SamplingParams(),
        messages=[JobMessage(role="user", content=[JobText(text="one two")])],
    )
    assert _run(engine, job)["a"][0] == "one two"


def test_stop_string_cuts_the_reply_even_across_tokens():
    engine = ScriptedEngine(reply_tokens=20)
    results = _run(engine, _job("a", stop=["gamma"]), _job("b", stop=["ta gam"]))
    assert results["a"][:2] == ("alpha beta ", FinishReason.stop)
    assert results["b"][:2] == ("alpha be", FinishReason.stop)


def test_cancel_ends_the_job_at_the_next_step():
    engine = ScriptedEngine(reply_tokens=100)
    engine.add(engine.prepare(_job("a")))
    engine.step()
    engine.cancel("a")
    updates = engine.step()
    assert [(u.job_id, u.finish_reason) for u in updates] == [("a", FinishReason.cancelled)]
    assert not engine.has_work()
    assert engine.free_slots() == engine.max_batch


def test_capacity_slots_and_token_budget():
    engine = ScriptedEngine(max_batch=2, token_budget=40)
    first = engine.prepare(_job("a", max_new_tokens=10))  # 3 prompt + 10
    assert engine.fits(first)
    engine.add(first)
    assert engine.active_count == 1 and engine.free_slots() == 1
    assert not engine.fits(engine.prepare(_job("b", max_new_tokens=30)))  # 13 + 33 > 40
    second = engine.prepare(_job("c", max_new_tokens=5))
    engine.add(second)
    assert engine.free_slots() == 0
    assert not engine.fits(engine.prepare(_job("d", max_new_tokens=1)))


def test_prepare_errors():
    engine = ScriptedEngine(context_length=8)
    with pytest.raises(InvalidRequest):
        engine.prepare(_job("a", "please [[invalid]]"))
    with pytest.raises(RuntimeError):
        engine.prepare(_job("a", "please [[crash]]"))
    with pytest.raises(ContextTooLong):
        engine.prepare(_job("a", " ".join(["w"] * 9)))
    with pytest.raises(InvalidRequest):
        engine.prepare(EngineJob(job_id="a", params=SamplingParams()))


def test_images_count_as_prompt_tokens():
    engine = ScriptedEngine(image_tokens=10)
    image = EngineImage(digest="d", image=Image.new("RGB", (4, 4)))
    prepared = engine.prepare(EngineJob(job_id="a", params=SamplingParams(), prompt="<image> hi", images=[image]))
    assert prepared.prompt_tokens == 12


def test_device_error_fails_that_job_only():
    engine = ScriptedEngine(reply_tokens=5, error_after_tokens=2)
    results = _run(engine, _job("a", "boom [[device-error]]"), _job("b"))
    text, reason, error = results["a"]
    assert text == "boom boom" and reason == FinishReason.error and isinstance(error, DeviceError)
    assert results["b"][1] == FinishReason.eos
    assert engine.healthy


def test_device_lost_fails_every_job_and_makes_the_engine_unhealthy():
    engine = ScriptedEngine(reply_tokens=50, error_after_tokens=1)
    results = _run(engine, _job("a", "boom [[device-lost]]"), _job("b"))
    assert all(r[1] == FinishReason.error and isinstance(r[2], DeviceError) for r in results.values())
    assert not engine.healthy
    assert not engine.fits(engine.prepare(_job("c")))


def test_the_scripted_engine_implements_the_engine_protocol_with_the_real_prepared_job():
    engine = ScriptedEngine()
    assert isinstance(engine, Engine)
    prepared = engine.prepare(_job("a", "one two three"))
    assert type(prepared) is PreparedJob and prepared.prompt_tokens == 3 and prepared.input_ids is None
