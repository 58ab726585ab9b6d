import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.messages import GREEDY_TEMPERATURE, MAX_TEMPERATURE, FinishReason, JobMessage, JobText, SamplingParams
from tests.workers.tiny_llava import tiny_loaded
from workers.completion import run_to_completion
from workers.engine import EngineJob, TransformersEngine
from workers.sampling import make_generator, sample_batch, sample_row, token_distribution


def test_greedy_rows_take_argmax_without_generator():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0)]
    assert make_generator(params[0], "cpu") is None
    assert sample_batch(logits, params, [None, None]) == [1, 0]


def test_same_seed_same_draws():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=42)
    draws = []
    for _ in range(2):
        generator = make_generator(params, "cpu")
        draws.append([int(sample_row(logits, 1.0, 1.0, generator)) for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    generator = make_generator(SamplingParams(temperature=1.0, seed=1), "cpu")
    seen = {int(sample_row(logits, 1.0, 0.8, generator)) for _ in range(200)}
    assert seen == {0, 1}
    assert {int(sample_row(logits, 1.0, 0.5, generator)) for _ in range(50)} == {0}


def test_tiny_top_p_keeps_the_most_likely_token():
    # 1e-300 rounds to 0 in float32: compared as is, it used to drop every token and multinomial raised.
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    generator = make_generator(SamplingParams(temperature=1.0, seed=3), "cpu")
    assert {int(sample_row(logits, 1.0, 1e-300, generator)) for _ in range(20)} == {1}


def test_tiny_temperature_is_greedy():
    # Dividing by 1e-300 used to overflow to inf, softmax gave NaN and multinomial raised.
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=1e-300, seed=1), SamplingParams(temperature=1.0, top_p=1e-300, seed=2)]
    generators = [make_generator(p, "cpu") for p in params]
    assert sample_batch(logits, params, generators) == [1, 0]


# ---- Property: every accepted value samples safely ------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EDGE_LOGITS = [float("-inf"), float("inf"), float("nan"), 3e38, -3e38, 65504.0, -65504.0, 0.0, 1e-30]
TINY = [5e-324, 1e-300, 1e-45, 1e-8]

temperatures = st.one_of(
    st.just(0.0),
    st.sampled_from([*TINY, GREEDY_TEMPERATURE, math.nextafter(GREEDY_TEMPERATURE, 1.0), MAX_TEMPERATURE]),
    st.floats(min_value=0.0, max_value=MAX_TEMPERATURE),
)
top_ps = st.one_of(st.sampled_from([*TINY, 1.0]), st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
row_params = st.builds(SamplingParams, temperature=temperatures, top_p=top_ps, seed=st.integers(0, 2**63 - 1))


@st.composite
def logit_batches(draw: st.DrawFn) -> tuple[torch.Tensor, list[SamplingParams]]:
    """A batch [rows, vocab] in one dtype; rows ordinary, all equal, or made of -inf masks, huge, inf and NaN."""
    dtype = draw(st.sampled_from(DTYPES))
    vocab = draw(st.integers(1, 40))
    value = st.one_of(st.floats(-100.0, 100.0), st.sampled_from(EDGE_LOGITS))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            rows.append([draw(value)] * vocab)
        else:
            rows.append(draw(st.lists(value, min_size=vocab, max_size=vocab)))
    params = [draw(row_params) for _ in rows]
    return torch.tensor(rows, dtype=torch.float32).to(dtype), params


def _allowed(row: torch.Tensor) -> set[int]:
    """Tokens a sampler may pick: not -inf and not NaN, or token 0 when all are."""
    values = row.float().tolist()
    ok = {i for i, v in enumerate(values) if not math.isnan(v) and v != float("-inf")}
    return ok or {0}


def _first_max(row: torch.Tensor) -> int:
    values = [v if not math.isnan(v) else float("-inf") for v in row.float().tolist()]
    return values.index(max(values)) if any(v != float("-inf") for v in values) else 0


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(logit_batches())
def test_sampling_never_fails_and_rows_stay_independent(batch):
    logits, params = batch
    tokens = sample_batch(logits, params, [make_generator(p, "cpu") for p in params])
    assert len(tokens) == len(params)
    for i, (token, p) in enumerate(zip(tokens, params, strict=True)):
        assert token in _allowed(logits[i])
        if p.temperature <= GREEDY_TEMPERATURE:
            assert token == _first_max(logits[i])
        # The same row alone, with a fresh generator of the same seed, picks the same token.
        assert sample_batch(logits[i : i + 1], [p], [make_generator(p, "cpu")]) == [token]


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(logit_batches())
def test_distribution_is_finite_and_keeps_the_most_likely_token(batch):
    logits, params = batch
    for row, p in zip(logits, params, strict=True):
        temperature = max(p.temperature, math.nextafter(GREEDY_TEMPERATURE, 1.0))
        probs, ids = token_distribution(row, temperature, p.top_p)
        assert probs.dtype == torch.float32
        assert bool(torch.isfinite(probs).all()) and bool((probs >= 0).all())
        assert float(probs[0]) > 0 and float(probs.sum()) <= 1.0 + 1e-5
        assert sorted(ids.tolist()) == list(range(row.shape[-1]))
        assert {int(t) for t, q in zip(ids, probs, strict=True) if q > 0} <= _allowed(row)


def test_tiny_values_in_a_running_batch_fail_no_one():
    # Through the real engine and tiny model: this batch used to fail every job with device_error.
    def job(job_id: str, **params) -> EngineJob:
        message = JobMessage(role="user", content=[JobText(text=f"say something {job_id}")])
        return EngineJob(job_id, SamplingParams(max_new_tokens=6, seed=5, **params), messages=[message], images=[])

    jobs = [
        job("greedy", temperature=0),
        job("tiny-temperature", temperature=1e-300),
        job("tiny-top-p", temperature=1.0, top_p=1e-300),
        job("sampled", temperature=1.0),
    ]
    loaded = tiny_loaded()
    results = run_to_completion(TransformersEngine(loaded, max_batch=4), jobs)
    assert all(results[j.job_id].finish_reason == FinishReason.length for j in jobs)
    alone = run_to_completion(TransformersEngine(loaded, max_batch=1), [job("tiny-temperature", temperature=0)])
    assert results["tiny-temperature"].token_ids == alone["tiny-temperature"].token_ids
