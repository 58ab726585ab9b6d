"""Controller replicas: does each one's relay cost per event stay flat, and the aggregate grow, as replicas are added?

    python -m bench.scale [--replicas 1 2 4] [--streams-per-controller 10] [--tokens 200] [--step-delay-s 0.05]
                          [--workers 1 | --workers-per-controller N] [--stream-timeout 120]
                          [--out bench/results/scale.json]

For each replica count R: an embedded redis-server, R `llava-serve controller` processes and `--workers` workers on
the scripted engine (workers/scripted.py: a deterministic fake engine for load tests of the broker, NOT a model),
every worker with room for all its streams at once. The workers are the same for every R (one by default), so
each controller receives the same thing whatever R: one burst of its streams' events per decode step. A
controller's CPU per event depends on how many workers it hears from (each worker's step arrives as its own burst;
one controller with 4 workers spent 0.39 ms per event where it spent 0.25 ms with 1), so workers that grew with R
(`--workers-per-controller`) would measure that as well as the replicas. A round-robin client
opens R x `--streams-per-controller` streams at once (stream k to controller k mod R), so each controller relays the
same fixed event rate, `--streams-per-controller / --step-delay-s` token events/s, whatever R. Every stream is
checked event by event as in bench.load. Measured per R: each controller's CPU seconds (psutil, user + system)
over the token events it relayed, and the aggregate token events/s. The controllers subscribe only to their own
jobs' channels, so the CPU per event should stay flat (within 20% of R=1) and the aggregate grow with R; with a
pattern subscription every controller would receive every event and its cost per relayed event would grow with R.
Prints a table with the ratios to R=1 and writes JSON (default bench/results/scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench.load import (
    LoadRun,
    ResourceSampler,
    open_streams,
    problem_counts,
    raise_open_files_limit,
    start_scripted_replicas,
    stop_processes,
)
from bench.load_checks import ENGINE_NOTE, leftover_jobs
from cli.processes import Proc

FLAT_WITHIN = 0.20  # the CPU per event at R replicas over R=1's, within 1 +- this, counts as flat


def measure(replicas: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One run with `replicas` controllers; the row of the table."""
    from infra.embedded_redis import EmbeddedRedis
    from infra.redis import connect

    streams = replicas * args.streams_per_controller
    workers = replicas * args.workers_per_controller if args.workers_per_controller else args.workers
    max_batch = -(-streams // workers) * 2  # room to spare: no stream waits for a slot
    log_dir = workdir / f"replicas-{replicas}"
    log_dir.mkdir(parents=True)
    redis_server = EmbeddedRedis(log_dir / "redis", persist=False).start()
    redis = connect(redis_server.url)
    procs: list[Proc] = []
    try:
        procs, urls = start_scripted_replicas(
            redis_server.url, log_dir, controllers=replicas, workers=workers, max_batch=max_batch,
            max_queue=streams, step_delay_s=args.step_delay_s,
        )  # fmt: skip
        warm = open_streams(urls, replicas, 4, args.stream_timeout, first=-replicas)  # one per controller
        if warm.failures:
            raise RuntimeError(f"warm-up stream failed: {warm.failures[0].problem}")
        sampler = ResourceSampler(procs[:replicas], procs[replicas:], redis).start()
        run = open_streams(urls, streams, args.tokens, args.stream_timeout)
        sampler.stop()
        left = leftover_jobs(redis, [r.job_id for r in run.results if r.job_id])
    finally:
        stop_processes(procs)
        redis.close()
        redis_server.stop()
    return summarise(replicas, workers, run, sampler, left)


def summarise(replicas: int, workers: int, run: LoadRun, sampler: ResourceSampler, left: list[str]) -> dict:
    per_controller_events = [0] * replicas
    for result in run.results:  # round robin: stream k (from index 0) went to controller k mod R
        per_controller_events[result.index % replicas] += result.token_events
    names = ["controller"] if replicas == 1 else [f"controller-{k}" for k in range(replicas)]
    cpu = [sampler.cpu_s[name] for name in names]
    cpu_per_event_ms = [1000 * c / e if e else float("nan") for c, e in zip(cpu, per_controller_events, strict=True)]
    events = sum(per_controller_events)
    return {
        "replicas": replicas, "workers": workers, "streams": len(run.results), "failed": len(run.failures),
        "wall_s": round(run.wall_s, 2), "token_events": events, "token_events_per_s": round(events / run.wall_s, 1),
        "controller_events": per_controller_events, "controller_cpu_s": cpu,
        "controller_cpu_per_event_ms": [round(v, 4) for v in cpu_per_event_ms],
        "mean_cpu_per_event_ms": round(statistics.fmean(cpu_per_event_ms), 4),
        "workers_cpu_s": sampler.cpu_s["workers"], "client_cpu_s": sampler.cpu_s["client"],
        "redis_peak_connected_clients": sampler.peaks["redis_clients"],
        "problems": problem_counts(run), "left_in_redis": left,
    }  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """Each row's CPU per event and events/s over the first row's (the fewest replicas)."""
    base = rows[0]["mean_cpu_per_event_ms"]
    for row in rows:
        row["cpu_per_event_ratio"] = round(row["mean_cpu_per_event_ms"] / base, 3)
        row["worst_cpu_per_event_ratio"] = round(max(row["controller_cpu_per_event_ms"]) / base, 3)
        row["best_cpu_per_event_ratio"] = round(min(row["controller_cpu_per_event_ms"]) / base, 3)
        row["events_per_s_ratio"] = round(row["token_events_per_s"] / rows[0]["token_events_per_s"], 3)


def verdict(rows: list[dict]) -> dict[str, bool]:
    """Flat: every controller within 20% of R=1's CPU per event; not above: none more than 20% over it (what a
    relay that receives other replicas' events would break); and the aggregate events/s rising with R."""
    ratios = [ratio for row in rows for ratio in (row["worst_cpu_per_event_ratio"], row["best_cpu_per_event_ratio"])]
    rates = [row["token_events_per_s"] for row in rows]
    return {
        "cpu_per_event_within_20pct": all(abs(ratio - 1) <= FLAT_WITHIN for ratio in ratios),
        "cpu_per_event_at_most_20pct_above": all(ratio <= 1 + FLAT_WITHIN for ratio in ratios),
        "aggregate_events_per_s_grows": all(b > a for a, b in zip(rates, rates[1:])),  # noqa: B905 - one shorter
    }


def print_table(rows: list[dict]) -> None:
    print("| controllers | workers | streams | token events/s | × R=1 | controller CPU per event (each) | mean | × R=1 "
          "| worst × R=1 | failed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        each = ", ".join(f"{v:.3f}" for v in row["controller_cpu_per_event_ms"])
        print(f"| {row['replicas']} | {row['workers']} | {row['streams']} | {row['token_events_per_s']:,.0f} | "
              f"{row['events_per_s_ratio']:.2f} | {each} ms | {row['mean_cpu_per_event_ms']:.3f} ms | "
              f"{row['cpu_per_event_ratio']:.2f} | {row['worst_cpu_per_event_ratio']:.2f} | "
              f"{row['failed']} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4], help="controller counts, in order")
    parser.add_argument("--streams-per-controller", type=int, default=10, help="concurrent streams per controller")
    parser.add_argument("--workers", type=int, default=1, help="scripted workers, the same for every replica count")
    parser.add_argument("--workers-per-controller", type=int, default=None,
                        help="instead of --workers: this many scripted workers per controller")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=200, help="tokens per reply")
    parser.add_argument("--step-delay-s", type=float, default=0.05, help="seconds per scripted decode step")
    parser.add_argument("--stream-timeout", type=float, default=120.0, help="a stream not ended by then hangs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    args = parser.parse_args(argv)

    raise_open_files_limit(max(args.replicas) * args.streams_per_controller)  # before starting anything
    workdir = Path(tempfile.mkdtemp(prefix="llava-bench-scale-"))
    rate = args.streams_per_controller / args.step_delay_s
    print(f"{args.streams_per_controller} streams per controller x {args.tokens} tokens at {args.step_delay_s} s "
          f"a step (~{rate:.0f} token events/s per controller), engine {ENGINE_NOTE}; logs in {workdir}",
          flush=True)  # fmt: skip
    load_before = os.getloadavg()
    rows = []
    for replicas in args.replicas:
        rows.append(measure(replicas, args, workdir))
        print(f"  {replicas} controller(s): {rows[-1]['token_events_per_s']:,.0f} token events/s, "
              f"{rows[-1]['mean_cpu_per_event_ms']:.3f} ms CPU per event per controller", flush=True)  # fmt: skip
    load_after = os.getloadavg()
    add_ratios(rows)
    checks = verdict(rows)
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)\n")
    print_table(rows)
    for row in rows:
        for problem, count in row["problems"].items():
            print(f"  {row['replicas']} controller(s), {count} stream(s): {problem}")
        if row["left_in_redis"]:
            print(f"  {row['replicas']} controller(s), left in Redis: {'; '.join(row['left_in_redis'])}")
    print(", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()))
    report = {
        "engine": ENGINE_NOTE, "streams_per_controller": args.streams_per_controller,
        "workers_per_controller": args.workers_per_controller, "workers": args.workers, "tokens": args.tokens,
        "step_delay_s": args.step_delay_s, "events_per_s_per_controller_offered": rate, "cpus": os.cpu_count(),
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "rows": rows, "checks": checks,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    failed = any(row["failed"] or row["left_in_redis"] for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
