#!/bin/bash
# One GPU-machine call: check.sh (bf16, fp32) on the new engine, then the profile / budget x pad sweep, then bench.
ROOT=$(pwd); export OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT
PRECISIONS="bf16 fp32" bash .gpu/check.sh
export PYTHONPATH=/tmp/site:$ROOT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
echo "== profile"; BUDGETS="32768 65536 131072" timeout 150 python3 .gpu/gpu_profile.py /tmp/gw/m .gpu/data/scirepeval_sample_papers.jsonl > $OUT/profile.txt 2>&1; echo "rc=$?"
grep -v -i warn $OUT/profile.txt | head -60
echo "== bench"; timeout 150 python3 -m paper_assets.cli bench --source /tmp/gw/big.db --papers 5000 --device cuda --precision bf16 --base-model /tmp/gw/m/base --adapter /tmp/gw/m/adapter --json $OUT/bench_gpu.json > $OUT/bench.txt 2>&1; echo "rc=$?"
grep -v -i warn $OUT/bench.txt | tail -25
