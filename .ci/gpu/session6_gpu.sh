#!/bin/bash
# Session 6: the GPU test binaries copied alongside (cuda_*), the Block-AP benches (SHAPES, default all four) and,
# with NCU=1, the kernel breakdown (ncu_block_ap_gpu.sh copied alongside). Copy the stripped engine and the
# tests/cuda_* binaries next to it and carry the folder. The test summary comes last.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
: > /tmp/tests.sum
for t in cuda_*; do
  [ -x "$t" ] || continue
  timeout 200 ./$t --test-threads=1 > /tmp/$t.log 2>&1; echo "$t rc $? $(grep 'test result' /tmp/$t.log)" >> /tmp/tests.sum
  grep -E "FAIL|panicked" /tmp/$t.log | head -5 >> /tmp/tests.sum
done
cat /tmp/cuda_*.log > $OUT/tests.log 2>/dev/null
echo "== bench"
for s in ${SHAPES:-smollm2-135m llama2-7b llama3-8b llama2-70b}; do
  echo "$s"; timeout 120 ./engine bench block-ap --shape $s --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16 --steps 20 --warmup 3 2>&1 | tee -a $OUT/bench.log | grep -E "median|error|peak|back to back"
done
[ "$NCU" = 1 ] && { echo "== ncu"; bash ./ncu_block_ap_gpu.sh; }
echo "== tests"
cat /tmp/tests.sum
