"""A left-padded batched KV cache that jobs join and leave between decode steps (TGI's non-paged CausalLMBatch).

Row i of every tensor belongs to `rows[i]`. The cache holds every token of a row except its last sampled one,
which `last_tokens` feeds to the next decode step. `attention_mask` marks real (1) and left-padding (0) slots.
`positions` is each row's next position: its token count plus its rope delta (M-RoPE families; 0 for others).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from workers.positions import step_position_ids

# Cache columns are allocated in chunks of this many, so a decode step writes one column instead of copying the cache.
CHUNK = 64


def _round_up(n: int, chunk: int = CHUNK) -> int:
    return -(-n // chunk) * chunk


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare columns; `keys`/`values` view the `length` filled ones.
    `update` writes the new columns and returns the filled view, growing the buffer by chunks when full."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        length = keys.shape[2]
        capacity = max(capacity, length + 1)
        self.kbuf = keys.new_zeros((*keys.shape[:2], capacity, keys.shape[3]))
        self.vbuf = values.new_zeros((*values.shape[:2], capacity, values.shape[3]))
        self.kbuf[:, :, :length] = keys
        self.vbuf[:, :, :length] = values
        self.length = length
        self.device = keys.device
        self.is_initialized = True
        self._view()

    @property
    def capacity(self) -> int:
        return int(self.kbuf.shape[2])

    def _view(self) -> None:
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n = key_states.shape[2]
        if self.length + n > self.capacity:
            self._grow(_round_up(self.length + n + CHUNK))
        self.kbuf[:, :, self.length : self.length + n] = key_states
        self.vbuf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._view()
        return self.keys, self.values

    def rows_view(self, start: int, stop: int) -> SlabLayer:
        """Rows start..stop-1 of this layer on the same buffers (room for one more column is made first), so a
        decode step over them writes its column here."""
        if self.length + 1 > self.capacity:
            self._grow(_round_up(self.length + 1 + CHUNK))
        view = SlabLayer.__new__(SlabLayer)
        DynamicLayer.__init__(view)
        view.kbuf, view.vbuf = self.kbuf[start:stop], self.vbuf[start:stop]
        view.length, view.device, view.is_initialized = self.length, self.device, True
        view._view()
        return view

    def _grow(self, capacity: int) -> None:
        kbuf = self.kbuf.new_zeros((*self.kbuf.shape[:2], capacity, self.kbuf.shape[3]))
        vbuf = self.vbuf.new_zeros((*self.vbuf.shape[:2], capacity, self.vbuf.shape[3]))
        kbuf[:, :, : self.length] = self.keys
        vbuf[:, :, : self.length] = self.values
        self.kbuf, self.vbuf = kbuf, vbuf
        self._view()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [batch, kv_heads, seq, head_dim] (the filled columns only)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_tensors(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    """A slab cache holding a copy of `tensors` with room for at least one more column."""
    length = tensors[0][0].shape[2] if tensors else 0
    return Cache(layers=[SlabLayer(k, v, _round_up(length + 1)) for k, v in tensors])


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
    positions: torch.Tensor  # [batch] position id of last_tokens (rope delta included)
    last_tokens: torch.Tensor  # [batch] long, not yet in the cache
    rows: list[Any] = field(default_factory=list)
    position_axes: int = 1  # axes of the model's position ids (3 for M-RoPE), each at `positions`

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
            cache=cache_from_tensors(cache_tensors(cache)),
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
        rope_deltas: torch.Tensor | None = None,
        position_axes: int = 1,
    ) -> DecodeBatch:
        """A batch from one left-padded prefill forward: `attention_mask` [rows, prompt_len] marks real tokens;
        `rope_deltas` [rows] (None: 0) are added to every position of each row."""
        rows = list(rows)
        mask = attention_mask.to(device=device, dtype=torch.long)
        positions = mask.sum(dim=1)
        if rope_deltas is not None:
            positions = positions + rope_deltas.to(device=device, dtype=torch.long)
        return cls(
            cache=cache_from_tensors(cache_tensors(cache)),
            attention_mask=mask,
            positions=positions,
            last_tokens=torch.tensor(list(first_tokens), dtype=torch.long, device=device),
            rows=rows,
            position_axes=position_axes,
        )

    def rows_in(self, start: int, stop: int) -> DecodeBatch:
        """Rows start..stop-1 as a batch of their own on this batch's cache buffers, left padding kept: a decode
        step over it gives those rows the logits the whole batch gives them and caches their column in place."""
        return DecodeBatch(
            cache=Cache(layers=[layer.rows_view(start, stop) for layer in self.cache.layers]),
            attention_mask=self.attention_mask[start:stop],
            positions=self.positions[start:stop],
            last_tokens=self.last_tokens[start:stop],
            rows=self.rows[start:stop],
            position_axes=self.position_axes,
        )

    def decode_inputs(self, cache_kwarg: str = "cache") -> dict[str, Any]:
        """Model kwargs for one decode step of every row (the cache under `cache_kwarg`)."""
        ones = self.attention_mask.new_ones((self.size, 1))
        return {
            "input_ids": self.last_tokens[:, None],
            "attention_mask": torch.cat([self.attention_mask, ones], dim=1),
            "position_ids": step_position_ids(self.positions, self.position_axes),
            cache_kwarg: self.cache,
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
            position_axes=self.position_axes,
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
            position_axes=batches[0].position_axes,
        )


def prefill_inputs(
    prepared: Sequence[Any],
    pad_token_id: int,
    device: str,
    dtype: torch.dtype,
    per_token: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Model kwargs (no cache, no positions: `workers.positions.prompt_positions`) of one prefill forward over the
    left-padded prompts of `prepared` (PreparedJobs of one `prefill_groups` group), every extra input of the processor
    included: the `per_token` ones ([prompt] each) are left-padded with 0 like the ids, the others (pixels, image
    grids) are concatenated along dim 0, in the order of the rows."""
    lengths = [p.prompt_tokens for p in prepared]
    longest = max(lengths)
    input_ids = torch.full((len(prepared), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prepared), longest), dtype=torch.long)
    for i, (p, n) in enumerate(zip(prepared, lengths, strict=True)):
        input_ids[i, longest - n :] = p.input_ids
        attention_mask[i, longest - n :] = 1
    inputs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    for key in prepared[0].image_inputs:
        parts = [p.image_inputs[key] for p in prepared]
        if key in per_token:
            value = torch.stack([_left_pad(t, longest, 0) for t in parts])
        else:  # image tensors: one entry per image (or per prompt) along dim 0
            value = torch.cat(parts)
        value = value.to(device)
        inputs[key] = value.to(dtype) if value.is_floating_point() else value
    return inputs


