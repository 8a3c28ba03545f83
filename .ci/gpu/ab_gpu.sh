#!/bin/bash
# A/B of two (or more) builds on one machine: the stripped engines named in ENGINES (copied alongside, e.g.
# engine_base engine_new), interleaved, REPS rounds, for SHAPES; any tests/cuda_* binaries alongside run first;
# NCU=1 adds each engine's attention kernel times (ncu_sum.py alongside) for NCU_SHAPES. Machines differ by ~2.5%
# at 70B and single runs by +-0.2 ms, so only builds compared in the same call are compared.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
for t in cuda_*; do [ -x "$t" ] && { timeout 200 ./$t --test-threads=1 > /tmp/$t.log 2>&1; echo "$t rc $? $(grep 'test result' /tmp/$t.log)"; grep -E "FAIL|panicked" /tmp/$t.log | head -5; }; done
cat /tmp/cuda_*.log > $OUT/tests.log 2>/dev/null
for rep in $(seq ${REPS:-2}); do
for s in ${SHAPES:-llama2-7b llama2-70b}; do
for e in ${ENGINES:-engine_base engine_new}; do
  printf "%-12s %-12s " $e $s; timeout 120 ./$e bench block-ap --shape $s --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16 --steps 20 --warmup 3 $EXTRA 2>&1 | tee -a $OUT/bench_$e.log | grep -E "median|back to back|error" | sed 's/TFLOP.s, peak.*reserved)//; s/(as engine train runs them)//' | tr '\n' ' '; echo
done; done; done
if [ "$NCU" = 1 ]; then
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for s in ${NCU_SHAPES:-smollm2-135m llama2-7b llama2-70b}; do for e in ${ENGINES:-engine_base engine_new}; do
  printf "%-12s %-12s " $e $s
  $NCU --clock-control none --kernel-name regex:"attention_(fwd|bwd)" --launch-skip 2 --launch-count 2 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv --print-units base ./$e bench block-ap --shape $s --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype bf16 --steps 2 --warmup 0 2>/dev/null | python3 ncu_sum.py
done; done
fi
