#!/bin/bash
# Why a kernel waits: ncu's warp-state, scheduler and pipe sections for KERNEL (a regex) in the SHAPE Block-AP
# step (the second step's launch), every metric printed. Copy a stripped `engine` (release, --features cuda,cli)
# next to this script and carry the folder.
cd "$(dirname "$0")"
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
S=${SHAPE:-llama2-70b}
timeout 300 $NCU --clock-control none --kernel-name regex:"${KERNEL:-attention_bwd_bf16_d128_sm90}" --launch-skip 1 --launch-count 1 \
  --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section SpeedOfLight \
  --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --metrics \
  smsp__average_warp_latency_issue_stalled_barrier,smsp__average_warp_latency_issue_stalled_long_scoreboard,smsp__average_warp_latency_issue_stalled_wait,smsp__average_warp_latency_issue_stalled_math_pipe_throttle,smsp__average_warp_latency_issue_stalled_short_scoreboard,smsp__average_warp_latency_issue_stalled_mio_throttle,smsp__average_warp_latency_issue_stalled_lg_throttle,smsp__average_warp_latency_issue_stalled_membar,smsp__average_warp_latency_issue_stalled_dispatch_stall,smsp__average_warp_latency_issue_stalled_selected,smsp__average_warp_latency_issue_stalled_not_selected,smsp__average_warp_latency_issue_stalled_sleeping,smsp__average_warp_latency_issue_stalled_misc,smsp__average_warp_latency_issue_stalled_tex_throttle,smsp__average_warp_latency_issue_stalled_drain,smsp__average_warp_latency_issue_stalled_imc_miss,smsp__average_warp_latency_issue_stalled_branch_resolving,smsp__average_warp_latency_issue_stalled_no_instruction,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
  --csv --page details ./engine bench block-ap --shape $S --wbits 2 --group-size 64 --batch 2 --seqlen 2048 \
  --device cuda --dtype bf16 --steps 2 --warmup 0 > /tmp/stall.csv 2> /tmp/stall.err
echo "ncu rc $?"; tail -3 /tmp/stall.err
python3 - /tmp/stall.csv <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); si = h.index("Section Name"); mi = h.index("Metric Name"); ui = h.index("Metric Unit"); vi = h.index("Metric Value")
for r in rows[1:]:
    print(f"{r[ki].split('(')[0][:32]} | {r[si][:28]:28} | {r[mi][:70]:70} | {r[vi]} {r[ui]}")
PY
