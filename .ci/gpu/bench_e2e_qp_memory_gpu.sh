#!/bin/bash
# e2emem (issue 6): E2E-QP memory. GPU tests first, then the e2e-qp bench before (main's engine) and after.
# Copy next to it: engine (this branch), engine-before (main at fa7a6aa), and the stripped test binaries
# cuda_e2e, cuda_backend, cuda_real_quant; carry the folder. Output under $OUT.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T=""; [ -x /usr/bin/time ] && T="/usr/bin/time -f maxrss_kb=%M"
for t in "cuda_e2e" "cuda_backend adamw" "cuda_real_quant"; do
  set -- $t
  echo "== $t"
  timeout 150 ./$1 ${2:-} --nocapture 2>&1 | tee $OUT/$1.log | grep -E "test result|FAIL|panicked|skipped|passed|offload|^test " | head -20
done
B="bench e2e-qp --synthetic --wbits 2 --group-size 64 --seqlen 4096 --dtype bf16"
run() { echo "== $*"; timeout 200 $T "$@" 2>&1 | tee -a $OUT/bench.log | grep -vE "^\s*$" | tail -6; }
run ./engine $B --shape llama2-7b --steps 3
run ./engine-before $B --shape llama2-7b --steps 3
run ./engine $B --shape llama2-7b --steps 3 --no-offload
run ./engine $B --shape llama2-70b --steps 2 --warmup 1
run ./engine-before $B --shape llama2-70b --steps 2 --warmup 1
