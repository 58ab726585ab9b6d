#!/usr/bin/env bash
# One prepared H100 run (< 5 minutes): 7B-shaped LLaVA, random bf16 weights built on the GPU, in-process engine,
# eager and compiled at batch 1 / 8 / 32. Prints a table, writes bench/results/gpu_suite.json. Fails fast without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 290 python -m bench.engine --gpu-suite --shape 7b --new-tokens 64 --max-seconds 240 "$@"
