"""Per-minute request and token counters in Redis, for `llava-serve status` (requests/min, tokens/s).

Each finished job adds to the hash of its wall-clock minute in one pipelined write that also sets the TTL, so any
number of controller replicas add to the same counters and nothing needs cleaning up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from contract import keys
from contract.status_report import ModelRates

COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens")
_SEP = "|"


def minute_of(unix_time: float) -> int:
    return int(unix_time // 60)


def queue_job_counts(
    pipe: Any, model: str, *, ok: bool, prompt_tokens: int, completion_tokens: int, now: float | None = None
) -> None:
    """Queue on `pipe` (sync or asyncio) the counter increments of one finished job, and the key's TTL."""
    key = keys.stats_minute(minute_of(time.time() if now is None else now))
    pipe.hincrby(key, f"{model}{_SEP}requests", 1)
    if not ok:
        pipe.hincrby(key, f"{model}{_SEP}errors", 1)
    if prompt_tokens:
        pipe.hincrby(key, f"{model}{_SEP}prompt_tokens", int(prompt_tokens))
    if completion_tokens:
        pipe.hincrby(key, f"{model}{_SEP}completion_tokens", int(completion_tokens))
    pipe.expire(key, keys.STATS_TTL_S)


def _fold(rates: dict[str, ModelRates], fields: dict, window_s: float) -> None:
    for raw_field, raw_value in fields.items():
        field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        model, _, counter = field.rpartition(_SEP)
        if not model or counter not in COUNTERS:
            continue
        entry = rates.setdefault(model, ModelRates(model=model, window_s=window_s))
        setattr(entry, counter, getattr(entry, counter) + int(raw_value))


def read_rates(redis: Any, *, minutes: int = 5, now: float | None = None) -> dict[str, ModelRates]:
    """Per-model totals over the current minute and the `minutes - 1` before it; rates divide by the time that
    window really spans (so a status shortly after the minute turned is not diluted)."""
    now = time.time() if now is None else now
    current = minute_of(now)
    window_s = (minutes - 1) * 60.0 + max(1.0, now - current * 60)
    with redis.pipeline(transaction=False) as pipe:
        for minute in range(current - minutes + 1, current + 1):
            pipe.hgetall(keys.stats_minute(minute))
        replies: Iterable[dict] = pipe.execute()
    rates: dict[str, ModelRates] = {}
    for fields in replies:
        _fold(rates, fields, window_s)
    return dict(sorted(rates.items()))
