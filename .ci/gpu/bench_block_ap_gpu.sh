#!/bin/bash
# One device call (copy the engine and test binaries next to this script, carry the folder): GPU tests, the
# Block-AP benches, engine train --device cuda vs cpu on stories260K, and a 7B ncu profile summed by kernel name.
cd "$(dirname "$0")"
E=./engine
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
echo "== tests"
timeout 150 ./cuda_block_ap --test-threads=1 2>&1 | tee $OUT/tests.log | grep -E "PASS|FAIL|relative|losses|gap|test result|panicked|error" | head -40
timeout 120 ./cuda_equivalence --test-threads=1 2>&1 | tee $OUT/equiv.log | grep -E "PASS|FAIL|test result" | head -20
echo "== bench"
for s in smollm2-135m llama2-7b llama3-8b llama2-70b; do
  for d in bf16; do
    st=10; [ $s = llama2-70b ] && [ $d = f32 ] && st=4
    timeout 120 $E bench block-ap --shape $s --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype $d --steps $st --warmup 2 2>&1 | tee -a $OUT/bench.log | grep -E "median|error|losses"
  done
done
timeout 60 $E bench block-ap --shape llama2-7b --device cuda --dtype f32 --steps 5 --warmup 2 2>&1 | tee -a $OUT/bench.log | grep -E "median|error"
echo "== train cuda vs cpu"
for d in cpu cuda; do
  timeout 60 $E train --model stories260K.gguf --wbits 2 --group-size 4 --calib self --phase block-ap --train-size 8 --val-size 2 --seqlen 64 --epochs 1 --eval-data none --out /tmp/ck_$d --device $d > $OUT/train_$d.log 2>&1; echo "rc $?"
  sed -n '/block  final/,$p' $OUT/train_$d.log | head -8; grep -c Step $OUT/train_$d.log; tail -2 $OUT/train_$d.log
done
for f in $(cd /tmp/ck_cpu && find . -type f); do cmp -s /tmp/ck_cpu/$f /tmp/ck_cuda/$f && echo "same $f" || echo "differs $f"; done 2>&1 | head -12
python3 - <<'PY'
import json
def losses(d):
    return [(j.get("block"), j.get("step"), j["loss"]) for j in map(json.loads, open(f"/tmp/ck_{d}/train_log.jsonl")) if "loss" in j]
c, g = losses("cpu"), losses("cuda")
rel = max(abs(a[2] - b[2]) / abs(a[2]) for a, b in zip(c, g)) if c else float("nan")
print(f"train_log losses: cpu {len(c)} cuda {len(g)}, max relative difference {rel:.2e}")
PY
echo "== ncu 7B bf16 step"
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
timeout 120 $NCU --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --print-units base $E bench block-ap --shape llama2-7b --device cuda --dtype bf16 --steps 1 --warmup 0 > $OUT/ncu7b.csv 2> $OUT/ncu.err; echo "ncu rc $?"
python3 - $OUT/ncu7b.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value")
t = collections.Counter(); c = collections.Counter()
for r in rows[1:]:
    k = r[ki]
    if k.startswith("random_") or "init_minmax" in k: continue
    k = k.split("(")[0][:60]
    t[k] += float(r[vi].replace(",", "")); c[k] += 1
tot = sum(t.values())
print(f"total kernel time {tot/1e6:.2f} ms over {sum(c.values())} kernels")
for k, v in t.most_common(25): print(f"{100*v/tot:5.1f}% {v/1e6:8.3f} ms {c[k]:4d}x {k}")
PY
