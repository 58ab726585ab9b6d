"""A left-padded batched KV cache that jobs join and leave between decode steps (TGI's non-paged CausalLMBatch).

Row i of every tensor belongs to `rows[i]`. The cache holds every token of a row except its last sampled one,
which `last_tokens` feeds to the next decode step. `attention_mask` marks real (1) and left-padding (0) slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Cache columns are allocated in chunks of this many, so a decode step writes one column instead of copying the cache.
CHUNK = 64


def _round_up(n: int, chunk: int = CHUNK) -> int:
    return -(-n // chunk) * chunk


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare columns; `keys`/`values` view the `length` filled ones.

    Eager (`static=False`): update writes the new columns and returns the filled view, growing the buffer by
    chunks when full. Static: update writes at the `position` tensor and returns the whole buffer (fixed shapes
    and addresses for torch.compile / CUDA graphs); the engine masks unused columns and calls `advance` after.
    """

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, static: bool = False) -> None:
        super().__init__()
        length = keys.shape[2]
        capacity = max(capacity, length + 1)
        self.static = static
        self.kbuf = keys.new_zeros((*keys.shape[:2], capacity, keys.shape[3]))
        self.vbuf = values.new_zeros((*values.shape[:2], capacity, values.shape[3]))
        self.kbuf[:, :, :length] = keys
        self.vbuf[:, :, :length] = values
        self.length = length
        self.position = torch.tensor([length], dtype=torch.long, device=keys.device)
        self.device = keys.device
        self.is_initialized = True
        self._view()
        if static and not torch.compiler.is_compiling():
            for t in (self.kbuf, self.vbuf, self.position):
                torch._dynamo.mark_static_address(t)

    @property
    def capacity(self) -> int:
        return int(self.kbuf.shape[2])

    def _view(self) -> None:
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.static:
            self.kbuf.index_copy_(2, self.position, key_states)
            self.vbuf.index_copy_(2, self.position, value_states)
            return self.kbuf, self.vbuf
        n = key_states.shape[2]
        if self.length + n > self.capacity:
            self._grow(_round_up(self.length + n + CHUNK))
        self.kbuf[:, :, self.length : self.length + n] = key_states
        self.vbuf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._view()
        return self.keys, self.values

    def advance(self, n: int = 1) -> None:
        """Static mode: the step wrote `n` columns at `position`."""
        self.length += n
        self.position.add_(n)
        self._view()

    def _grow(self, capacity: int) -> None:
        kbuf = self.kbuf.new_zeros((*self.kbuf.shape[:2], capacity, self.kbuf.shape[3]))
        vbuf = self.vbuf.new_zeros((*self.vbuf.shape[:2], capacity, self.vbuf.shape[3]))
        kbuf[:, :, : self.length] = self.keys
        vbuf[:, :, : self.length] = self.values
        self.kbuf, self.vbuf = kbuf, vbuf
        self._view()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self.capacity, 0
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity if self.static else -1


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [batch, kv_heads, seq, head_dim] (the filled columns only)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_tensors(
    tensors: Sequence[tuple[torch.Tensor, torch.Tensor]], capacity: int = 0, static: bool = False
) -> Cache:
    """A slab cache holding a copy of `tensors` with room for `capacity` columns (at least one more)."""
    length = tensors[0][0].shape[2] if tensors else 0
    capacity = max(capacity, _round_up(length + 1))
    return Cache(layers=[SlabLayer(k, v, capacity, static) for k, v in tensors])


def _capacity(rows: Sequence[Any], length: int, static: bool) -> int:
    """Cache columns for `rows` at `length`: static batches get room for every row's remaining tokens (so the
    compiled step keeps its shape until the batch changes), rounded to limit the number of distinct shapes."""
    if not static:
        return _round_up(length + 1)
    remaining = [r.prepared.max_new_tokens - r.completion_tokens for r in rows if hasattr(r, "prepared")]
    return _round_up(length + max(remaining, default=CHUNK) + 1, 2 * CHUNK)


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
    static: bool = False  # fixed-shape cache and mask for a compiled decode step

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def cache_length(self) -> int:
        return int(self.attention_mask.shape[1])

    @classmethod
    def from_prefill(
        cls, cache: Any, prompt_length: int, first_token: int, row: Any, device: str, static: bool = False
    ) -> DecodeBatch:
        """A one-row batch from a batch-1 prefill of `prompt_length` tokens that sampled `first_token`."""
        return cls(
            cache=cache_from_tensors(cache_tensors(cache), _capacity([row], prompt_length, static), static),
            static=static,
            attention_mask=torch.ones((1, prompt_length), dtype=torch.long, device=device),
            positions=torch.tensor([prompt_length], dtype=torch.long, device=device),
            last_tokens=torch.tensor([first_token], dtype=torch.long, device=device),
            rows=[row],
        )

    @classmethod
    def from_prefill_batch(
        cls,
        cache: Any,
        attention_mask: torch.Tensor,
        first_tokens: Sequence[int],
        rows: Sequence[Any],
        device: str,
        static: bool = False,
    ) -> DecodeBatch:
        """A batch from one left-padded prefill forward: `attention_mask` [rows, prompt_len] marks real tokens."""
        rows = list(rows)
        mask = attention_mask.to(device=device, dtype=torch.long)
        capacity = _capacity(rows, mask.shape[1], static)
        return cls(
            cache=cache_from_tensors(cache_tensors(cache), capacity, static),
            static=static,
            attention_mask=mask,
            positions=mask.sum(dim=1),
            last_tokens=torch.tensor(list(first_tokens), dtype=torch.long, device=device),
            rows=rows,
        )

    def decode_inputs(self) -> dict[str, Any]:
        """Model kwargs for one decode step of every row."""
        ones = self.attention_mask.new_ones((self.size, 1))
        parts = [self.attention_mask, ones]
        if self.static:  # columns past the one being written are masked, the shape stays the cache's capacity
            capacity = self.cache.layers[0].capacity
            parts.append(self.attention_mask.new_zeros((self.size, capacity - self.cache_length - 1)))
        return {
            "input_ids": self.last_tokens[:, None],
            "attention_mask": torch.cat(parts, dim=1),
            "position_ids": self.positions[:, None],
            "cache": self.cache,
        }

    def advance(self, cache: Any, next_tokens: torch.Tensor) -> None:
        """After a decode step: the fed tokens are now cached; `next_tokens` are fed next."""
        self.cache = cache
        if self.static:
            for layer in cache.layers:
                layer.advance(1)
            if self.cache_length + 2 > cache.layers[0].capacity:  # the next step needs a free column
                grown = _capacity(self.rows, self.cache_length + 1, True)
                self.cache = cache_from_tensors(cache_tensors(cache), grown, True)
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
        rows = [self.rows[i] for i in keep]
        return DecodeBatch(
            cache=cache_from_tensors(tensors, _capacity(rows, mask.shape[1] - start, self.static), self.static),
            static=self.static,
            attention_mask=mask[:, start:],
            positions=self.positions.index_select(0, index),
            last_tokens=self.last_tokens.index_select(0, index),
            rows=rows,
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
        rows = [row for b in batches for row in b.rows]
        static = batches[0].static
        return DecodeBatch(
            cache=cache_from_tensors(tensors, _capacity(rows, length, static), static),
            static=static,
            attention_mask=torch.cat([_left_pad(b.attention_mask, length, 1) for b in batches], dim=0),
            positions=torch.cat([b.positions for b in batches]),
            last_tokens=torch.cat([b.last_tokens for b in batches]),
            rows=rows,
        )
