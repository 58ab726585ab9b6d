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
    exception propagates, the batch rolled back."""
    try:
        return running.forward(model), {}
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        log.warning("decode step of %d rows ran out of memory; running it in parts: %s", len(running.rows), exc)
    running.rollback()
    release_cached_memory(device)
    logits: list[torch.Tensor] = []
    failed: dict[int, BaseException] = {}
    rows = len(running.rows)
    try:  # one row is tried once more alone; more rows in halves (the whole just ran out of memory)
        for start, stop in [(0, 1)] if rows == 1 else _halves(0, rows):
            _run_part(running, model, device, start, stop, logits, failed)
    except Exception:
        running.rollback()
        raise
    return (torch.cat(logits) if logits else None), failed


def _halves(start: int, stop: int) -> list[tuple[int, int]]:
    middle = (start + stop) // 2
    return [(start, middle), (middle, stop)]


def _run_part(
    running: RunningRows,
    model: Any,
    device: str,
    start: int,
    stop: int,
    logits: list[torch.Tensor],
    failed: dict[int, BaseException],
) -> None:
    """Rows start..stop-1 in one forward, their logits appended; when that runs out of memory, a single row goes to
    `failed`, more rows run as two halves, each in the same way."""
    try:
        logits.append(running.forward_rows(model, start, stop))
        return
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        fault = exc.with_traceback(None)  # its frames hold the failed forward's tensors
    release_cached_memory(device)
    if stop - start == 1:
        failed[start] = fault
        return
    for first, last in _halves(start, stop):
        _run_part(running, model, device, first, last, logits, failed)
