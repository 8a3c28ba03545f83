#!/bin/bash
# The 70B Block-AP step, RUNS times on one machine (`engine bench block-ap --shape llama2-70b ... --steps 20
# --warmup 3`, medians), with the SM clock and board power sampled every 50 ms under load. Copy a stripped
# `engine` (release, --features cuda,cli) next to this script and carry the folder.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,serial,clocks.max.sm,power.limit --format=csv,noheader | sed 's/, [0-9]\{8,\},/, (serial),/'
nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 50 > /tmp/clk.csv &
P=$!
for i in $(seq ${RUNS:-5}); do
  ./engine bench block-ap --shape llama2-70b --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda \
    --dtype bf16 --steps 20 --warmup 3 2>&1 | grep -E "median|back to back" | sed 's/TFLOP.s, peak.*//' | tr '\n' ' '; echo
done
kill $P
python3 - <<'PY'
rows = [l.strip().split(", ") for l in open("/tmp/clk.csv") if "," in l]
busy = sorted((float(c), float(p)) for c, p in rows if float(p) > 200)
if busy:
    cs = sorted(c for c, _ in busy); ps = sorted(p for _, p in busy)
    print(f"under load ({len(busy)} samples): SM clock median {cs[len(cs)//2]:.0f} MHz (min {cs[0]:.0f}), power median {ps[len(ps)//2]:.0f} W (max {ps[-1]:.0f})")
PY
