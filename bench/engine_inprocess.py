"""In-process engine throughput: N image+text jobs through the batching engine vs one at a time (no Redis).

    python -m bench.engine_inprocess [--model DIR] [--jobs 16] [--max-batch 8] [--new-tokens 64]

Without --model it builds the tiny random-weight LLaVA in a temp dir (a smoke run, not a measurement). EOS is
ignored so every job generates exactly --new-tokens tokens. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PIL import Image

from contract.messages import JobImage, JobMessage, JobText, SamplingParams
from workers.engine import EngineImage, EngineJob, TransformersEngine, run_to_completion
from workers.model import load_model
from workers.tiny_model import ensure_tiny_model


def make_jobs(n: int, new_tokens: int) -> list[EngineJob]:
    jobs = []
    for i in range(n):
        image = EngineImage(f"bench-{i}", Image.new("RGB", (336, 336), (i * 37 % 256, 90, 160)))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the tiny model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
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
