#!/usr/bin/env bash
# One prepared H100 run (< 5 minutes): 7B-shaped LLaVA, random bf16 weights built on the GPU, in-process engine,
# eager then compiled (CUDA graphs alone, then inductor) at batch 1 / 8 / 32. Prints a table, writes
# bench/results/gpu_suite.json. Fails fast without CUDA. On a GPU machine that cannot install packages, run
# bench/gpu_wheels.sh beforehand where pip works and bring .whl/ along: it is installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -d .whl ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec timeout 290 "$python" -m bench.engine --gpu-suite --shape 7b --new-tokens 64 --max-seconds 240 "$@"
