"""One prepared GPU run: a LLaVA-1.5-7B-shaped model (random bf16 weights, built on the GPU) through the engine
in-process, eager and compiled (CUDA graphs alone, then inductor), at batch 1, 8 and 32. No Redis, no downloads.

    python -m bench.engine --gpu-suite [--shape 7b] [--new-tokens 64] [--batches 1 8 32] [--no-compile]
    bench/gpu.sh

Each run is bounded: `batch` jobs of one image + a short question (the reference's 40 + 576 token prompt), all admitted
at once, `--new-tokens` each, EOS ignored; tokens/s = completion tokens over the run's wall time (prefill included),
decode tok/s = the decode steps' tokens over their time, TTFT = time to the first token (the batch's prefill). Each mode
is one engine with --batches' largest as its slot count, as one worker would run; the compiled one is warmed up first
(its time is reported) and its greedy tokens are compared with the eager engine's. The whole suite stays within
--max-seconds by construction: it checks the projected time before each run and skips what would not fit. Targets
(H100): batch 1 >= 120 tok/s, batch 32 >= 1,500. --allow-cpu runs the same logic on the CPU (for a dry run with
--shape small); otherwise no CUDA fails at once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def run_once(engine, jobs, new_tokens: int) -> dict:
    from workers.completion import run_to_completion

    sync = torch.cuda.synchronize if engine.device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for job in jobs:
        engine.add(engine.prepare(job))
    first_step = engine.step()  # prefill of every job (each sampled its first token)
    sync()
    ttft = time.perf_counter() - start
    decode_start = time.perf_counter()
    results = run_to_completion(engine, [])
    sync()
    decode = time.perf_counter() - decode_start
    decoded = len(jobs) * (new_tokens - 1)
    failed = [u for u in first_step if u.error is not None] + [r for r in results.values() if r.error is not None]
    if failed:
        raise RuntimeError(f"a job failed: {failed[0]}")
    tokens = {u.job_id: list(u.token_ids) for u in first_step}
    for job_id, result in results.items():
        tokens[job_id] = tokens.get(job_id, []) + result.token_ids
    return {
        "ttft_ms": round(ttft * 1000, 1),
        "decode_s": round(decode, 3),
        "tokens_per_s": round(len(jobs) * new_tokens / (ttft + decode), 1),
        "decode_tokens_per_s": round(decoded / decode, 1) if decode > 0 else None,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine --gpu-suite", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["small", "7b"], default="7b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true", help="eager runs only")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["cudagraphs", "inductor", "aot_eager", "eager"],
        help="compile backends to run after the eager engine (default: cudagraphs then inductor on CUDA, "
        "inductor on the CPU); each is one engine with --compile",
    )
    parser.add_argument("--max-seconds", type=float, default=270, help="stop starting runs past this budget")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU (use --shape small)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_suite.json"))
    args = parser.parse_args(argv)
    suite_start = time.perf_counter()
    if torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    elif args.allow_cpu:
        device, dtype = "cpu", torch.float32
    else:
        print("bench gpu suite: CUDA is not available (torch.cuda.is_available() is False); nothing was run")
        return 2

    from bench.engine_inprocess import make_jobs
    from bench.models import build_loaded
    from workers.engine import TransformersEngine

    started = time.perf_counter()
    loaded = build_loaded(args.shape, device, dtype, Path(tempfile.mkdtemp(prefix="llava-gpu-suite-")))
    loaded.eos_token_ids = set()  # fixed-length generations, as in the reference figures
    build_s = time.perf_counter() - started
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"built {args.shape} on {name} ({dtype}) in {build_s:.1f} s", flush=True)

    backends = args.backends or (["cudagraphs", "inductor"] if device == "cuda" else ["inductor"])
    modes = ["eager"] + ([] if args.no_compile else [f"compiled {b}" for b in backends])
    rows: list[dict] = []
    eager_tokens: dict[int, dict[str, list[int]]] = {}
    largest = max(args.batches)
    for mode in modes:
        compiled = mode != "eager"
        # One engine per mode, as one worker: every batch size runs through the same slots and compiled step.
        torch._dynamo.reset()
        engine = TransformersEngine(
            loaded, max_batch=largest, token_budget=largest * 1024, prefill_tokens=largest * 1024, compile=compiled,
            compile_backend=mode.split()[-1] if compiled else "inductor",
        )  # fmt: skip  # the whole batch prefills in the first step
        warmup_s = None
        if compiled:
            started = time.perf_counter()
            shapes = engine.warmup()
            warmup_s = round(time.perf_counter() - started, 1)
            print(f"{mode}: step warmed up for {len(shapes)} shapes in {warmup_s} s", flush=True)
        for batch in args.batches:
            elapsed = time.perf_counter() - suite_start
            # A run costs a warm-up pass and a measured pass; project from the last one.
            projected = rows[-1]["wall_s"] * 1.2 if rows else 0
            if elapsed + projected > args.max_seconds:
                print(f"skip {mode} batch {batch}: {elapsed:.0f} s used, {projected:.0f} s projected, "
                      f"budget {args.max_seconds:.0f} s", flush=True)  # fmt: skip
                continue
            run_start = time.perf_counter()
            jobs = make_jobs(batch, args.new_tokens)
            warm = make_jobs(batch, args.new_tokens)
            for job in warm:
                job.job_id = "warm-" + job.job_id
            run_once(engine, warm, args.new_tokens)  # new column buckets, allocator warm-up, same shapes
            row = {"mode": mode, "batch": batch, **run_once(engine, jobs, args.new_tokens), "warmup_s": warmup_s}
            row["wall_s"] = round(time.perf_counter() - run_start, 1)
            tokens = row.pop("tokens")
            if compiled and batch in eager_tokens:  # greedy: the compiled step should pick the eager step's tokens
                same = sum(tokens[j] == eager_tokens[batch][j] for j in tokens)
                row["same_tokens_as_eager"] = f"{same}/{len(tokens)} jobs"
            elif not compiled:
                eager_tokens[batch] = tokens
            rows.append(row)
            print(f"{mode:>20} batch {batch:>2}: {row['tokens_per_s']:>8} tok/s "
                  f"(decode {row['decode_tokens_per_s']} tok/s), TTFT {row['ttft_ms']} ms, {row['wall_s']} s",
                  flush=True)  # fmt: skip
            write_report(args, name, dtype, build_s, suite_start, rows)  # after every run: a timeout keeps them
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{args.shape} model, {name}, {dtype}, {args.new_tokens} new tokens per job, EOS ignored\n")
    print("| mode | batch | tok/s (aggregate) | decode tok/s | TTFT (prefill of the batch) | vs eager "
          "| greedy tokens as eager | warm-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    eager = {r["batch"]: r for r in rows if r["mode"] == "eager"}
    for r in rows:
        base = eager.get(r["batch"]) if r["mode"] != "eager" else None
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        same = r.get("same_tokens_as_eager", "")
        warm = f"{r['warmup_s']} s" if r["warmup_s"] is not None else ""
        print(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']} | {r['decode_tokens_per_s']} | {r['ttft_ms']} ms "
              f"| {ratio} | {same} | {warm} |")  # fmt: skip
    total = write_report(args, name, dtype, build_s, suite_start, rows)
    print(f"\ntotal {total:.0f} s; wrote {args.out}")
    return 0


def write_report(args, name: str, dtype, build_s: float, suite_start: float, rows: list[dict]) -> float:
    total = time.perf_counter() - suite_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"shape": args.shape, "device": name, "dtype": str(dtype), "new_tokens": args.new_tokens,
              "build_s": round(build_s, 1), "total_s": round(total, 1), "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    return total


if __name__ == "__main__":
    raise SystemExit(main())
