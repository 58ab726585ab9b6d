#!/usr/bin/env bash
# Run on a machine with package access, before bench/gpu.sh goes to a GPU machine that cannot install packages:
# downloads, into .whl/, the wheels the suite needs beyond PyTorch and transformers (which such images hold), for
# CPython 3.12 on x86_64 Linux. bench/gpu.sh installs .whl/ into /tmp/site when it is there. Versions follow this
# checkout's environment (.venv), so the GPU run imports the same pydantic as the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  packages+=("$name==$(version "$name")")
done
rm -rf .whl
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
ls .whl
