#!/bin/bash
# Session 9's device call: every GPU test binary (tests/cuda_*.rs), the 7B and 70B Block-AP step benches
# (repeat_70b_gpu.sh, RUNS=3), and the GEMM energy check (gemm_l2_energy_gpu.py). Copy a stripped `engine` (release,
# --features cuda,cli), the stripped test binaries (named by their stem: cuda_ops, ...) and those two scripts next
# to this one and carry the folder. Logs under $OUT.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
for t in cuda_*; do
  timeout 240 ./$t --test-threads=1 > $OUT/$t.log 2>&1
  echo "$t rc $? $(grep 'test result' $OUT/$t.log | tail -1)"
  grep -E "FAIL|panicked|failed|skipped" $OUT/$t.log | head -5
done
./engine bench block-ap --shape llama2-7b --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda \
  --dtype bf16 --steps 20 --warmup 3 2>&1 | grep -E "median|back to back|peak"
RUNS=${RUNS:-3} bash ./repeat_70b_gpu.sh
python3 gemm_l2_energy_gpu.py
