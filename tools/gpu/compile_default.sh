#!/bin/bash
# One lent-GPU call for the compile-by-default engine: cold vs cached compile cost, check.sh (bf16) with the
# default (compiled on CUDA) and with --no-compile in the same lease, fp32 fidelity on the seed loop's 5k papers,
# then the compiled stream's profile and a budget sweep. Results and logs in $OUT.
ROOT=$(pwd); G=$ROOT/.gpu; export OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT; W=/tmp/gw; mkdir -p $W
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[[ -d /tmp/site/adapters ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $G/whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$ROOT
J=$(ls $G/data/*.jsonl); PA="python3 -m paper_assets.cli"; M="--base-model $W/m/base --adapter $W/m/adapter"
t() { date +%s.%N; }
[[ -d $W/m/adapter ]] || python3 $G/buildmodel.py $W/m $G/tok > $OUT/build.log 2>&1 || { tail -5 $OUT/build.log; exit 3; }
[[ -f $W/s16.db ]] || python3 $G/mkdb.py $W/s16.db 16 50 $J
echo "== cold compile ($(date +%T))"
a=$(t); timeout 170 $PA embed --source $W/s16.db --out $W/cold $M --device cuda --precision bf16 > $OUT/cold16.log 2>&1
echo "rc=$? 16 papers, cold inductor cache: $(python3 -c "print(round($(t)-$a,1))") s"; tail -2 $OUT/cold16.log
echo "== check.sh bf16, default (compiled) ($(date +%T))"
PRECISIONS=bf16 bash $G/check.sh; cp $OUT/embed_bf16.log $OUT/embed_bf16_compiled.log; cat $OUT/embed_bf16.log | grep -v -i warn
echo "== check.sh bf16 --no-compile ($(date +%T))"
PRECISIONS=bf16 EXTRA=--no-compile bash $G/check.sh; cp $OUT/embed_bf16.log $OUT/embed_bf16_eager.log
grep -v -i warn $OUT/embed_bf16.log
echo "== fp32 compiled on the seed loop's papers ($(date +%T))"
rm -rf $W/f32; a=$(t)
timeout 150 $PA embed --source $W/seed.db --out $W/f32 $M --device cuda --precision fp32 > $OUT/fp32.log 2>&1
echo "rc=$? $(python3 -c "print(round($(t)-$a,1))") s"; grep -v -i warn $OUT/fp32.log | tail -3
python3 $G/compare.py $W/seed_out.db $W/f32
echo "== profile, compiled bf16 ($(date +%T))"
BUDGETS="65536 131072" PADS="64" timeout 150 python3 $G/gpu_profile.py $W/m $J > $OUT/profile.txt 2>&1
echo "rc=$?"; grep -v -i warn $OUT/profile.txt | head -50
echo "done $(date +%T)"
