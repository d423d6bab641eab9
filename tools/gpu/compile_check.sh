#!/bin/bash
G=$(cd "$(dirname "$0")" && pwd); ROOT=$(pwd); OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT; W=/tmp/gw; mkdir -p $W
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[[ -d /tmp/site/adapters ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $G/whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$ROOT
echo "installed $(date +%T)"
[[ -d $W/m/adapter ]] || python3 $G/buildmodel.py $W/m $G/tok > $OUT/build.log 2>&1 || { tail -5 $OUT/build.log; exit 3; }
echo "model built $(date +%T)"
python3 $G/compile_probe.py $W/m $G/data/scirepeval_sample_papers.jsonl 2>&1 | grep -v -i warn | tee $OUT/compile.txt
