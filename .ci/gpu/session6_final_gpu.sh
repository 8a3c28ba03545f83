#!/bin/bash
# Session 6 checks in one call after the GGUF's first half was copied to /tmp (see train_full_recipe_gpu.sh): the
# full recipe's Block-AP phase on SmolLM2 (PHASE=block-ap) with its perplexity and the E2E-QP step benches.
# Layout: .gpu/traingpu/ as train_full_recipe_gpu.sh wants it, plus this script.
cd "$(dirname "$0")"
rm -rf /tmp/eqat-full /tmp/full.log
PHASE=block-ap LIMIT=400 bash ./full.sh
grep -E "block [0-9]+/|Block-AP|perplexity|phase" /tmp/full.log | tail -8
echo "== E2E-QP"
for s in llama2-7b llama2-70b; do
  st=5; [ $s = llama2-70b ] && st=2
  echo $s; timeout 150 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape $s --dtype bf16 --steps $st 2>&1 | grep -E "median|step ms"
done
echo "7B --no-offload"; timeout 100 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape llama2-7b --dtype bf16 --steps 5 --no-offload 2>&1 | grep -E "median"
