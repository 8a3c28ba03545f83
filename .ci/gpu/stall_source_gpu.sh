#!/bin/bash
# Where a kernel's warps wait, instruction by instruction: ncu's source counters (warp stall samples per SASS
# instruction) for KERNEL in the SHAPE Block-AP step, the top instructions by samples with their stall reasons.
# Copy a stripped `engine` (release, --features cuda,cli) next to this script and carry the folder.
cd "$(dirname "$0")"
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
S=${SHAPE:-llama2-70b}
timeout 300 $NCU --clock-control none --kernel-name regex:"${KERNEL:-attention_bwd_bf16_d128_sm90}" --launch-skip 1 --launch-count 1 \
  --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
  ./engine bench block-ap --shape $S --wbits 2 --group-size 64 --batch 2 --seqlen 2048 \
  --device cuda --dtype bf16 --steps 2 --warmup 0 > $OUT/source.csv 2> /tmp/source.err
echo "ncu rc $?"; tail -3 /tmp/source.err; head -3 $OUT/source.csv | cut -c1-600
python3 - $OUT/source.csv <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hi = next(i for i, r in enumerate(rows) if any("Source" in c for c in r))
h = rows[hi]; body = rows[hi + 1:]
print("columns:", h[:40])
def col(name):
    return next((i for i, c in enumerate(h) if c == name), None)
src = col("Source"); samp = col("Warp Stall Sampling (All Samples)") or col("Warp Stall Sampling (All Cycles)")
if samp is None:
    sys.exit("no sampling column")
stall_cols = [i for i, c in enumerate(h) if c.startswith("stall_") or "Stall" in c]
tot = sum(float(r[samp] or 0) for r in body if len(r) > samp)
print(f"samples {tot:.0f}")
top = sorted((r for r in body if len(r) > samp), key=lambda r: -float(r[samp] or 0))[:40]
for r in top:
    reasons = sorted(((float(r[i] or 0), h[i]) for i in stall_cols if i != samp and (r[i] or "0").replace(".", "").isdigit()), reverse=True)[:3]
    print(f"{100*float(r[samp])/tot:5.1f}%  {r[src][:60]:60}  " + ", ".join(f"{n}={v:.0f}" for v, n in reasons))
PY
