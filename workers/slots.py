"""A fixed-shape KV cache for a compiled decode step: one slot (row) per running job, allocated once.

Every layer keeps keys and values in one buffer [max_rows, kv_heads, max_columns + 1, head_dim] for the engine's
life, so a compiled step (CUDA graphs included) always reads and writes the same memory. A job's tokens sit at columns
0..length-1 of its slot; a decode step writes each row's new token at its own column, `lengths[row]`; its position id
is that column plus the row's rope delta, `deltas[row]` (M-RoPE families; 0 for others). Running jobs always fill
slots 0..n-1: a leaving job's slot takes the last job's row.

A step runs over a bucket of rows and columns (powers of two), never the exact counts, so the compiled step sees
a handful of shapes however jobs come and go; the rows past the running jobs are free slots that write into
themselves and are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from workers.batch import DecodeBatch, Prefilled, cache_from_tensors, cache_tensors, try_decode
from workers.positions import step_position_ids

# Smallest column bucket: short conversations share one shape.
MIN_COLUMNS = 256


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} is over the largest bucket, {sizes[-1]}")


class SlotLayer(DynamicLayer):
    """One layer's slots. `update` writes the step's token of every row at its length and returns the step's
    bucket of rows and columns (a view: no copy)."""

    is_compileable = True

    def __init__(self, slots: SlotCache | SlotRows, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.slots = slots
        self.kbuf, self.vbuf = keys, values
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        rows, columns = key_states.shape[0], self.slots.step_columns.shape[0]
        index, at = self.slots.row_index[:rows], self.slots.lengths[:rows]
        self.kbuf[index, :, at] = key_states[:, :, 0]
        self.vbuf[index, :, at] = value_states[:, :, 0]
        return self.kbuf[:rows, :, :columns], self.vbuf[:rows, :, :columns]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.step_columns.shape[0], 0

    def get_seq_length(self) -> int:
        return self.slots.step_columns.shape[0]

    def get_max_length(self) -> int:
        return self.slots.max_columns


class SlotCache(Cache):
    """The slots of every layer plus the per-row step inputs (`tokens`, `lengths`, `deltas`), all at fixed
    addresses."""

    def __init__(
        self,
        layer_shapes: Sequence[tuple[int, int]],
        max_rows: int,
        max_columns: int,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        """`layer_shapes`: (kv_heads, head_dim) per layer."""
        self.max_rows, self.max_columns = max_rows, max_columns
        layers = []
        for heads, dim in layer_shapes:
            shape = (max_rows, heads, max_columns + 1, dim)  # a spare column, for the reason below
            keys = torch.zeros(shape, dtype=dtype, device=device)
            values = torch.zeros(shape, dtype=dtype, device=device)
            layers.append(SlotLayer(self, keys, values))
        super().__init__(layers=layers)
        # One spare element (and cache column) each: a step's views are then always strict prefixes, which dynamo
        # does not specialise on (a view as long as its base, or as the cache, gets a graph of its own).
        self.tokens = torch.zeros(max_rows + 1, dtype=torch.long, device=device)  # fed at the next step
        self.lengths = torch.zeros(max_rows + 1, dtype=torch.long, device=device)  # cached tokens = next column
        self.deltas = torch.zeros(max_rows + 1, dtype=torch.long, device=device)  # position = column + delta
        self.row_index = torch.arange(max_rows + 1, device=device)
        self.column_index = torch.arange(max_columns + 1, device=device)
        # The step's column bucket as a view of column_index: its size, not a Python int, so one compiled graph
        # serves every bucket (dynamic shapes) instead of one graph per bucket.
        self.step_columns = self.column_index
        for t in (self.tokens, self.lengths, self.deltas, self.row_index, self.column_index):
            torch._dynamo.mark_static_address(t)
        for layer in layers:
            torch._dynamo.mark_static_address(layer.kbuf)
            torch._dynamo.mark_static_address(layer.vbuf)

    def nbytes(self) -> int:
        return sum(layer.kbuf.nbytes + layer.vbuf.nbytes for layer in self.layers)

    def rows(self, start: int, stop: int, columns: int) -> SlotRows:
        """Slots start..stop-1 as a cache of their own on the same buffers, stepped over `columns` columns."""
        return SlotRows(self, start, stop, columns)


class SlotRows(Cache):
    """Some consecutive slots of a SlotCache, viewed (no copy): a decode step over them writes their new column
    into the slot cache itself, and nothing else changes."""

    def __init__(self, slots: SlotCache, start: int, stop: int, columns: int) -> None:
        self.max_columns = slots.max_columns
        self.tokens, self.lengths = slots.tokens[start:stop], slots.lengths[start:stop]
        self.deltas = slots.deltas[start:stop]
        self.row_index = slots.row_index  # a layer indexes its rows from 0: its buffers start at slot `start`
        self.step_columns = slots.column_index[:columns]
        super().__init__(
            layers=[SlotLayer(self, layer.kbuf[start:stop], layer.vbuf[start:stop]) for layer in slots.layers]
        )


def decode_forward(
    model: Any,
    cache: SlotCache,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    deltas: torch.Tensor,
    columns: torch.Tensor,
    cache_kwarg: str = "cache",
    position_axes: int = 1,
) -> torch.Tensor:
    """One decode step of the first len(tokens) slots over `columns` (the cache's `step_columns`): next-token
    logits [rows, vocab]. The tensors are views of the cache's fixed buffers; `cache_kwarg` names the forward's
    cache argument, `position_axes` the axes of its position ids."""
    # A row sees its cached columns and the one its token is written to; a 4D mask is used by the model as is.
    mask = (columns[None, :] <= lengths[:, None])[:, None, None, :]
    out = model(
        input_ids=tokens[:, None],
        position_ids=step_position_ids(lengths + deltas, position_axes),
        attention_mask=mask,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg: cache},
    )
    return out.logits[:, -1, :]


class SlotBatch:
    """The running jobs of a compiled engine, one per slot, in slots 0..len(rows)-1."""

    def __init__(
        self,
        cache: SlotCache,
        pad_token_id: int,
        step: Callable[..., torch.Tensor] = decode_forward,
        cache_kwarg: str = "cache",
        position_axes: int = 1,
    ) -> None:
        self.cache = cache
        self.step = step
        self.cache_kwarg = cache_kwarg
        self.position_axes = position_axes
        self.pad_token_id = pad_token_id
        self.row_buckets = buckets(cache.max_rows)
        self.column_buckets = buckets(cache.max_columns, min(MIN_COLUMNS, cache.max_columns))
        self.rows: list[Any] = []
        self._lengths: list[int] = []  # host copy of cache.lengths[:n]: bucket choice without a device sync

    @property
    def max_columns(self) -> int:
        return self.cache.max_columns

    def free_slots(self) -> int:
        return self.cache.max_rows - len(self.rows)

    def join(self, parts: Sequence[Prefilled]) -> None:
        """Copy the kept rows of each left-padded prefill into free slots; their first sampled tokens are fed next."""
        for part in parts:
            self._join(part)

    def _join(self, part: Prefilled) -> None:
        tensors, attention_mask = cache_tensors(part.cache), part.attention_mask
        if len(part.keep) > self.free_slots():
            raise ValueError(f"{len(part.keep)} jobs join but only {self.free_slots()} slots are free")
        if len(tensors) != len(self.cache.layers):
            raise ValueError(f"the prefill has {len(tensors)} cache layers, the slots {len(self.cache.layers)}")
        prompt = attention_mask.shape[1]
        real = attention_mask.sum(dim=1).tolist()
        deltas = [0] * len(real) if part.rope_deltas is None else part.rope_deltas.tolist()
        for i in part.keep:
            slot, length = len(self.rows), int(real[i])
            if length >= self.max_columns:
                raise ValueError(f"a prompt of {length} tokens does not fit a slot of {self.max_columns} columns")
            for layer, (keys, values) in zip(self.cache.layers, tensors, strict=True):
                layer.kbuf[slot, :, :length] = keys[i, :, prompt - length :]
                layer.vbuf[slot, :, :length] = values[i, :, prompt - length :]
            self.cache.lengths[slot] = length
            self.cache.deltas[slot] = int(deltas[i])
            self.cache.tokens[slot] = int(part.first_tokens[i])
            self.rows.append(part.rows[i])
            self._lengths.append(length)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep rows `indices`; each leaving row's slot takes the last running row, so slots stay packed."""
        kept = set(indices)
        for i in sorted(set(range(len(self.rows))) - kept, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self._move(last, i)
                self.rows[i], self._lengths[i] = self.rows[last], self._lengths[last]
            self.rows.pop()
            self._lengths.pop()

    def _move(self, source: int, target: int) -> None:
        length = self._lengths[source]
        for layer in self.cache.layers:
            layer.kbuf[target, :, :length] = layer.kbuf[source, :, :length]
            layer.vbuf[target, :, :length] = layer.vbuf[source, :, :length]
        self.cache.lengths[target] = self.cache.lengths[source]
        self.cache.deltas[target] = self.cache.deltas[source]
        self.cache.tokens[target] = self.cache.tokens[source]

    def step_shape(self) -> tuple[int, int]:
        """(rows, columns) buckets the next step runs over."""
        rows = bucket_for(len(self.rows), self.row_buckets)
        columns = bucket_for(max(self._lengths) + 1, self.column_buckets)
        return rows, columns

    def forward(self, model: Any) -> torch.Tensor:
        """One decode step (`self.step`: decode_forward, compiled or not) over the bucket: the running rows'
        next-token logits [rows, vocab]."""
        n = len(self.rows)
        rows, columns = self.step_shape()
        return self._run(model, n, rows, columns)[:n]

    def warm_up(self, model: Any) -> list[tuple[int, int]]:
        """Run the step once at every row bucket, with the smallest and the largest column bucket, before any job
        runs: compiling (and CUDA graph capture) happens here instead of in front of a waiting user."""
        if self.rows:
            raise RuntimeError("warm_up runs before any job joins")
        shapes = [(r, c) for r in self.row_buckets for c in sorted({self.column_buckets[0], self.column_buckets[-1]})]
        for rows, columns in shapes:
            self._run(model, 0, rows, columns)
        return shapes

    def _run(self, model: Any, running: int, rows: int, columns: int) -> torch.Tensor:
        cache = self.cache
        if rows > running:  # free slots in the bucket: a pad token at column 0 of their own slot
            cache.lengths[running:rows] = 0
            cache.deltas[running:rows] = 0
            cache.tokens[running:rows] = self.pad_token_id
        cache.step_columns = cache.column_index[:columns]
        if cache.column_index.is_cuda:  # a new step for CUDA graph trees: the last step's outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(
            model,
            cache,
            cache.tokens[:rows],
            cache.lengths[:rows],
            cache.deltas[:rows],
            cache.step_columns,
            self.cache_kwarg,
            self.position_axes,
        )

    def forward_rows(self, model: Any, start: int, stop: int) -> torch.Tensor:
        """One decode step of slots start..stop-1 alone: their next-token logits. How a step that ran out of memory
        runs again in parts; `advance` once every row ran (or was given up). It runs `decode_forward` eagerly: the
        compiled step's graphs are captured for buckets of slots from 0 at fixed addresses, and a part is neither."""
        part = self.cache.rows(start, stop, self.step_shape()[1])
        return decode_forward(
            model, part, part.tokens, part.lengths, part.deltas, part.step_columns, self.cache_kwarg, self.position_axes
        )

    def rollback(self) -> None:
        """After a failed step: nothing to undo (a step writes each row's new column past its length, and only
        `advance` moves the lengths)."""

    def try_row(self, model: Any, index: int) -> Exception | None:
        """Run row `index` alone, eagerly, on a copy of its slot: the exception the step raises for it, if any."""
        length = self._lengths[index]
        tensors = [(layer.kbuf[index : index + 1, :, :length], layer.vbuf[index : index + 1, :, :length])
                   for layer in self.cache.layers]  # fmt: skip
        device = self.cache.tokens.device
        alone = DecodeBatch(
            cache=cache_from_tensors(tensors),
            attention_mask=torch.ones((1, length), dtype=torch.long, device=device),
            positions=self.cache.deltas[index : index + 1] + length,
            last_tokens=self.cache.tokens[index : index + 1].clone(),
            rows=[self.rows[index]],
            position_axes=self.position_axes,
        )
        return try_decode(model, alone, self.cache_kwarg)

    def advance(self, next_tokens: torch.Tensor) -> None:
        """After a step: every running row cached its fed token; `next_tokens` [n] are fed next."""
        n = len(self.rows)
        self.cache.tokens[:n] = next_tokens
        self.cache.lengths[:n] += 1
        self._lengths = [length + 1 for length in self._lengths]

    def clear(self) -> None:
        self.rows, self._lengths = [], []
