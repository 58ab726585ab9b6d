"""A left-padded batched KV cache that jobs join and leave between decode steps (TGI's non-paged CausalLMBatch).

Row i of every tensor belongs to `rows[i]`. The cache holds every token of a row except its last sampled one,
which `last_tokens` feeds to the next decode step. `attention_mask` marks real (1) and left-padding (0) slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [batch, kv_heads, seq, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_tensors(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for layer_idx, (keys, values) in enumerate(tensors):
        # update() on an empty layer stores the tensors (one copy, done only when batches merge)
        cache.update(keys, values, layer_idx)
    return cache


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class DecodeBatch:
    cache: Any
    attention_mask: torch.Tensor  # [batch, cache_len] long
    positions: torch.Tensor  # [batch] position id of last_tokens
    last_tokens: torch.Tensor  # [batch] long, not yet in the cache
    rows: list[Any] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def cache_length(self) -> int:
        return int(self.attention_mask.shape[1])

    @classmethod
    def from_prefill(cls, cache: Any, prompt_length: int, first_token: int, row: Any, device: str) -> DecodeBatch:
        """A one-row batch from a batch-1 prefill of `prompt_length` tokens that sampled `first_token`."""
        return cls(
            cache=cache,
            attention_mask=torch.ones((1, prompt_length), dtype=torch.long, device=device),
            positions=torch.tensor([prompt_length], dtype=torch.long, device=device),
            last_tokens=torch.tensor([first_token], dtype=torch.long, device=device),
            rows=[row],
        )

    def decode_inputs(self) -> dict[str, Any]:
        """Model kwargs for one decode step of every row."""
        ones = self.attention_mask.new_ones((self.size, 1))
        return {
            "input_ids": self.last_tokens[:, None],
            "attention_mask": torch.cat([self.attention_mask, ones], dim=1),
            "position_ids": self.positions[:, None],
            "cache": self.cache,
        }

    def advance(self, cache: Any, next_tokens: torch.Tensor) -> None:
        """After a decode step: the fed tokens are now cached; `next_tokens` are fed next."""
        self.cache = cache
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.size, 1))], 1)
        self.positions = self.positions + 1
        self.last_tokens = next_tokens

    def filter(self, keep: Sequence[int]) -> DecodeBatch | None:
        """Keep only rows `keep` (in order); trims the left padding they all share. None when empty."""
        if not keep:
            return None
        if list(keep) == list(range(self.size)):
            return self
        index = torch.tensor(list(keep), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        # Columns that are padding in every kept row can go.
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        tensors = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in cache_tensors(self.cache)
        ]
        return DecodeBatch(
            cache=cache_from_tensors(tensors),
            attention_mask=mask[:, start:],
            positions=self.positions.index_select(0, index),
            last_tokens=self.last_tokens.index_select(0, index),
            rows=[self.rows[i] for i in keep],
        )

    @staticmethod
    def concatenate(batches: Sequence[DecodeBatch]) -> DecodeBatch:
        """One batch of all rows, left-padding each part once to the longest cache."""
        if len(batches) == 1:
            return batches[0]
        length = max(b.cache_length for b in batches)
        per_batch = [cache_tensors(b.cache) for b in batches]
        tensors = []
        for layer_idx in range(len(per_batch[0])):
            keys = torch.cat([_left_pad(p[layer_idx][0], length, 2) for p in per_batch], dim=0)
            values = torch.cat([_left_pad(p[layer_idx][1], length, 2) for p in per_batch], dim=0)
            tensors.append((keys, values))
        return DecodeBatch(
            cache=cache_from_tensors(tensors),
            attention_mask=torch.cat([_left_pad(b.attention_mask, length, 1) for b in batches], dim=0),
            positions=torch.cat([b.positions for b in batches]),
            last_tokens=torch.cat([b.last_tokens for b in batches]),
            rows=[row for b in batches for row in b.rows],
        )
