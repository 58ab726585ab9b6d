"""What the distributed path costs: the bare engine in-process against the same model through the controller's SSE.

    python -m bench.pipeline [--shape tiny|small | --model-path DIR] [--streams 1 8] [--max-new-tokens 32]

Both sides run the same greedy requests (same prompts, same images, same lengths) in one run, closed loop at each
concurrency: tokens/s is all completion tokens over the wall time, TTFT is from submitting a request to its first
token (in-process: the first step that yields text; SSE: the first `token` event the client reads). Prints a table
and writes JSON (default bench/results/pipeline.json). Targets: SSE keeps >= 0.95 of the bare engine's tokens/s
and adds <= 3 ms to TTFT p50.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from bench.common import (
    closed_loop_sse,
    generate_request,
    percentile,
    png_bytes,
    question,
    served_system,
    stop_system,
    stream_once,
)
from bench.models import SHAPES, build_model_dir
from contract.messages import JobImage, JobMessage, JobText, SamplingParams


@dataclass
class Result:
    path: str
    streams: int
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float


def summarise(path: str, streams: int, ttfts: list[float], tokens: int, wall: float) -> Result:
    return Result(
        path=path,
        streams=streams,
        requests=len(ttfts),
        completion_tokens=tokens,
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 1),
        ttft_p50_ms=round(percentile(ttfts, 50) * 1000, 2),
        ttft_p99_ms=round(percentile(ttfts, 99) * 1000, 2),
    )


def run_engine(model_path: str, streams: int, requests: int, max_new_tokens: int, max_batch: int) -> Result:
    """Closed loop: `streams` jobs in flight at all times, in-process, no Redis."""
    from workers.engine import EngineImage, EngineJob, TransformersEngine
    from workers.model import load_model

    engine = TransformersEngine(load_model(model_path, device="auto"), max_batch=max_batch)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)

    def job(i: int) -> EngineJob:
        raw = png_bytes(i)
        digest = f"bench-{i}"
        messages = [JobMessage(role="user", content=[JobImage(digest=digest), JobText(text=question(i))])]
        image = Image.open(io.BytesIO(raw)).convert("RGB")
        return EngineJob(job_id=f"job-{i}", params=params, messages=messages, images=[EngineImage(digest, image)])

    _drain(engine, [engine.prepare(job(-1))])  # warm-up, as the served path is warm too

    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    tokens = 0
    next_i = 0
    start = time.perf_counter()
    while next_i < requests or engine.has_work():
        while next_i < requests and engine.active_count < streams:
            arrived = time.perf_counter()  # before preparing: the served path's TTFT includes it too
            prepared = engine.prepare(job(next_i))
            submitted[prepared.job_id] = arrived
            engine.add(prepared)
            next_i += 1
        for update in engine.step():
            if update.job_id not in first and (update.text or update.finish_reason):
                first[update.job_id] = time.perf_counter()
            if update.finish_reason is not None:
                tokens += update.usage.completion_tokens
    wall = time.perf_counter() - start
    ttfts = [first[j] - submitted[j] for j in submitted]
    return summarise("engine in-process", streams, ttfts, tokens, wall)


def _drain(engine, prepared: list) -> None:
    for p in prepared:
        engine.add(p)
    while engine.has_work():
        engine.step()


def run_sse(url: str, model: str, streams: int, requests: int, max_new_tokens: int) -> Result:
    """Closed loop: `streams` clients, each streaming its share of the requests through the controller."""
    stream_once(url, generate_request(model, -1, max_new_tokens))  # warm-up
    run = closed_loop_sse(url, model, streams, requests, max_new_tokens)
    return summarise("controller SSE", streams, run.ttfts, run.completion_tokens, run.wall_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="a model directory (default: build --shape in a temp dir)")
    parser.add_argument("--shape", choices=SHAPES, default="small",
                        help="random-weight model to build: tiny (a ~1 ms decode step on a CPU, where the relay's "
                        "per-token cost dominates), small (default; ~10 ms, nearer a real step)")  # fmt: skip
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the in-process engine and of the worker alike (default 1: the "
                        "served worker shares the CPU with the controller and the clients)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline.json"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="llava-bench-"))
    model_path = args.model_path or str(build_model_dir(args.shape, workdir / f"{args.shape}-llava"))

    results: list[Result] = []
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for streams in args.streams:
        results.append(run_engine(model_path, streams, args.requests, args.max_new_tokens, args.max_batch))
    redis, procs, url = served_system(model_path, args.max_batch, workdir, threads=args.threads)
    try:
        for streams in args.streams:
            results.append(run_sse(url, Path(model_path).name, streams, args.requests, args.max_new_tokens))
    finally:
        stop_system(redis, procs)

    rows = []
    for streams in args.streams:
        bare = next(r for r in results if r.streams == streams and r.path.startswith("engine"))
        sse = next(r for r in results if r.streams == streams and r.path.startswith("controller"))
        rows.append({
            "streams": streams,
            "engine_tokens_per_s": bare.tokens_per_s, "sse_tokens_per_s": sse.tokens_per_s,
            "tokens_per_s_ratio": round(sse.tokens_per_s / bare.tokens_per_s, 3),
            "engine_ttft_p50_ms": bare.ttft_p50_ms, "sse_ttft_p50_ms": sse.ttft_p50_ms,
            "ttft_p50_added_ms": round(sse.ttft_p50_ms - bare.ttft_p50_ms, 2),
            "engine_ttft_p99_ms": bare.ttft_p99_ms, "sse_ttft_p99_ms": sse.ttft_p99_ms,
        })  # fmt: skip
    header = ["streams", "engine tok/s", "SSE tok/s", "ratio", "engine TTFT p50", "SSE TTFT p50", "added p50",
              "engine TTFT p99", "SSE TTFT p99"]  # fmt: skip
    print(f"\nmodel {model_path}, {args.requests} requests per level, {args.max_new_tokens} new tokens, greedy, "
          f"{args.threads} torch thread(s) each side, load average {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(f"{r['streams']} | {r['engine_tokens_per_s']} | {r['sse_tokens_per_s']} | {r['tokens_per_s_ratio']} | "
              f"{r['engine_ttft_p50_ms']} ms | {r['sse_ttft_p50_ms']} ms | {r['ttft_p50_added_ms']} ms | "
              f"{r['engine_ttft_p99_ms']} ms | {r['sse_ttft_p99_ms']} ms")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"model": model_path, "threads": args.threads, "rows": rows, "runs": [asdict(r) for r in results]}, indent=2
        )
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
