#!/bin/bash
# Session 7's closing measurements in one call: the bf16 Block-AP step's kernels at 7B and 70B (ncu_block_ap_gpu.sh,
# copied alongside) and the E2E-QP step benches (7B with and without offload, 70B). Copy a stripped `engine`
# (release, --features cuda,cli) and ncu_block_ap_gpu.sh next to this script and carry the folder.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
bash ./ncu_block_ap_gpu.sh
echo "== E2E-QP"
for s in llama2-7b llama2-70b; do
  st=5; [ $s = llama2-70b ] && st=2
  echo $s; timeout 150 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape $s --dtype bf16 --steps $st 2>&1 | grep -E "median|step ms"
done
echo "7B --no-offload"; timeout 100 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape llama2-7b --dtype bf16 --steps 5 --no-offload 2>&1 | grep -E "median"
