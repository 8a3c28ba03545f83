#!/bin/bash
# Session 4: one device call: every GPU test binary, the Block-AP benches (resident and streamed 70B), the 7B and
# 70B kernel breakdowns (ncu_block_ap_gpu.sh, copied alongside), and engine train's data-parallel modes on
# stories260K against the single-GPU run. Copy the stripped engine and tests/cuda_* binaries and stories260K.gguf
# next to it and carry the folder.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== tests"
for t in cuda_*; do
  timeout 200 ./$t --test-threads=1 > $OUT/$t.log 2>&1; echo "$t rc $? $(grep 'test result' $OUT/$t.log)"
  grep -E "FAIL|panicked|skipped" $OUT/$t.log | head -5
done
echo "== bench"
for s in smollm2-135m llama2-7b llama3-8b llama2-70b; do
  echo "$s"; timeout 120 ./engine bench block-ap --shape $s --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16 --steps 10 --warmup 2 2>&1 | tee -a $OUT/bench.log | grep -E "median|error|peak"
done
echo "llama2-70b streamed"; timeout 200 ./engine bench block-ap --shape llama2-70b --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16 --stream --blocks 3 --samples 64 --host-mem 64G 2>&1 | tee -a $OUT/bench.log | grep -E "median|resident|streamed|error|peak|GiB" | head -8
echo "== ncu"
bash ./ncu_block_ap_gpu.sh
echo "== data-parallel E2E-QP on stories260K"
A="--model stories260K.gguf --wbits 2 --group-size 4 --calib self --train-size 8 --val-size 2 --seqlen 64 --epochs 1 --eval-data none --device cuda --e2e-batch 4"
timeout 100 ./engine train $A --out /tmp/one > $OUT/one.log 2>&1; echo "single rc $?"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 timeout 100 ./engine train $A --launcher env --out /tmp/env > $OUT/env.log 2>&1; echo "launcher env world 1 rc $?"
timeout 100 ./engine train $A --e2e-gpus 0 --out /tmp/g0 > $OUT/g0.log 2>&1; echo "e2e-gpus 0 rc $?"
timeout 100 ./engine train $A --e2e-ranks 2 --out /tmp/two > $OUT/two.log 2>&1; echo "e2e-ranks 2 rc $?"
for d in env g0 two; do for f in $(cd /tmp/one && find . -type f | sort); do cmp -s /tmp/one/$f /tmp/$d/$f && echo "$d same $f" || echo "$d differs $f"; done; done 2>&1
for f in env g0 two; do tail -n 2 $OUT/$f.log; done
