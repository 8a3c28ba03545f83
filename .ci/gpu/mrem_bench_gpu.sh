#!/bin/bash
# MREM-parallel Block-AP against the sequential order on synthetic models (`engine bench mrem`), one GPU: K = 1
# and K = 2 modules (--gpus 0,0: two contexts on GPU 0, sharing it) at the SmolLM2 and the Llama-2-7B block shapes;
# on a multi-GPU machine set GPUS (e.g. GPUS="0,1 0,1,2,3") for the scaling rows. Then the cuda_mrem tests. Copy
# a stripped `engine` (release, --features cuda,cli) and the cuda_mrem test binary next to this script and carry
# the folder. Logs under $OUT.
cd "$(dirname "$0")"
export NCCL_NVLS_ENABLE=0
timeout 120 ./cuda_mrem --test-threads=1 > $OUT/cuda_mrem.log 2>&1; echo "cuda_mrem rc $? $(grep 'test result' $OUT/cuda_mrem.log)"
grep -E "FAIL|panicked|first step losses" $OUT/cuda_mrem.log | head -5
run() { echo "== $*"; timeout 300 ./engine bench mrem "$@" 2>&1 | tail -4; }
run --shape smollm2-135m --layers 30 --samples 64 --seqlen 1024 --modules 1
run --shape smollm2-135m --layers 30 --samples 64 --seqlen 1024 --gpus 0,0 --no-sequential
run --shape llama2-7b --layers 8 --samples 32 --seqlen 2048 --modules 1
run --shape llama2-7b --layers 8 --samples 32 --seqlen 2048 --gpus 0,0 --no-sequential
for g in ${GPUS:-}; do
  run --shape smollm2-135m --layers 30 --samples 64 --seqlen 1024 --gpus $g --no-sequential
  run --shape llama2-7b --layers 8 --samples 32 --seqlen 2048 --gpus $g --no-sequential
done
