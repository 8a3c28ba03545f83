#!/bin/bash
# E2E-QP speed (session 4): real_quant tests, the 7B and 70B E2E-QP benches, 7B without offload. Copy stripped
# `engine` and the cuda_ops, cuda_real_quant, cuda_e2e, cuda_e2e_dp test binaries next to this script and carry the folder.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
for t in cuda_ops cuda_real_quant cuda_e2e cuda_e2e_dp; do
  timeout 200 ./$t --test-threads=1 > $OUT/$t.log 2>&1; echo "$t rc $? $(grep 'test result' $OUT/$t.log)"
  grep -E "FAIL|panicked|failed" $OUT/$t.log | head -8
done
for s in llama2-7b llama2-70b; do
  st=5; [ $s = llama2-70b ] && st=2
  echo $s; timeout 200 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape $s --dtype bf16 --steps $st 2>&1 | grep -E "median|step ms"
done
echo "7B --no-offload"; timeout 200 ./engine bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --shape llama2-7b --dtype bf16 --steps 5 --no-offload 2>&1 | grep -E "median"
