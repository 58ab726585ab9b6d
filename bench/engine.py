"""Continuous batching through the controller: the batching worker against the same worker one job at a time.

    python -m bench.engine [--shape tiny|small|7b | --model-path DIR] [--streams 1 4 16 32] [--max-new-tokens 32]
    python -m bench.engine --gpu-suite [--shape 7b]      # in-process eager/compiled batch 1/8/32 (bench.gpu_suite)

Real processes (embedded Redis, `llava-serve controller`, `llava-serve worker --max-batch K`), one worker at a time,
same model, same requests, same run. At each concurrency N, N closed-loop clients stream greedy requests through
`POST /api/v1/generate` (EOS is not ignored by the worker; random weights rarely hit it and `completion_tokens`
counts what was generated). Client-side measures from SSE arrival times: aggregate tokens/s (all completion tokens
over the level's wall time), TTFT (request sent to first `token` event) and inter-token latency (gap between
consecutive `token` events of one stream; the worker publishes one per decode step). Prints a table with the
batching/one-at-a-time ratios and writes JSON (default bench/results/engine.json).
--worker-threads N sets the workers' OMP_NUM_THREADS: on a CPU shared with the controller, the clients or another
job, torch's default (one thread per core) makes every op wait at a barrier for a preempted thread (measured
here: a batch-32 decode step of the small shape took 1.1 s with 2 threads on 2 busy cores, 45 ms with 1).
Targets: CPU, 16 streams >= 5x one at a time. GPU (7b, bf16): 1 stream >= 120 tok/s, 32 streams >= 1,500 tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import closed_loop_sse, generate_request, percentile, served_system, stop_system, stream_once
from bench.models import SHAPES, build_model_dir


@dataclass
class Level:
    worker: str  # "batch K" or "one at a time"
    max_batch: int
    streams: int
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def run_level(url: str, model: str, worker: str, max_batch: int, streams: int, requests: int, new_tokens: int) -> Level:
    """`streams` clients, each streaming requests back to back until `requests` have been sent in all."""
    run = closed_loop_sse(url, model, streams, requests, new_tokens)
    ttfts, gaps, tokens, wall = run.ttfts, run.gaps, run.completion_tokens, run.wall_s
    return Level(
        worker=worker,
        max_batch=max_batch,
        streams=streams,
        requests=requests,
        completion_tokens=tokens,
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 1),
        ttft_p50_ms=round(percentile(ttfts, 50) * 1000, 1),
        ttft_p99_ms=round(percentile(ttfts, 99) * 1000, 1),
        itl_p50_ms=round(percentile(gaps, 50) * 1000, 2),
        itl_p99_ms=round(percentile(gaps, 99) * 1000, 2),
    )


def run_worker(model_path: str, max_batch: int, args: argparse.Namespace, workdir: Path, label: str) -> list[Level]:
    """Start Redis + controller + one worker with `--max-batch max_batch`, run every level, stop them all."""
    worker_args = ["--device", args.device, "--dtype", args.dtype, *args.worker_arg]
    redis, procs, url = served_system(model_path, max_batch, workdir, *worker_args, timeout_s=args.start_timeout,
                                      threads=args.worker_threads)  # fmt: skip
    model = Path(model_path).name
    levels = []
    try:
        stream_once(url, generate_request(model, -1, args.max_new_tokens))  # warm-up
        for streams in args.streams:
            requests = max(streams * args.requests_per_stream, args.min_requests)
            level = run_level(url, model, label, max_batch, streams, requests, args.max_new_tokens)
            print(f"  {label:>14} {streams:>3} streams: {level.tokens_per_s:>8} tok/s, "
                  f"TTFT p50 {level.ttft_p50_ms} ms, ITL p50 {level.itl_p50_ms} ms ({level.wall_s} s)",
                  flush=True)  # fmt: skip
            levels.append(level)
    finally:
        stop_system(redis, procs)
    return levels


def compare(batched: list[Level], single: list[Level]) -> list[dict]:
    rows = []
    for b, s in zip(batched, single, strict=True):
        rows.append({
            "streams": b.streams,
            "batch_tokens_per_s": b.tokens_per_s, "single_tokens_per_s": s.tokens_per_s,
            "tokens_per_s_ratio": round(b.tokens_per_s / s.tokens_per_s, 2) if s.tokens_per_s else None,
            "batch_ttft_p50_ms": b.ttft_p50_ms, "batch_ttft_p99_ms": b.ttft_p99_ms,
            "single_ttft_p50_ms": s.ttft_p50_ms, "single_ttft_p99_ms": s.ttft_p99_ms,
            "batch_itl_p50_ms": b.itl_p50_ms, "batch_itl_p99_ms": b.itl_p99_ms,
            "single_itl_p50_ms": s.itl_p50_ms, "single_itl_p99_ms": s.itl_p99_ms,
        })  # fmt: skip
    return rows


def print_table(rows: list[dict], max_batch: int) -> None:
    header = ["streams", f"batch {max_batch} tok/s", "batch 1 tok/s", "ratio", "TTFT p50/p99 (b)", "TTFT p50/p99 (1)",
              "ITL p50/p99 (b)", "ITL p50/p99 (1)"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['streams']} | {r['batch_tokens_per_s']} | {r['single_tokens_per_s']} | "
              f"{r['tokens_per_s_ratio']}x | {r['batch_ttft_p50_ms']} / {r['batch_ttft_p99_ms']} ms | "
              f"{r['single_ttft_p50_ms']} / {r['single_ttft_p99_ms']} ms | "
              f"{r['batch_itl_p50_ms']} / {r['batch_itl_p99_ms']} ms | "
              f"{r['single_itl_p50_ms']} / {r['single_itl_p99_ms']} ms |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu-suite" in argv:
        from bench.gpu_suite import main as gpu_main

        return gpu_main([a for a in argv if a != "--gpu-suite"])
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="a model directory (default: build --shape in a temp dir)")
    parser.add_argument("--shape", choices=SHAPES, default="small", help="random-weight model to build")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32, help="the batching worker's --max-batch")
    parser.add_argument("--worker-threads", type=int, help="OMP_NUM_THREADS for both workers (default: torch's)")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra flag for both workers (repeat)")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    parser.add_argument("--workdir", type=Path, help="where to build the model and keep logs (default: temp)")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llava-bench-engine-"))
    model_path = args.model_path
    if not model_path:
        import torch

        from workers.model import resolve_device, resolve_dtype

        device = resolve_device(args.device)
        model_path = str(build_model_dir(args.shape, workdir / f"{args.shape}-llava", device,
                                         resolve_dtype(args.dtype, device)))  # fmt: skip
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"model {model_path}; streams {args.streams}; {args.max_new_tokens} new tokens; "
          f"worker threads {args.worker_threads or 'default'}; logs in {workdir}")  # fmt: skip
    batched = run_worker(model_path, args.max_batch, args, workdir, f"batch {args.max_batch}")
    single = run_worker(model_path, 1, args, workdir, "one at a time")
    rows = compare(batched, single)
    print(f"\nmodel {model_path} ({args.shape if not args.model_path else 'given'}), device {args.device}, "
          f"dtype {args.dtype}, {args.max_new_tokens} new tokens, greedy, client-side over SSE\n")  # fmt: skip
    print_table(rows, args.max_batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model_path, "shape": None if args.model_path else args.shape, "device": args.device,
        "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "max_batch": args.max_batch,
        "worker_threads": args.worker_threads, "load_average_at_end": list(os.getloadavg()),
        "rows": rows, "levels": [asdict(x) for x in (*batched, *single)],
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
