import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from contract.errors import ContextTooLong
from contract.messages import FinishReason
from tests.workers.test_engine import BLUE, RED, chat_job, greedy
from tests.workers.tiny_llava import tiny_loaded
from workers.batch import Prefilled, cache_from_tensors
from workers.completion import run_to_completion
from workers.engine import TransformersEngine
from workers.positions import step_position_ids
from workers.slots import SlotBatch, SlotCache, bucket_for, buckets


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


def prefill(lengths: list[int], fills: list[float]) -> Prefilled:
    """A left-padded two-layer prefill: row i holds `fills[i]` in its `lengths[i]` real columns."""
    longest = max(lengths)
    keys = torch.zeros((len(lengths), 2, longest, 4))
    mask = torch.zeros((len(lengths), longest), dtype=torch.long)
    for i, (n, fill) in enumerate(zip(lengths, fills, strict=True)):
        keys[i, :, longest - n :] = fill
        mask[i, longest - n :] = 1
    cache = cache_from_tensors([(keys, keys + 100), (keys * 2, keys * 2 + 100)])
    return Prefilled(cache, mask, [int(f) for f in fills], [f"r{f:g}" for f in fills], keep=list(range(len(lengths))))


def slots(max_rows=4, max_columns=16) -> SlotBatch:
    return SlotBatch(SlotCache([(2, 4), (2, 4)], max_rows, max_columns, "cpu", torch.float32), pad_token_id=0)


def test_buckets():
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(2350, 256) == [256, 512, 1024, 2048, 2350]
    assert bucket_for(3, buckets(32)) == 4 and bucket_for(32, buckets(32)) == 32
    with pytest.raises(ValueError, match="over the largest bucket"):
        bucket_for(33, buckets(32))


def test_join_strips_left_padding_into_slot_columns():
    batch = slots()
    part = prefill([3, 5], [1.0, 2.0])
    part.keep = [1, 0]
    batch.join([part])
    assert batch.rows == ["r2", "r1"]
    assert batch.cache.lengths[:2].tolist() == [5, 3] and batch.cache.tokens[:2].tolist() == [2, 1]
    keys = batch.cache.layers[1].kbuf
    assert bool((keys[0, :, :5] == 4).all()) and bool((keys[0, :, 5:] == 0).all())
    assert bool((keys[1, :, :3] == 2).all()) and bool((keys[1, :, 3:] == 0).all())
    assert batch.step_shape() == (2, 16)


def test_leaving_rows_take_the_last_rows_slot():
    batch = slots()
    batch.join([prefill([2, 4, 6, 3], [1.0, 2.0, 3.0, 4.0])])
    batch.keep([0, 2])  # rows 1 and 3 leave: row 3 was last, so it just goes; row 2 moves into slot 1
    assert batch.rows == ["r1", "r3"]
    assert batch.cache.lengths[:2].tolist() == [2, 6] and batch.cache.tokens[:2].tolist() == [1, 3]
    values = batch.cache.layers[0].vbuf
    assert bool((values[1, :, :6] == 103).all())
    batch.advance(torch.tensor([7, 8]))
    assert batch.cache.lengths[:2].tolist() == [3, 7] and batch.cache.tokens[:2].tolist() == [7, 8]
    assert batch.step_shape() == (2, 16)
    batch.keep([])
    assert batch.rows == [] and batch.free_slots() == 4


def test_join_refuses_more_rows_than_free_slots():
    batch = slots(max_rows=2)
    with pytest.raises(ValueError, match="3 jobs join but only 2 slots are free"):
        batch.join([prefill([1, 2, 3], [1.0, 2.0, 3.0])])


def compiled_engine(loaded, backend="eager", **kw) -> TransformersEngine:
    """The compiled decode step without inductor's code generation time: `eager` runs dynamo's graphs as traced;
    `aot_eager` adds AOTAutograd, whose guards and recompiles are those inductor gets."""
    torch._dynamo.reset()
    counters.clear()
    return TransformersEngine(loaded, compile=True, compile_backend=backend, **kw)


def test_compiled_slots_match_eager_under_churn_with_few_graphs(loaded):
    # Jobs of many lengths join one at a time and leave at different steps, through row buckets 1..8 and across
    # the 256-column bucket: greedy tokens equal the eager engine's, and dynamo compiles a handful of graphs.
    lengths = [3, 40, 5, 12, 260, 7, 4, 10, 6, 30, 3, 11]
    jobs = [
        chat_job(f"j{i}", "go " * (i % 4 + 1), [RED] if i % 3 == 0 else [], greedy(n)) for i, n in enumerate(lengths)
    ]
    expected = run_to_completion(TransformersEngine(loaded, max_batch=8), jobs)
    engine = compiled_engine(loaded, "aot_eager", max_batch=8)
    waiting = [engine.prepare(job) for job in jobs]
    out: dict[str, list[int]] = {}
    shapes = set()
    while waiting or engine.has_work():
        if waiting and engine.fits(waiting[0]):
            engine.add(waiting.pop(0))  # one arrival per step: joins are staggered
        if engine._rows:
            shapes.add(engine._running.step_shape())
        for update in engine.step():
            out.setdefault(update.job_id, []).extend(update.token_ids)
    assert out == {j: expected[j].token_ids for j in expected}
    assert {rows for rows, _ in shapes} == {1, 2, 4, 8} and {cols for _, cols in shapes} == {256, 512}
    assert counters["stats"]["unique_graphs"] <= 2  # one row, and every other shape: never one per shape


