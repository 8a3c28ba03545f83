#!/bin/bash
# Session 7's closing measurements in one call: the bf16 Block-AP step's kernels at 7B and 70B (ncu_block_ap_gpu.sh,
# copied alongside) and the E2E-QP step benches (7B with and without offload, 70B). Copy a stripped `engine`
# (release, --features cuda,cli), ncu_block_ap_gpu.sh and e2e_qp_bench_gpu.sh next to this script and carry the folder.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
bash ./ncu_block_ap_gpu.sh
echo "== E2E-QP"
bash ./e2e_qp_bench_gpu.sh
