"""Next-token choice per row of a batch: greedy, or temperature + top-p with the row's own generator."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from contract.messages import SamplingParams


def make_generator(params: SamplingParams, device: str) -> torch.Generator | None:
    """A generator seeded from `params.seed` (random when None); None for greedy jobs, which need none."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def sample_row(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id (0-d tensor) from a row of logits; temperature 0 means argmax."""
    if temperature == 0 or generator is None:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = cumulative - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return sorted_ids.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token id per row of `logits` [batch, vocab]; greedy rows share one argmax."""
    greedy = torch.argmax(logits, dim=-1)
    if all(p.temperature == 0 or g is None for p, g in zip(params, generators, strict=True)):
        return greedy.tolist()
    chosen = [greedy[i] for i in range(logits.shape[0])]
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.temperature > 0 and g is not None:
            chosen[i] = sample_row(logits[i], p.temperature, p.top_p, g)
    return torch.stack(chosen).tolist() if chosen else []
