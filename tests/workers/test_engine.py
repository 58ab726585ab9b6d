import subprocess
import sys

import pytest
import torch
from PIL import Image

from contract.errors import ContextTooLong, DeviceError, ImageInvalid, InvalidRequest
from contract.messages import FinishReason, JobImage, JobMessage, JobText, SamplingParams
from tests.workers.tiny_llava import tiny_loaded
from workers.completion import run_to_completion
from workers.engine import Engine, EngineImage, EngineJob, TransformersEngine

RED = EngineImage("sha-red", Image.new("RGB", (60, 40), (200, 10, 10)))
BLUE = EngineImage("sha-blue", Image.new("RGB", (30, 70), (10, 10, 200)))


def greedy(max_new_tokens=16, **kw):
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, **kw)


def chat_job(job_id, text, images=(), params=None):
    parts = [JobImage(digest=i.digest) for i in images] + [JobText(text=text)]
    return EngineJob(job_id, params or greedy(), messages=[JobMessage(role="user", content=parts)], images=list(images))


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


def reference_tokens(loaded, engine, job):
    """HF generate, batch 1: the tokens a job must get inside any batch."""
    prepared = engine.prepare(job)
    per_token = loaded.family.per_token
    extras = {k: v[None] if k in per_token else v for k, v in prepared.image_inputs.items()}
    inputs = {"input_ids": prepared.input_ids[None], **extras}
    out = loaded.model.generate(
        **inputs,
        max_new_tokens=prepared.max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=loaded.pad_token_id,
    )
    return out[0, prepared.prompt_tokens :].tolist()


def test_greedy_batch_matches_alone_and_generate(loaded):
    jobs = [
        chat_job("a", "hello"),
        chat_job("b", "what is in this long picture of a cat and a dog on a mat", [RED]),
        chat_job("c", "x", [RED, BLUE]),
        chat_job("d", "Café 🙂 naïve"),
        chat_job("e", "describe", [BLUE], greedy(max_new_tokens=5)),
    ]
    batched = run_to_completion(TransformersEngine(loaded, max_batch=8), jobs)
    engine = TransformersEngine(loaded, max_batch=1)
    for job in jobs:
        alone = run_to_completion(engine, [job])[job.job_id]
        together = batched[job.job_id]
        assert together.token_ids == alone.token_ids == reference_tokens(loaded, engine, job), job.job_id
        assert together.text == alone.text
        assert together.finish_reason == FinishReason.length
        assert together.usage.completion_tokens == job.params.max_new_tokens


def test_jobs_join_mid_batch_and_leave_early(loaded):
    engine = TransformersEngine(loaded, max_batch=4)
    first = chat_job("first", "a long prompt that has quite a few words in it", [RED], greedy(24))
    short = chat_job("short", "hi", params=greedy(3))
    late = chat_job("late", "late arrival", [BLUE], greedy(10))
    tokens = {"first": [], "short": [], "late": []}
    engine.add(engine.prepare(first))
    engine.add(engine.prepare(short))
    for step in range(40):
        if step == 5:
            engine.add(engine.prepare(late))
        for update in engine.step():
            tokens[update.job_id] += update.token_ids
        if not engine.has_work():
            break
    assert not engine.has_work() and engine.active_count == 0
    alone = TransformersEngine(loaded, max_batch=1)
    for job in (first, short, late):
        assert tokens[job.job_id] == run_to_completion(alone, [job])[job.job_id].token_ids


def test_prompt_path_equals_messages_path(loaded):
    engine = TransformersEngine(loaded)
    by_messages = chat_job("m", "What is this?", [RED])
    by_prompt = EngineJob("p", greedy(), prompt="<s>USER: <image>\nWhat is this? ASSISTANT:", images=[RED])
    a, b = engine.prepare(by_messages), engine.prepare(by_prompt)
    assert torch.equal(a.input_ids, b.input_ids)
    reference = loaded.processor(text=by_prompt.prompt, images=[RED.image], return_tensors="pt")
    assert torch.equal(a.input_ids, reference["input_ids"][0])
    assert torch.equal(a.image_inputs["pixel_values"], reference["pixel_values"])
    assert a.prompt_tokens == b.prompt_tokens == len(a.input_ids)
    out = run_to_completion(engine, [by_messages, by_prompt])
    assert out["m"].token_ids == out["p"].token_ids


