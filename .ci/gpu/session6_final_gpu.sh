#!/bin/bash
# Session 6 checks in one call after the GGUF's first half was copied to /tmp (see train_full_recipe_gpu.sh): the
# full recipe's Block-AP phase on SmolLM2 (PHASE=block-ap) with its perplexity and the E2E-QP step benches.
# Layout: .gpu/traingpu/ as train_full_recipe_gpu.sh wants it, plus this script and e2e_qp_bench_gpu.sh.
cd "$(dirname "$0")"
rm -rf /tmp/eqat-full /tmp/full.log
PHASE=block-ap LIMIT=400 bash ./full.sh
grep -E "block [0-9]+/|Block-AP|perplexity|phase" /tmp/full.log | tail -8
echo "== E2E-QP"
bash ./e2e_qp_bench_gpu.sh