def test_compiled_cancel_leaves_other_rows_untouched(loaded):
    jobs = [chat_job("a", "hello", [BLUE], greedy(12)), chat_job("b", "more words here", params=greedy(12))]
    jobs.append(chat_job("c", "x", params=greedy(12)))
    expected = {
        j.job_id: run_to_completion(TransformersEngine(loaded, max_batch=1), [j])[j.job_id].token_ids for j in jobs
    }
    engine = compiled_engine(loaded, max_batch=4)
    for job in jobs:
        engine.add(engine.prepare(job))
    out: dict[str, list[int]] = {}
    reasons = {}
    for step in range(40):
        if step == 3:
            engine.cancel("a")  # the first slot leaves; the last row moves into it
        for update in engine.step():
            out.setdefault(update.job_id, []).extend(update.token_ids)
            if update.finish_reason is not None:
                reasons[update.job_id] = update.finish_reason
        if not engine.has_work():
            break
    assert reasons == {"a": FinishReason.cancelled, "b": FinishReason.length, "c": FinishReason.length}
    assert out["b"] == expected["b"] and out["c"] == expected["c"]
    assert out["a"] == expected["a"][: len(out["a"])]


def test_compiled_job_limit_is_a_slot(loaded):
    engine = compiled_engine(loaded, max_batch=4, token_budget=4 * 64)
    assert engine.job_limit == 64
    prepared = engine.prepare(chat_job("a", "hi", params=greedy(500)))
    assert prepared.kv_tokens == 64
    with pytest.raises(ContextTooLong, match="KV cache room per job is 64"):
        engine.prepare(chat_job("b", "word " * 80))


def test_compiled_with_inductor_matches_eager(loaded):
    # The default backend, as a worker runs it (code generation included): one job, so one graph to build.
    job = chat_job("a", "hello", [RED], greedy(6))
    expected = run_to_completion(TransformersEngine(loaded, max_batch=1), [job])["a"].token_ids
    torch._dynamo.reset()
    engine = TransformersEngine(loaded, max_batch=2, compile=True)
    assert run_to_completion(engine, [job])["a"].token_ids == expected
    assert engine.compiled and not engine.has_work()


def test_warmup_builds_every_graph_before_jobs_come(loaded):
    engine = compiled_engine(loaded, "aot_eager", max_batch=4)
    assert engine.warmup() == [(r, c) for r in (1, 2, 4) for c in (256, 512)]
    built = counters["stats"]["unique_graphs"]
    assert built <= 2
    jobs = [chat_job(f"j{i}", "go " * i, params=greedy(4 + i)) for i in range(4)]
    expected = run_to_completion(TransformersEngine(loaded, max_batch=4), jobs)
    out = run_to_completion(engine, jobs)
    assert {j: out[j].token_ids for j in out} == {j: expected[j].token_ids for j in expected}
    assert counters["stats"]["unique_graphs"] == built
    assert TransformersEngine(loaded, max_batch=2).warmup() == []


def test_cudagraphs_backend_needs_cuda(loaded):
    with pytest.raises(ValueError, match="'cudagraphs' needs a CUDA device, not cpu"):
        TransformersEngine(loaded, compile=True, compile_backend="cudagraphs")


def test_a_compiled_step_out_of_memory_runs_in_parts_and_the_compiled_step_goes_on(loaded):
    # Every other whole step runs out of memory: its parts write into the slots the compiled step reads next.
    jobs = [chat_job(f"j{i}", "go " * (i + 1), [RED] if i == 1 else [], greedy(n)) for i, n in enumerate([9, 14, 6])]
    expected = run_to_completion(TransformersEngine(loaded, max_batch=4), jobs)
    engine = compiled_engine(loaded, max_batch=4)
    compiled, calls = engine._running.step, []

    def step_out_of_memory_every_other_call(model, cache, tokens, *rest):
        calls.append(tokens.shape[0])
        if len(calls) % 2 == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return compiled(model, cache, tokens, *rest)

    engine._running.step = step_out_of_memory_every_other_call
    out = run_to_completion(engine, jobs)
    assert {j: c.token_ids for j, c in out.items()} == {j: c.token_ids for j, c in expected.items()}
    assert all(c.finish_reason == FinishReason.length for c in out.values())
    assert len(calls) >= 8 and engine.healthy


def test_rope_deltas_stay_with_their_rows_when_slots_move():
    """Each slot decodes at its length plus its own rope delta, on all three axes; a moved row takes its delta."""
    batch = SlotBatch(SlotCache([(2, 4), (2, 4)], 4, 16, "cpu", torch.float32), pad_token_id=0, position_axes=3)
    part = prefill([2, 4, 6], [1.0, 2.0, 3.0])
    part.rope_deltas = torch.tensor([-1, 0, -3])
    batch.join([part])
    seen = []

    def step(model, cache, tokens, lengths, deltas, columns, cache_kwarg, axes):
        seen.append(step_position_ids(lengths + deltas, axes).tolist())
        return torch.zeros((len(tokens), 3))

    batch.step = step
    batch.keep([1, 2])  # row 0 leaves: the last row moves into its slot, with its delta
    assert batch.rows == ["r3", "r2"] and batch.cache.deltas[:2].tolist() == [-3, 0]
    batch.forward(None)
    batch.advance(torch.tensor([7, 8]))
    batch.forward(None)
    assert seen == [[[[3], [4]]] * 3, [[[4], [5]]] * 3]
