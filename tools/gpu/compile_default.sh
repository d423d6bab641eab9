#!/bin/bash
# One GPU-machine call for the default engine (~500 s on an H200; run with timeout_s ~560): a cold compile first (so
# check.sh's two runs both find a warm inductor cache), check.sh bf16 with the defaults, the compiled stream's first
# and second pass over the same chunks with its profile (65,536-token budget only), then check.sh with
# --tokenizer-workers 0 (in-process tokenising) for a same-machine comparison; EXTRA_RUNS=1 adds --no-compile and
# fp32. Results in $OUT.
ROOT=$(pwd); G=$ROOT/.gpu; export OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT; W=/tmp/gw; mkdir -p $W
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
s0=$(date +%s); el() { echo "[+$(( $(date +%s) - s0 )) s]"; }
[[ -d /tmp/site/adapters ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $G/whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$ROOT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; lscpu | grep -m1 "Model name"
J=$(ls $G/data/*.jsonl); PA="python3 -m paper_assets.cli"; M="--base-model $W/m/base --adapter $W/m/adapter"
t() { date +%s.%N; }
[[ -d $W/m/adapter ]] || python3 $G/buildmodel.py $W/m $G/tok > $OUT/build.log 2>&1 || { tail -5 $OUT/build.log; exit 3; }
[[ -f $W/s16.db ]] || python3 $G/mkdb.py $W/s16.db 16 50 $J
echo "== cold compile $(el)"
a=$(t); timeout 170 $PA embed --source $W/s16.db --out $W/cold $M --device cuda --precision bf16 > $OUT/cold16.log 2>&1
echo "rc=$? 16 papers, cold inductor cache: $(python3 -c "print(round($(t)-$a,1))") s"; tail -2 $OUT/cold16.log
echo "== check.sh bf16, defaults $(el)"
PRECISIONS=bf16 bash $G/check.sh; cp $OUT/embed_bf16.log $OUT/embed_bf16_default.log
cp $OUT/embed16_bf16.log $OUT/embed16_bf16_default.log; grep -v -i warn $OUT/embed_bf16.log | tail -8
echo "== stream passes and profile, compiled bf16 $(el)"
BUDGETS="${BUDGETS:-65536}" PADS="64" NPROF=${NPROF:-24576} timeout ${PROF_S:-120} python3 $G/gpu_profile.py $W/m $J \
  > $OUT/profile.txt 2>&1
echo "rc=$?"; grep -v -i warn $OUT/profile.txt | head -40
echo "== check.sh bf16 --tokenizer-workers 0 $(el)"
PRECISIONS=bf16 EXTRA="--tokenizer-workers 0" bash $G/check.sh; cp $OUT/embed_bf16.log $OUT/embed_bf16_inproc.log
grep -v -i warn $OUT/embed_bf16.log | tail -8
if [[ -n "$EXTRA_RUNS" ]]; then
  echo "== check.sh bf16 --no-compile $(el)"
  PRECISIONS=bf16 EXTRA=--no-compile bash $G/check.sh; cp $OUT/embed_bf16.log $OUT/embed_bf16_eager.log
  echo "== fp32 compiled on the seed loop's papers $(el)"
  rm -rf $W/f32; timeout 150 $PA embed --source $W/seed.db --out $W/f32 $M --device cuda --precision fp32 > $OUT/fp32.log 2>&1
  python3 $G/compare.py $W/seed_out.db $W/f32
fi
echo "== data path on this host's cores (read+clean+write+tokenise, no model) $(el)"
[[ -f $W/s20k.db ]] || python3 $G/mkdb.py $W/s20k.db 20000 50 $J
OUT=$OUT timeout ${DATA_PATH_S:-90} python3 $G/data_path.py $W/m/base $W/s20k.db $W/dp 2>&1 | grep -v -i warn
echo "done $(el)"
