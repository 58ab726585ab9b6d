"""Accuracy of the demo model per question kind on held-out drawn images (other seeds and sizes than training),
answered greedily through the engine on the checkpoint as saved and reloaded.

    python -m bench.demo_model [--model-path DIR] [--per-kind N] [--seed S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workers.demo.evaluate import EVAL_KINDS, EVAL_SIZES, ask, held_out_cases, is_right, score
from workers.demo.train import demo_model_path
from workers.model import load_model

TARGETS = {"colour": 0.95, "shape": 0.95, "count": 0.85, "position": 0.85}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-path", "--model", dest="model", default=str(demo_model_path()),
        help="model directory, e.g. a candidate from train-demo-model (default: the shipped one)",
    )  # fmt: skip
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="bench/results/demo_model.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    cases = held_out_cases(args.per_kind, seed=args.seed)
    started = time.perf_counter()
    answers = ask(loaded, cases)
    seconds = time.perf_counter() - started
    results = score(cases, answers)

    print(f"{'kind':<10} {'n':>5} {'accuracy':>9} {'target':>7}")
    for kind in EVAL_KINDS:
        r, target = results[kind], TARGETS.get(kind)
        print(f"{kind:<10} {r['n']:>5} {r['accuracy']:>8.1%} {f'{target:.0%}' if target else '-':>7}")
    print(f"{len(cases)} questions in {seconds:.1f} s")
    wrong = [
        {"kind": c.kind, "question": c.turns[-1].question, "expected": c.turns[-1].answer, "got": a,
         "size": list(c.image.size)}
        for c, a in zip(cases, answers, strict=True) if not is_right(c, a)
    ]  # fmt: skip
    report = {
        "model": str(Path(args.model).resolve().name),
        "seed": args.seed,
        "per_kind": args.per_kind,
        "sizes": [list(s) for s in EVAL_SIZES],
        "seconds": round(seconds, 1),
        "results": results,
        "targets": TARGETS,
        "meets_targets": all(results[k]["accuracy"] >= t for k, t in TARGETS.items()),
        "wrong_examples": wrong[:40],
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
