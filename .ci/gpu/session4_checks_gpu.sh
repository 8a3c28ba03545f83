#!/bin/bash
# Session 4: one device call: every GPU test binary, the Block-AP benches (resident and streamed 70B), the 7B and
# 70B kernel breakdowns, and engine train's data-parallel modes on stories260K against the single-GPU run.
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
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for s in llama2-7b llama2-70b; do
timeout 200 $NCU --clock-control none --cache-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv --print-units base ./engine bench block-ap --shape $s --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16 --steps 2 --warmup 0 > $OUT/ncu_$s.csv 2> $OUT/ncu_$s.err; echo "ncu $s rc $?"
python3 - $OUT/ncu_$s.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); mi = h.index("Metric Name"); vi = h.index("Metric Value"); ii = h.index("ID")
per = collections.OrderedDict()
for r in rows[1:]:
    per.setdefault((int(r[ii]), r[ki]), {})[r[mi]] = float(r[vi].replace(",", ""))
# The second step only: kernels after the last one of the first step (the first mse_fwd_sum marks each step's loss).
ids = [i for (i, k) in per if k.startswith("mse_fwd_sum")]
start = ids[0] if len(ids) > 1 else -1
t = collections.Counter(); c = collections.Counter(); b = collections.Counter()
for (i, k), m in per.items():
    if i <= start or k.startswith("random_") or "init_minmax" in k: continue
    k = k.split("(")[0][:60]
    t[k] += m.get("gpu__time_duration.sum", 0); c[k] += 1
    b[k] += m.get("dram__bytes_read.sum", 0) + m.get("dram__bytes_write.sum", 0)
tot = sum(t.values())
print(f"second step: {tot/1e6:.3f} ms of kernels in {sum(c.values())} launches")
for k, v in t.most_common(30): print(f"{100*v/tot:5.1f}% {v/1e6:8.3f} ms {c[k]:4d}x {b[k]/1e9:7.3f} GB {b[k]/v:6.0f} GB/s  {k}")
PY
done
echo "== data-parallel E2E-QP on stories260K"
A="--model stories260K.gguf --wbits 2 --group-size 4 --calib self --train-size 8 --val-size 2 --seqlen 64 --epochs 1 --eval-data none --device cuda --e2e-batch 4"
timeout 100 ./engine train $A --out /tmp/one > $OUT/one.log 2>&1; echo "single rc $?"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 timeout 100 ./engine train $A --launcher env --out /tmp/env > $OUT/env.log 2>&1; echo "launcher env world 1 rc $?"
timeout 100 ./engine train $A --e2e-gpus 0 --out /tmp/g0 > $OUT/g0.log 2>&1; echo "e2e-gpus 0 rc $?"
timeout 100 ./engine train $A --e2e-ranks 2 --out /tmp/two > $OUT/two.log 2>&1; echo "e2e-ranks 2 rc $?"
for d in env g0 two; do for f in $(cd /tmp/one && find . -type f | sort); do cmp -s /tmp/one/$f /tmp/$d/$f && echo "$d same $f" || echo "$d differs $f"; done; done 2>&1
for f in env g0 two; do tail -n 2 $OUT/$f.log; done