def test_image_preprocessing_cached_by_digest(loaded):
    engine = TransformersEngine(loaded)
    engine.prepare(chat_job("1", "turn one", [RED]))
    engine.prepare(chat_job("2", "turn two", [RED, BLUE]))
    assert (engine.images.misses, engine.images.hits) == (2, 1)


def test_sampling_same_seed_same_output(loaded):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=1234)
    jobs = [chat_job("s1", "tell me", params=params), chat_job("s2", "tell me", params=params)]
    filler = chat_job("f", "another prompt entirely", [RED], SamplingParams(temperature=0.8, seed=7, max_new_tokens=12))
    out = run_to_completion(TransformersEngine(loaded), [*jobs, filler])
    alone = run_to_completion(TransformersEngine(loaded), [jobs[0]])["s1"]
    assert out["s1"].token_ids == out["s2"].token_ids == alone.token_ids
    other = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=99)
    assert run_to_completion(TransformersEngine(loaded), [chat_job("o", "tell me", params=other)])["o"].token_ids != (
        alone.token_ids
    )


def test_eos_finishes_job(loaded):
    engine = TransformersEngine(loaded)
    job = chat_job("x", "hello")
    tokens = run_to_completion(engine, [job])["x"].token_ids
    loaded_eos = type(loaded)(**{**loaded.__dict__, "eos_token_ids": {tokens[4]}})
    result = run_to_completion(TransformersEngine(loaded_eos), [job])["x"]
    stop_at = tokens.index(tokens[4])
    assert result.finish_reason == FinishReason.eos
    assert result.token_ids == tokens[: stop_at + 1]
    assert result.usage.completion_tokens == stop_at + 1


def test_stop_string_spanning_tokens(loaded):
    engine = TransformersEngine(loaded)
    full = run_to_completion(engine, [chat_job("x", "Café 🙂", params=greedy(20))])["x"]
    tok = loaded.tokenizer
    pieces = [tok.decode(full.token_ids[:n]) for n in range(len(full.token_ids) + 1)]
    # A stop string made of the last 2 characters of token 3's text and the first character after it.
    assert full.text.startswith(pieces[3]) and "\ufffd" not in pieces[3]
    boundary = len(pieces[3])
    stop = full.text[boundary - 2 : boundary + 1]
    assert len(stop) == 3 and stop in full.text
    result = run_to_completion(engine, [chat_job("y", "Café 🙂", params=greedy(20, stop=[stop]))])["y"]
    assert result.finish_reason == FinishReason.stop
    assert result.text == full.text[: full.text.find(stop)]


def test_cancel_leaves_others_undisturbed(loaded):
    engine = TransformersEngine(loaded, max_batch=3)
    jobs = [
        chat_job("keep1", "one", [RED]),
        chat_job("gone", "two two two", params=greedy(30)),
        chat_job("keep2", "three", [BLUE]),
    ]
    expected = {j.job_id: run_to_completion(TransformersEngine(loaded), [j])[j.job_id].token_ids for j in jobs}
    for job in jobs:
        engine.add(engine.prepare(job))
    tokens = {j.job_id: [] for j in jobs}
    finals = {}
    for step in range(40):
        if step == 3:
            engine.cancel("gone")
        for update in engine.step():
            tokens[update.job_id] += update.token_ids
            if update.finish_reason:
                finals[update.job_id] = update
        if not engine.has_work():
            break
    assert finals["gone"].finish_reason == FinishReason.cancelled
    assert tokens["gone"] == expected["gone"][: len(tokens["gone"])] and len(tokens["gone"]) == 3
    assert tokens["keep1"] == expected["keep1"] and tokens["keep2"] == expected["keep2"]


def test_cancel_before_prefill(loaded):
    engine = TransformersEngine(loaded)
    engine.add(engine.prepare(chat_job("c", "hi")))
    engine.cancel("c")
    updates = engine.step()
    assert [(u.job_id, u.finish_reason, u.usage.completion_tokens) for u in updates] == [
        ("c", FinishReason.cancelled, 0)
    ]
    assert not engine.has_work()


def test_context_too_long_names_lengths(loaded):
    engine = TransformersEngine(loaded)
    with pytest.raises(ContextTooLong, match=r"prompt is \d+ tokens.*context length is 512"):
        engine.prepare(chat_job("long", "word " * 600))


def test_max_new_tokens_capped_by_context(loaded):
    engine = TransformersEngine(loaded)
    prepared = engine.prepare(chat_job("cap", "word " * 100, params=greedy(4096)))
    assert prepared.prompt_tokens + prepared.max_new_tokens == 512


