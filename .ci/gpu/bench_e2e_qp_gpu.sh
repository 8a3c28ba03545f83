#!/bin/bash
# One device call (copy `engine` and the `cuda_e2e` test binary next to this script, carry the folder): the E2E-QP
# GPU-vs-CPU test, then `engine bench e2e-qp` on SmolLM2-135M and Llama-2-7B shapes, f32 and bf16 GEMMs.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== cuda_e2e"
timeout 120 ./cuda_e2e --nocapture 2>&1 | tee $OUT/cuda_e2e.log | tail -8
B="./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096"
for args in "--shape smollm2-135m --dtype f32" "--shape smollm2-135m --dtype bf16" \
  "--shape llama2-7b --dtype bf16 --steps 3" "--shape llama2-7b --dtype f32 --steps 2"; do
  echo "== $B $args"
  timeout 150 $B $args 2>&1 | tee -a $OUT/bench.log
done
