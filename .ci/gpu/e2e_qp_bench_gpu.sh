#!/bin/bash
# The E2E-QP step benches: Llama-2-7B with and without offload, Llama-2-70B (synthetic w2g64 models, 4096 tokens,
# bf16). Run from a folder holding a stripped `engine` (release, --features cuda,cli).
for s in llama2-7b llama2-70b; do
  st=5; [ $s = llama2-70b ] && st=2
  echo $s; timeout 150 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape $s --dtype bf16 --steps $st 2>&1 | grep -E "median|step ms"
done
echo "7B --no-offload"; timeout 100 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape llama2-7b --dtype bf16 --steps 5 --no-offload 2>&1 | grep -E "median"
