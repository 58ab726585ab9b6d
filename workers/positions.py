"""Position ids of a family's prompts and decode steps, from the model's own machinery.

Most families count tokens: a prompt's positions are 0..n-1 and each new token is one further. M-RoPE families
(Qwen2-VL, Qwen2.5-VL) give every token three positions (temporal, height, width): an image's tokens sit on a grid,
so a prompt's next position is its token count plus a per-prompt rope delta, which every later token keeps. The
engine carries each row's next position (delta included); the model's `get_rope_index` gives the prompt's.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.families import MROPE, ROPE

# Axes of the position ids the model takes, per scheme.
AXES = {ROPE: 1, MROPE: 3}

# Processor outputs get_rope_index takes besides the ids, the token types and the mask, when present.
_GRID_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def prompt_positions(model: Any, scheme: str, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of one left-padded prefill forward (`inputs`: the model kwargs, `attention_mask` marking real
    tokens) and each row's rope delta [rows] (the position of its next token minus its token count). Padding does
    not shift a row's positions: they are the ones it would get alone. ROPE: [rows, prompt], deltas 0; MROPE:
    [3, rows, prompt] from `mrope_positions`."""
    mask = inputs["attention_mask"]
    if scheme == ROPE:
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return positions, torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    if scheme == MROPE:
        return mrope_positions(model, inputs)
    raise ValueError(f"position scheme must be one of {', '.join(AXES)}, not {scheme!r}")


def mrope_positions(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids [3, rows, prompt] of a left-padded prefill and each row's rope delta [rows], from the
    model's own `get_rope_index` (image grids from the processor's `image_grid_thw`, token types from its
    `mm_token_type_ids`)."""
    if "mm_token_type_ids" not in inputs:
        raise ValueError("M-RoPE positions need the processor's mm_token_type_ids, which the prompt's inputs lack")
    rope_index = getattr(model, "get_rope_index", None) or model.model.get_rope_index
    grids = {key: inputs[key] for key in _GRID_INPUTS if key in inputs}
    positions, deltas = rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        attention_mask=inputs["attention_mask"],
        **grids,
    )
    return positions, deltas.reshape(-1).to(device=positions.device, dtype=torch.long)


def step_position_ids(positions: torch.Tensor, axes: int) -> torch.Tensor:
    """Position ids of one decode step from each row's position [rows]: [rows, 1], or [axes, rows, 1] where the
    model takes several axes (a generated token is text: all its axes are equal)."""
    if axes == 1:
        return positions[:, None]
    return positions[None, :, None].expand(axes, -1, 1)