def test_invalid_requests(loaded):
    engine = TransformersEngine(loaded)
    with pytest.raises(InvalidRequest, match="1 image parts but 2 images"):
        engine.prepare(EngineJob("a", greedy(), messages=chat_job("a", "x", [RED]).messages, images=[RED, BLUE]))
    with pytest.raises(InvalidRequest, match="literal image token"):
        engine.prepare(chat_job("b", "sneaky <image> token"))
    with pytest.raises(InvalidRequest, match="prompt has 2"):
        engine.prepare(EngineJob("c", greedy(), prompt="USER: <image><image> ASSISTANT:", images=[RED]))
    with pytest.raises(InvalidRequest, match="exactly one"):
        engine.prepare(EngineJob("d", greedy()))
    with pytest.raises(ImageInvalid):
        engine.prepare(chat_job("e", "x", [EngineImage("sha-bad", Image.new("RGB", (0, 0)))]))


def test_fits_respects_slots_and_token_budget(loaded):
    engine = TransformersEngine(loaded, max_batch=2, token_budget=100)
    small = engine.prepare(chat_job("s", "hi", params=greedy(20)))
    assert engine.fits(small)
    engine.add(small)
    big = engine.prepare(chat_job("b", "hi", params=greedy(90)))
    assert big.kv_tokens <= 100 and not engine.fits(big)
    other = engine.prepare(chat_job("o", "yo", params=greedy(20)))
    assert engine.fits(other)
    engine.add(other)
    assert engine.free_slots() == 0 and not engine.fits(engine.prepare(chat_job("z", "z", params=greedy(1))))
    run_to_completion(engine, [])
    assert engine.fits(big)


def test_device_error_fails_batch_and_engine_recovers(loaded, monkeypatch):
    engine = TransformersEngine(loaded)
    jobs = [chat_job("a", "one"), chat_job("b", "two", [RED])]
    for job in jobs:
        engine.add(engine.prepare(job))
    engine.step()  # prefill both
    real_forward = loaded.model.forward

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loaded.model, "forward", oom)
    updates = engine.step()
    assert {u.job_id: u.finish_reason for u in updates} == {"a": FinishReason.error, "b": FinishReason.error}
    assert all(isinstance(u.error, DeviceError) and "out of memory" in u.error.message for u in updates)
    assert engine.healthy and not engine.has_work()
    monkeypatch.setattr(loaded.model, "forward", real_forward)
    again = run_to_completion(engine, [chat_job("c", "three")])["c"]
    assert again.finish_reason == FinishReason.length


def test_fatal_device_error_marks_unhealthy(loaded, monkeypatch):
    engine = TransformersEngine(loaded)
    engine.add(engine.prepare(chat_job("a", "one")))

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loaded.model, "forward", broken)
    updates = engine.step()
    assert updates[0].finish_reason == FinishReason.error and isinstance(updates[0].error, DeviceError)
    assert not engine.healthy
    assert not engine.fits(engine.prepare(chat_job("b", "two")))


def test_one_token_job_finishes_at_prefill(loaded):
    engine = TransformersEngine(loaded)
    out = run_to_completion(engine, [chat_job("one", "hi", params=greedy(1)), chat_job("two", "hey", [RED])])
    assert out["one"].finish_reason == FinishReason.length and len(out["one"].token_ids) == 1
    assert out["one"].usage.completion_tokens == 1 and out["two"].usage.completion_tokens == 16


def test_prefill_device_error_fails_only_that_job(loaded, monkeypatch):
    engine = TransformersEngine(loaded)
    expected = run_to_completion(engine, [chat_job("ok", "fine")])["ok"].token_ids
    real_forward = loaded.model.forward

    def oom_on_images(*args, **kwargs):
        if kwargs.get("pixel_values") is not None:
            raise torch.OutOfMemoryError("CUDA out of memory (vision tower)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", oom_on_images)
    out = run_to_completion(engine, [chat_job("ok", "fine"), chat_job("img", "look", [RED])])
    assert out["img"].finish_reason == FinishReason.error and isinstance(out["img"].error, DeviceError)
    assert out["ok"].finish_reason == FinishReason.length and out["ok"].token_ids == expected
    assert engine.healthy


