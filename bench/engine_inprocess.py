"""In-process engine throughput: N image+text jobs through the batching engine vs one at a time (no Redis).

    python -m bench.engine_inprocess [--model DIR] [--jobs 16] [--max-batch 8] [--new-tokens 64]
    python -m bench.engine_inprocess --families [--jobs 8] [--max-batch 8] [--new-tokens 32]

Without --model it builds the tiny random-weight LLaVA in a temp dir (a smoke run, not a measurement). EOS is
ignored so every job generates exactly --new-tokens tokens. Prints one JSON line per configuration.
--families runs the same comparison for every served family's tiny checkpoint (`workers/tiny_families.py`: the
family's own config, model and processor classes, random weights), one image per job, and prints a table with the
batch / one-at-a-time ratio per family (writes JSON with --out). Tiny models show the engine's batching mechanics per
family (the image inputs, the position scheme, eager or compiled), not a real model's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from contract.messages import JobImage, JobMessage, JobText, SamplingParams
from workers.completion import run_to_completion
from workers.engine import EngineImage, EngineJob, TransformersEngine
from workers.model import LoadedModel, load_model
from workers.tiny_model import ensure_tiny_model


def make_jobs(n: int, new_tokens: int, size: tuple[int, int] = (336, 336)) -> list[EngineJob]:
    jobs = []
    for i in range(n):
        image = EngineImage(f"bench-{i}", Image.new("RGB", size, (i * 37 % 256, 90, 160)))
        content = [JobImage(digest=image.digest), JobText(text=f"Describe picture number {i} in detail.")]
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
        jobs.append(EngineJob(f"job-{i}", params, [JobMessage(role="user", content=content)], images=[image]))
    return jobs


def measure(engine: TransformersEngine, jobs: list[EngineJob]) -> dict[str, float]:
    start = time.perf_counter()
    results = run_to_completion(engine, jobs)
    seconds = time.perf_counter() - start
    tokens = sum(r.usage.completion_tokens for r in results.values())
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def compare(loaded: LoadedModel, jobs: list[EngineJob], max_batch: int) -> dict[str, Any]:
    """One at a time, then batched up to `max_batch`, same jobs, same engine settings otherwise."""
    loaded.eos_token_ids = set()  # fixed-length generations
    run_to_completion(TransformersEngine(loaded, max_batch=max_batch), jobs[:2])  # warm-up
    single = measure(TransformersEngine(loaded, max_batch=1), jobs)
    batched = measure(TransformersEngine(loaded, max_batch=max_batch), jobs)
    ratio = round(batched["tokens_per_s"] / single["tokens_per_s"], 2)
    return {"model": loaded.name, "one_at_a_time": single, "batched": batched, "ratio": ratio}


def families(args: argparse.Namespace) -> int:
    """One row per served family: its tiny checkpoint, `--jobs` jobs batched against one at a time."""
    from workers.families import FAMILIES
    from workers.tiny_families import BUILDERS, model_type

    rows = []
    print(f"| family | compiled decode exact | one at a time tok/s | batch {args.max_batch} tok/s | ratio |")
    print("|---|---|---|---|---|")
    for name in BUILDERS:
        loaded = BUILDERS[name]()
        row = {"family": name, "compiled": FAMILIES[model_type(name)].compiled}
        row.update(compare(loaded, make_jobs(args.jobs, args.new_tokens, (60, 40)), args.max_batch))
        rows.append(row)
        decode = "yes" if row["compiled"] else "no (eager)"
        print(f"| {name} | {decode} | {row['one_at_a_time']['tokens_per_s']} | {row['batched']['tokens_per_s']} | "
              f"{row['ratio']}x |", flush=True)  # fmt: skip
    report = {"jobs": args.jobs, "max_batch": args.max_batch, "new_tokens": args.new_tokens,
              "load_average_at_end": list(os.getloadavg()), "rows": rows}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the tiny model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--families", action="store_true", help="one row per served family's tiny checkpoint")
    parser.add_argument("--out", type=Path, help="with --families: write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.families:
        return families(args)
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        model = args.model or str(ensure_tiny_model(Path(tmp)))
        loaded = load_model(model, device=args.device, dtype=args.dtype)
    loaded.eos_token_ids = set()  # fixed-length generations, as in the reference figures
    jobs = make_jobs(args.jobs, args.new_tokens)
    run_to_completion(TransformersEngine(loaded, max_batch=args.max_batch), jobs[:2])  # warm-up
    for max_batch in (1, args.max_batch):
        row = {"model": loaded.name, "device": loaded.device, "dtype": str(loaded.dtype), "max_batch": max_batch}
        row.update(measure(TransformersEngine(loaded, max_batch=max_batch), jobs))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
