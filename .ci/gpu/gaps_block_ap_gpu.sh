#!/bin/bash
# Where a Block-AP step's time goes between kernels: SM clock and power sampled during the 7B and 70B benches,
# and (when nsys is there) the kernel timeline of 7B steps with the idle gaps between kernels. Copy a stripped
# engine (release, --features cuda,cli) next to this script and carry the folder.
cd "$(dirname "$0")"
B="--wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16"
for s in llama2-7b llama2-70b; do
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 50 > /tmp/clk_$s.csv &
  P=$!
  ./engine bench block-ap --shape $s $B --steps 30 --warmup 2 2>&1 | grep -E "median|steps"
  kill $P
  python3 - /tmp/clk_$s.csv <<'PY'
import sys
rows = [l.strip().split(", ") for l in open(sys.argv[1]) if "MHz" in l]
clk = [float(r[0].split()[0]) for r in rows]; pw = [float(r[1].split()[0]) for r in rows]
busy = [(c, p) for c, p in zip(clk, pw) if p > 200]
if busy:
    cs = sorted(c for c, _ in busy); ps = sorted(p for _, p in busy)
    print(f"  under load ({len(busy)} samples): SM clock median {cs[len(cs)//2]:.0f} MHz (min {cs[0]:.0f}, max {cs[-1]:.0f}), power median {ps[len(ps)//2]:.0f} W (max {ps[-1]:.0f})")
PY
done
NSYS=$(which nsys 2>/dev/null || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}"
if [ -n "$NSYS" ]; then
  $NSYS profile -o /tmp/ba7 --force-overwrite true -t cuda ./engine bench block-ap --shape llama2-7b $B --steps 5 --warmup 2 > /dev/null 2>&1
  $NSYS stats -r cuda_gpu_trace -f csv -o /tmp/ba7 /tmp/ba7.nsys-rep > /dev/null 2>&1
  python3 - /tmp/ba7_cuda_gpu_trace.csv <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
ks = [(int(r["Start (ns)"]), int(r["Duration (ns)"]), r["Name"][:50]) for r in rows]
ks.sort()
norms = [i for i, k in enumerate(ks) if k[2].startswith("rmsnorm_fwd")]
# steps start at every other rmsnorm_fwd; take the last 4 steps.
starts = norms[::2][-5:]
for a, b in zip(starts, starts[1:]):
    seg = ks[a:b]
    span = seg[-1][0] + seg[-1][1] - seg[0][0]
    busy = sum(d for _, d, _ in seg)
    gaps = [(seg[i+1][0] - (seg[i][0] + seg[i][1]), seg[i][2], seg[i+1][2]) for i in range(len(seg) - 1)]
    big = sorted(gaps, reverse=True)[:6]
    print(f"step: {span/1e6:.3f} ms from first to last kernel, {busy/1e6:.3f} ms busy, {len(seg)} kernels/copies, gaps {sum(g for g,_,_ in gaps)/1e6:.3f} ms")
    for g, x, y in big: print(f"   gap {g/1e3:7.1f} us after {x} before {y}")
PY
fi
