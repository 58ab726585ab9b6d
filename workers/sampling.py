"""Next-token choice per row of a batch: greedy, or temperature + top-p with the row's own generator.

Sampling never fails on a value the API accepts: a temperature at or below `GREEDY_TEMPERATURE` is greedy, the
most likely token always stays in the nucleus (so a tiny top_p is greedy too), and logits of any float dtype,
masked with -inf, all equal, huge, +inf or NaN give finite probabilities. NaN logits are never chosen, nor -inf
ones unless the whole row is masked (then token 0, as argmax gives).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from contract.messages import GREEDY_TEMPERATURE, SamplingParams

_FLOAT32_MAX = torch.finfo(torch.float32).max
_NEG_INF = float("-inf")


def is_greedy(temperature: float) -> bool:
    """Whether a row with this temperature takes the argmax instead of sampling."""
    return temperature <= GREEDY_TEMPERATURE


def make_generator(params: SamplingParams, device: str) -> torch.Generator | None:
    """A generator seeded from `params.seed` (random when None); None for greedy jobs, which need none."""
    if is_greedy(params.temperature):
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def _clean(logits: torch.Tensor) -> torch.Tensor:
    # float32 whatever the model's dtype; NaN can never win, +inf becomes the largest finite value.
    return torch.nan_to_num(logits.float(), nan=_NEG_INF, posinf=_FLOAT32_MAX, neginf=_NEG_INF)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dimension (the first of equal maxima), never a NaN logit."""
    return torch.argmax(_clean(logits), dim=-1)


def token_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(probs, ids)` for a row of logits [vocab]: float32 probabilities, finite and >= 0, over the token ids
    `ids`, most likely first; `probs[0]` (the most likely token) is always > 0 and tokens outside the nucleus are 0.
    Expects a sampling temperature (above `GREEDY_TEMPERATURE`)."""
    x = _clean(logits)
    best = torch.argmax(x, dim=-1, keepdim=True)
    # Shift so the best logit is 0: nothing overflows, exp stays in [0, 1]. -inf - -inf (all masked) is NaN: drop it.
    shifted = torch.nan_to_num((x - x.gather(-1, best)) / temperature, nan=_NEG_INF, neginf=_NEG_INF)
    probs = torch.softmax(shifted.scatter(-1, best, 0.0), dim=-1)
    # Stable: among equal probabilities the lowest id comes first, as argmax picks.
    sorted_probs, sorted_ids = torch.sort(probs, descending=True, stable=True)
    if top_p < 1.0:
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p; the first token always, even when top_p rounds to 0.
        drop = cumulative - sorted_probs >= top_p
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return sorted_probs, sorted_ids


def sample_row(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id (0-d tensor) from a row of logits; greedy when `is_greedy(temperature)` or without generator."""
    if is_greedy(temperature) or generator is None:
        return greedy_tokens(logits)
    probs, ids = token_distribution(logits, temperature, top_p)
    choice = torch.multinomial(probs, 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token id per row of `logits` [batch, vocab], each row with its own params and generator; greedy rows
    share one argmax. A row's token depends only on its logits, params and generator, not on the other rows."""
    greedy = greedy_tokens(logits)
    sampled = [
        i
        for i, (p, g) in enumerate(zip(params, generators, strict=True))
        if not is_greedy(p.temperature) and g is not None
    ]
    if not sampled:
        return greedy.tolist()
    chosen = [greedy[i] for i in range(logits.shape[0])]
    for i in sampled:
        chosen[i] = sample_row(logits[i], params[i].temperature, params[i].top_p, generators[i])
    return torch.stack(chosen).tolist()
