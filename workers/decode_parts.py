"""A decode step that runs out of memory runs again in parts before anyone fails: the running rows in halves, each
half in halves again while it runs out of memory, down to one row. Every part goes through the running batch's own
`forward_rows` on its own cache, so a row gets the logits it gets in the whole step; only a row that runs out of
memory alone is given up.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from workers.faults import is_out_of_memory, release_cached_memory

log = logging.getLogger(__name__)


class RunningRows(Protocol):
    """What `PaddedBatch` and `SlotBatch` offer a decode step."""

    rows: list[Any]

    def forward(self, model: Any) -> torch.Tensor: ...

    def forward_rows(self, model: Any, start: int, stop: int) -> torch.Tensor: ...

    def rollback(self) -> None: ...


def decode_logits(
    running: RunningRows, model: Any, device: str
) -> tuple[torch.Tensor | None, dict[int, BaseException]]:
    """One decode step of every running row: the next-token logits of the rows that ran ([ran, vocab], in row
    order; None when none ran), and the rows that ran out of memory alone with their exception. Any other
    exception propagates, the batch rolled back; so does out of memory in a batch of one row."""
    try:
        return running.forward(model), {}
    except Exception as exc:
        if not is_out_of_memory(exc) or len(running.rows) < 2:
            raise
        log.warning("decode step of %d rows ran out of memory; running it in parts: %s", len(running.rows), exc)
    running.rollback()
    release_cached_memory(device)
    logits: list[torch.Tensor] = []
    failed: dict[int, BaseException] = {}
    try:
        _run_halves(running, model, device, 0, len(running.rows), logits, failed)
    except Exception:
        running.rollback()
        raise
    return (torch.cat(logits) if logits else None), failed


def _run_halves(
    running: RunningRows,
    model: Any,
    device: str,
    start: int,
    stop: int,
    logits: list[torch.Tensor],
    failed: dict[int, BaseException],
) -> None:
    """Rows start..stop-1 (two or more, whose step ran out of memory) in two halves, each split again while it
    runs out of memory; their logits appended in row order, the rows that run out of memory alone in `failed`."""
    middle = (start + stop) // 2
    for first, last in ((start, middle), (middle, stop)):
        try:
            logits.append(running.forward_rows(model, first, last))
            continue
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            fault = exc.with_traceback(None)  # its frames hold the failed forward's tensors
        release_cached_memory(device)
        if last - first == 1:
            failed[first] = fault
        else:
            _run_halves(running, model, device, first, last, logits, failed)
