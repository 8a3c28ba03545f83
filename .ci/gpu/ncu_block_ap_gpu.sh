#!/bin/bash
# The bf16 Block-AP step's kernels at 7B and 70B (the second of two steps), summed by name. Copy a stripped
# `engine` (release, --features cuda,cli) next to this script and carry the folder.
cd "$(dirname "$0")"
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for s in ${SHAPES:-llama2-7b llama2-70b}; do
timeout 120 $NCU --clock-control none --cache-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv --print-units base ./engine bench block-ap --shape $s --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16 --steps 2 --warmup 0 > /tmp/ncu_$s.csv 2> /tmp/ncu_$s.err; echo "ncu $s rc $?"
python3 - /tmp/ncu_$s.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); mi = h.index("Metric Name"); vi = h.index("Metric Value"); ii = h.index("ID")
per = collections.OrderedDict()
for r in rows[1:]:
    per.setdefault((int(r[ii]), r[ki]), {})[r[mi]] = float(r[vi].replace(",", ""))
# A step starts with the attention norm's forward; each step has two: the second step runs from the third to the
# fifth (the bench's back-to-back steps follow).
norms = [i for (i, k) in per if k.startswith("rmsnorm_fwd")]
start, end = norms[2], norms[4] if len(norms) > 4 else float("inf")
t = collections.Counter(); c = collections.Counter(); b = collections.Counter()
for (i, k), m in per.items():
    if i < start or i >= end: continue
    k = k.split("(")[0][:60]
    t[k] += m.get("gpu__time_duration.sum", 0); c[k] += 1
    b[k] += m.get("dram__bytes_read.sum", 0) + m.get("dram__bytes_write.sum", 0)
tot = sum(t.values())
print(f"second step: {tot/1e6:.3f} ms of kernels in {sum(c.values())} launches")
for k, v in t.most_common(40): print(f"{100*v/tot:5.1f}% {v/1e6:8.3f} ms {c[k]:4d}x {b[k]/1e9:7.3f} GB {b[k]/v:6.0f} GB/s  {k}")
if __import__("os").environ.get("SEQ") == "1":
    print("the step's launches in order:")
    for (i, k), m in per.items():
        if start <= i < end:
            v = m.get("gpu__time_duration.sum", 0); gb = (m.get("dram__bytes_read.sum", 0) + m.get("dram__bytes_write.sum", 0)) / 1e9
            print(f"  {v/1e3:9.1f} us {gb:7.3f} GB  {k.split('(')[0][:70]}")
PY
done
