#!/bin/bash
# Session 5, last checks in one call after the GGUF's first half was copied to /tmp (see
# train_full_recipe_gpu.sh): the full recipe's Block-AP phase on SmolLM2 (PHASE=block-ap) with its perplexity,
# the E2E-QP step benches, and the Block-AP kernel breakdowns. Layout: .gpu/traingpu/ as train_full_recipe_gpu.sh
# wants it, plus ncu_block_ap_gpu.sh and this script.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
rm -rf /tmp/eqat-full /tmp/full.log
PHASE=block-ap LIMIT=420 bash ./full.sh
grep -E "block [0-9]+/|Block-AP|perplexity|phase" /tmp/full.log | tail -8
echo "== E2E-QP"
for s in llama2-7b llama2-70b; do
  st=5; [ $s = llama2-70b ] && st=2
  echo $s; timeout 200 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape $s --dtype bf16 --steps $st 2>&1 | grep -E "median|step ms"
done
echo "7B --no-offload"; timeout 200 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape llama2-7b --dtype bf16 --steps 5 --no-offload 2>&1 | grep -E "median"
echo "== ncu"
bash ./ncu_block_ap_gpu.sh