def count_forwards(loaded, monkeypatch):
    """Record the input_ids shape of every model forward."""
    shapes = []
    real_forward = loaded.model.forward

    def counting(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", counting)
    return shapes


def test_pending_jobs_prefilled_in_one_forward_per_image_shape(loaded, monkeypatch):
    jobs = [
        chat_job("t1", "hello"),
        chat_job("i1", "what is this", [RED]),
        chat_job("t2", "a rather longer text only prompt"),
        chat_job("i2", "and this one, with more words", [BLUE], greedy(5)),
        chat_job("i3", "two", [RED, BLUE]),
        chat_job("t3", "x", params=greedy(1)),
    ]
    alone = {
        j.job_id: run_to_completion(TransformersEngine(loaded, max_batch=1), [j])[j.job_id].token_ids for j in jobs
    }
    engine = TransformersEngine(loaded, max_batch=8)
    shapes = count_forwards(loaded, monkeypatch)
    for job in jobs:
        engine.add(engine.prepare(job))
    tokens = {j.job_id: [] for j in jobs}
    for update in engine.step():
        tokens[update.job_id] += update.token_ids
    # text-only jobs in one forward, image jobs (same processed image shape) in another
    assert [s[0] for s in shapes] == [3, 3]
    assert len(engine._rows) == 5  # t3 finished at its first token
    while engine.has_work():
        for update in engine.step():
            tokens[update.job_id] += update.token_ids
    assert tokens == alone
    assert all(s[0] <= 5 and s[1] == 1 for s in shapes[2:])  # decode steps only after the prefill


def test_prefill_budget_bounds_work_per_step_and_decode_runs_every_step(loaded, monkeypatch):
    engine = TransformersEngine(loaded, max_batch=16, prefill_tokens=60)
    first = engine.prepare(chat_job("first", "a long running job", params=greedy(30)))
    engine.add(first)
    engine.step()
    newcomers = [engine.prepare(chat_job(f"n{i}", f"newcomer {i}", params=greedy(4))) for i in range(6)]
    per_job = newcomers[0].prompt_tokens
    assert 60 // per_job >= 2  # the budget takes several but not all
    shapes = count_forwards(loaded, monkeypatch)
    for prepared in newcomers:
        engine.add(prepared)
    steps = 0
    while engine._pending:
        before = len(shapes)
        engine.step()
        steps += 1
        step_shapes = shapes[before:]
        assert step_shapes[0][1] == 1  # the running batch decoded first
        prefilled = step_shapes[1:]
        assert len(prefilled) == 1 and prefilled[0][0] * per_job <= 60
    assert steps == -(-6 // (60 // per_job))


def test_padding_trimmed_and_one_merge_per_step_under_churn(loaded, monkeypatch):
    """Closed loop with jobs joining and leaving at different steps: no cache column is padding in every row
    (so the cache never grows past the longest live row) and each step merges at most once."""
    from workers.batch import DecodeBatch

    merges = []
    real_concatenate = DecodeBatch.concatenate

    def counting(batches):
        merges.append(len(batches))
        return real_concatenate(batches)

    monkeypatch.setattr(DecodeBatch, "concatenate", staticmethod(counting))
    engine = TransformersEngine(loaded, max_batch=6, prefill_tokens=80)
    lengths = [3, 9, 5, 12, 2, 7, 4, 10, 6, 8, 3, 11]
    waiting = [engine.prepare(chat_job(f"j{i}", "go " * (i % 4 + 1), params=greedy(n))) for i, n in enumerate(lengths)]
    finished = 0
    for _ in range(200):
        if waiting and engine.fits(waiting[0]):
            engine.add(waiting.pop(0))  # one arrival per step at most: joins are staggered
        before = len(merges)
        finished += sum(u.finish_reason is not None for u in engine.step())
        assert len(merges) - before <= 1
        batch = engine._running.batch
        if batch is not None:
            assert bool(batch.attention_mask[:, 0].any())
            longest = max(r.prepared.prompt_tokens + r.completion_tokens for r in batch.rows)
            assert batch.cache_length == longest - 1  # every row's last token is fed, not cached
        if not waiting and not engine.has_work():
            break
    assert finished == len(lengths)


def test_the_transformers_engine_implements_the_engine_protocol(loaded):
    assert isinstance(TransformersEngine(loaded), Engine)


def test_the_engines_never_import_redis():
    code = "import sys, workers.engine, workers.scripted; print(sorted(m for m in sys.modules if m in ('redis', 'rq')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
