"""How much KV cache an engine holds: each layer's cache layout, the bytes of one token across the layers, the
default token budget (every job's full context, bounded on CUDA by the device memory free at start), and the
compiled engine's slot cache, allocated once for that budget and stepped by a torch.compile'd decode forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from workers.model import LoadedModel
from workers.slots import SlotBatch, SlotCache, decode_forward

log = logging.getLogger(__name__)


def kv_layout(model: Any) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each layer's cache."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return [(kv_heads, head_dim)] * cfg.num_hidden_layers


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes of one token's keys and values over all layers."""
    values = sum(heads * dim for heads, dim in kv_layout(loaded.model))
    return 2 * values * torch.finfo(loaded.dtype).bits // 8


def default_token_budget(loaded: LoadedModel, max_batch: int) -> int:
    """KV tokens for `max_batch` jobs of the full context length; on CUDA, at most what 60% of the free memory
    holds."""
    budget = max_batch * loaded.context_length
    if loaded.device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(loaded.device))
        # Leave room for activations (prefill of images) and the padding of a merged batch.
        budget = min(budget, int(free * 0.6) // kv_bytes_per_token(loaded))
    return max(budget, 2)


def compiled_slot_batch(
    loaded: LoadedModel, max_batch: int, token_budget: int, backend: str, position_axes: int
) -> SlotBatch:
    """The running batch of a compiled engine: `max_batch` slots sharing `token_budget` (up to the context length
    each), stepped by `decode_forward` compiled with `backend`."""
    device = loaded.device
    columns = min(loaded.context_length, token_budget // max_batch)
    if columns < 2:
        raise ValueError(f"token_budget {token_budget} leaves {columns} cache columns per slot for {max_batch} slots")
    if backend == "cudagraphs" and not device.startswith("cuda"):
        raise ValueError(f"compile backend 'cudagraphs' needs a CUDA device, not {device}")
    mode = "reduce-overhead" if backend == "inductor" and device.startswith("cuda") else None
    step = torch.compile(decode_forward, backend=backend, mode=mode, dynamic=True, fullgraph=True)
    cache = SlotCache(kv_layout(loaded.model), max_batch, columns, device, loaded.dtype)
    batch = SlotBatch(cache, loaded.pad_token_id, step, loaded.cache_kwarg, position_axes)
    shapes = len(batch.row_buckets) * len(batch.column_buckets)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    log.info(
        "compiled decode: %d slots of %d columns (%.2f GiB), %d step shapes at most",
        max_batch, columns, batch.cache.nbytes() / 2**30, shapes,
    )  # fmt: skip
    return batch