def prefill_groups(rows: list[Any]) -> list[list[Any]]:
    """Running jobs `rows` split into groups that can share one prefill forward: same image tensor keys, dtypes and
    per-image shapes (pixel tensors are concatenated along the image dim). Order is kept within and across groups."""
    groups: dict[tuple, list[Any]] = {}
    for row in rows:
        inputs = row.prepared.image_inputs
        signature = tuple((k, v.dtype, tuple(v.shape[1:])) for k, v in sorted(inputs.items()))
        groups.setdefault(signature, []).append(row)
    return list(groups.values())


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (`cache`, or `past_key_values` before transformers 5.2x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def try_decode(model: Any, batch: DecodeBatch, cache_kwarg: str = "cache") -> Exception | None:
    """Run one decode step of `batch` (a copy: its cache is thrown away); the exception it raises, if any. How a
    failed batched step finds the rows that make it fail."""
    try:
        model(**batch.decode_inputs(cache_kwarg), use_cache=True, logits_to_keep=1)
    except Exception as exc:  # noqa: BLE001 - any exception is the answer
        return exc
    return None


@dataclass
class Prefilled:
    """One left-padded prefill forward: its cache, which columns are real (`attention_mask` [rows, prompt]),
    each row's first sampled token, the rows (`keep`) that go on decoding, and each row's rope delta ([rows]: its
    next position minus its token count; None when positions count tokens)."""

    cache: Any
    attention_mask: torch.Tensor
    first_tokens: list[int]
    rows: list[Any]
    keep: list[int]
    rope_deltas: torch.Tensor | None = None


class PaddedBatch:
    """The running jobs of an eager engine: one DecodeBatch, rebuilt as jobs join and leave."""

    def __init__(self, device: str, cache_kwarg: str = "cache", position_axes: int = 1) -> None:
        self.device = device
        self.cache_kwarg = cache_kwarg
        self.position_axes = position_axes
        self.batch: DecodeBatch | None = None
        self._stepped_cache: Any = None
        self._lengths_before: list[int] = []  # each layer's cached columns before the last forward
        self._in_parts = False  # the step ran as `forward_rows` parts, each caching its rows' column in place

    @property
    def rows(self) -> list[Any]:
        return self.batch.rows if self.batch is not None else []

    def join(self, parts: Sequence[Prefilled]) -> None:
        """Add the kept rows of `parts` in one merge."""
        joined = []
        for p in parts:
            batch = DecodeBatch.from_prefill_batch(
                p.cache, p.attention_mask, p.first_tokens, p.rows, self.device, p.rope_deltas, self.position_axes
            )
            kept = batch.filter(p.keep)
            if kept is not None:
                joined.append(kept)
        if joined:
            self.batch = DecodeBatch.concatenate([self.batch, *joined] if self.batch is not None else joined)

    def keep(self, indices: Sequence[int]) -> None:
        if self.batch is not None:
            self.batch = self.batch.filter(indices)

    def forward(self, model: Any) -> torch.Tensor:
        """One decode step of every row: next-token logits [rows, vocab]. After it raises, `rollback`."""
        self._lengths_before = [layer.length for layer in self.batch.cache.layers]
        out = model(**self.batch.decode_inputs(self.cache_kwarg), use_cache=True, logits_to_keep=1)
        self._stepped_cache, self._in_parts = output_cache(out), False
        return out.logits[:, -1, :]

    def forward_rows(self, model: Any, start: int, stop: int) -> torch.Tensor:
        """One decode step of rows start..stop-1 alone: their next-token logits. How a step that ran out of memory
        runs again in parts; `advance` once every row ran (or was given up)."""
        part = self.batch.rows_in(start, stop)
        out = model(**part.decode_inputs(self.cache_kwarg), use_cache=True, logits_to_keep=1)
        self._stepped_cache, self._in_parts = None, True
        return out.logits[:, -1, :]

    def rollback(self) -> None:
        """Undo what a failed `forward` wrote: the layers it reached drop the column they cached."""
        for layer, length in zip(self.batch.cache.layers, self._lengths_before, strict=True):
            layer.length = length
            layer._view()
        self._stepped_cache, self._in_parts = None, False

    def try_row(self, model: Any, index: int) -> Exception | None:
        """Run row `index` alone on a copy of its cache: the exception the step raises for it, if any."""
        return try_decode(model, self.batch.filter([index]), self.cache_kwarg)

    def advance(self, next_tokens: torch.Tensor) -> None:
        if self._in_parts:  # every part cached its rows' column in the batch's own layers
            for layer in self.batch.cache.layers:
                layer.length += 1
                layer._view()
            self._stepped_cache = self.batch.cache
        self.batch.advance(self._stepped_cache, next_tokens)
        self._stepped_cache, self._in_parts = None, False

    def clear(self) -> None:
        self.batch, self._stepped_cache, self._in_parts = None, None, False
