#!/bin/bash
# Session 8's closing measurements in one call: session 7's final build (engine_s7) against this session's
# (engine_s8 = engine), interleaved, REPS rounds of every Block-AP shape (ab_gpu.sh), then the final build's
# kernels at 7B and 70B (ncu_block_ap_gpu.sh) and its E2E-QP step benches (e2e_qp_bench_gpu.sh). Copy the two
# stripped engines (release, --features cuda,cli) and those three scripts next to this one and carry the folder.
cd "$(dirname "$0")"
ENGINES="engine_s7 engine_s8" SHAPES="smollm2-135m llama2-7b llama3-8b llama2-70b" REPS=${REPS:-3} bash ./ab_gpu.sh
bash ./ncu_block_ap_gpu.sh
echo "== E2E-QP"
bash ./e2e_qp_bench_gpu.sh
