"""What the broker looks like right now, read from Redis: workers, queues, recent rates. Shared by
`llava-serve status` (a table, `--watch` redraws it in place) and the controller's `/metrics` gauges.

It stays with the controller: it reads the controller's Redis state (rq queues, worker records, rate counters)
through `contract.jobs` and `broker.stats`, and needs no controller running. What it shows is
`contract.status_report.StatusReport`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from broker.stats import read_rates
from contract import jobs, keys, liveness
from contract.status_report import QueueRow, StatusReport

RATE_MINUTES = 5


def queued_models(redis: Any) -> list[str]:
    """Models with an rq queue registered under our prefix (served now or before)."""
    prefix = keys.rq_queue_prefix()
    names = (k.decode() if isinstance(k, bytes) else k for k in redis.smembers(keys.rq_queues()))
    return sorted(name[len(prefix) :] for name in names if name.startswith(prefix))


def _oldest_wait(redis: Any, model: str, now: float) -> float | None:
    head = redis.lindex(keys.rq_queue(model), 0)
    if head is None:
        return None
    job = jobs.fetch_job(redis, head.decode() if isinstance(head, bytes) else head)
    if job is None:
        return None
    try:
        return max(0.0, now - jobs.job_request(job).enqueued_at)
    except (KeyError, ValueError, TypeError):
        return None


def snapshot(redis: Any, *, now: float | None = None, rate_minutes: int | None = RATE_MINUTES) -> StatusReport:
    """Live workers, one row per model (queued or served), and per-model rates unless `rate_minutes` is None."""
    now = time.time() if now is None else now
    workers = liveness.live_workers(redis)
    models = set(queued_models(redis))
    for info in workers:
        models.update(info.models)
    ordered = sorted(models)
    with redis.pipeline(transaction=False) as pipe:
        for model in ordered:
            pipe.llen(keys.rq_queue(model))
        pipe.xlen(keys.conversations())
        pipe.hgetall(keys.refusals())
        *depths, log_entries, refusals = pipe.execute()
    queues = []
    for model, depth in zip(ordered, depths, strict=True):
        serving = [w for w in workers if model in w.models]
        queues.append(
            QueueRow(
                model=model,
                depth=int(depth),
                oldest_wait_s=_oldest_wait(redis, model, now) if depth else None,
                workers=len(serving),
                running=sum(w.busy_slots for w in serving),
                slots=sum(w.max_batch for w in serving),
            )
        )
    rates = read_rates(redis, minutes=rate_minutes, now=now) if rate_minutes else {}
    refused = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in refusals.items()}
    return StatusReport(
        at=now, workers=workers, queues=queues, rates=rates, conversation_log_entries=int(log_entries), refusals=refused
    )


# ---- Rendering ----------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return out


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.0f}m"


def render(report: StatusReport, *, rate_minutes: int = RATE_MINUTES) -> str:
    """The report as three plain-text tables."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.at))
    lines = [f"llava-serve status at {stamp}", "", f"WORKERS ({len(report.workers)} live)"]
    worker_rows = [
        [
            w.worker_id,
            ",".join(w.models),
            w.device,
            f"{w.busy_slots}/{w.max_batch}",
            _seconds(report.at - w.heartbeat_at) + " ago",
            "draining" if w.draining else "serving",
        ]
        for w in report.workers
    ]
    lines += _table(["WORKER", "MODEL", "DEVICE", "BUSY/MAX", "HEARTBEAT", "STATE"], worker_rows)
    lines += ["", "QUEUES"]
    queue_rows = [
        [q.model, str(q.depth), _seconds(q.oldest_wait_s), str(q.workers), f"{q.running}/{q.slots}"]
        for q in report.queues
    ]
    lines += _table(["MODEL", "DEPTH", "OLDEST WAIT", "WORKERS", "RUNNING/SLOTS"], queue_rows)
    lines += ["", f"RATES (last {rate_minutes} min)"]
    rate_rows = [
        [
            r.model,
            f"{r.requests_per_minute:.1f}",
            f"{r.tokens_per_second:.1f}",
            str(r.requests),
            str(r.errors),
        ]
        for r in report.rates.values()
    ]
    lines += _table(["MODEL", "REQ/MIN", "TOKENS/S", "REQUESTS", "ERRORS"], rate_rows)
    refused = ", ".join(f"{code} {count}" for code, count in sorted(report.refusals.items())) or "none"
    lines += ["", f"CONVERSATION LOG {report.conversation_log_entries} entries; REFUSED {refused}"]
    return "\n".join(lines) + "\n"


# ---- `llava-serve status` -----------------------------------------------------------------------------------


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help="Redis URL (env LLAVA_REDIS_URL)")
    parser.add_argument("--watch", action="store_true", help="redraw in place every --interval seconds")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default 2)")
    parser.add_argument("--minutes", type=int, default=RATE_MINUTES, help="window of the rates (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON, once")


_CLEAR = "\x1b[H\x1b[2J"


def run_status(args: argparse.Namespace, *, out: TextIO | None = None, max_frames: int | None = None) -> int:
    """Print the status once, or redraw it until Ctrl-C with `--watch`; exit 1 when Redis is unreachable."""
    import os

    import redis as redis_errors

    from infra.redis import connect

    out = out or sys.stdout
    client = connect(args.redis_url or os.environ.get("LLAVA_REDIS_URL"))
    frames = 0
    try:
        while True:
            report = snapshot(client, rate_minutes=args.minutes)
            if args.json:
                out.write(report.model_dump_json(indent=2) + "\n")
                return 0
            text = render(report, rate_minutes=args.minutes)
            out.write((_CLEAR if args.watch and out.isatty() else "") + text)
            out.flush()
            frames += 1
            if not args.watch or (max_frames is not None and frames >= max_frames):
                return 0
            time.sleep(args.interval)
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        print(f"llava-serve status: cannot reach Redis ({exc})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
