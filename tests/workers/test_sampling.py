import torch

from contract.messages import SamplingParams
from workers.sampling import make_generator, sample_batch, sample_row


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
