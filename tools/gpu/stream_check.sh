#!/bin/bash
# Short GPU-machine call: check.sh bf16 with the default engine (compiled on CUDA, one stream across ranges), the seed
# loop on NSEED papers only; the compile is cold in the 100k run, so also read the in-run rate of its log.
ROOT=$(pwd); G=$ROOT/.gpu; export OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT
echo "start $(date +%T)"
NSEED=${NSEED:-500} PRECISIONS=bf16 bash $G/check.sh
grep -v -i warn $OUT/embed_bf16.log
echo "done $(date +%T)"
