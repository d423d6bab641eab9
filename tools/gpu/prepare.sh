#!/bin/bash
# Prepare .gpu/ for a GPU machine, from the project root on a machine with PyPI access (../shared/gpu/README.md's
# steps, then this folder's probes beside check.sh). Afterwards: one device run with carry [".gpu"] and
# command `bash .gpu/compile_default.sh 2>&1` (timeout ~560 s), then give_back.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
SHARED=${SHARED:-../shared}
[ -f "$SHARED/gpu/check.sh" ] || { echo "no $SHARED/gpu/check.sh: set SHARED to the shared folder" >&2; exit 2; }
rm -rf .gpu
cp -r "$SHARED/gpu" .gpu
mkdir -p .gpu/data
cp "$SHARED/data/scirepeval_sample_papers.jsonl" .gpu/data/
EXCLUDE=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo /.gpu/ >> "$EXCLUDE"
PYTHON=${PYTHON:-python3}
# The GPU machine gets the versions the project's own venv runs and its tests passed with (not a copy of a list
# kept elsewhere): torch, pyarrow and pandas are already there, these travel as wheels.
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}
[ -x "$VENV_PYTHON" ] || { echo "no $VENV_PYTHON: run \`make setup\` first (or set VENV_PYTHON)" >&2; exit 2; }
PINS=$("$VENV_PYTHON" -c 'from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("adapters", "transformers", "huggingface_hub", "tokenizers", "duckdb")))')
echo "wheels for the GPU machine: $PINS"
for p in $PINS; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl "$p"
done
find tools/gpu -maxdepth 1 \( -name '*.sh' -o -name '*.py' \) ! -name prepare.sh -exec cp {} .gpu/ \;
du -sh .gpu
ls .gpu .gpu/whl
