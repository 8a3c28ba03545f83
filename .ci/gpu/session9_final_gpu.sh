#!/bin/bash
# Session 9's last device call: every GPU test binary (tests/cuda_*.rs) on the final build, then the MREM bench
# (mrem_bench_gpu.sh, which runs cuda_mrem first). Copy a stripped `engine` (release, --features cuda,cli), the
# stripped test binaries (named by their stem) and mrem_bench_gpu.sh next to this script and carry the folder.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
for t in cuda_*; do
  [ $t = cuda_mrem ] && continue
  timeout 240 ./$t --test-threads=1 > $OUT/$t.log 2>&1
  echo "$t rc $? $(grep 'test result' $OUT/$t.log | tail -1 | cut -d';' -f1-3)"
  grep -E "FAIL|panicked|failed" $OUT/$t.log | head -5
done
bash ./mrem_bench_gpu.sh
