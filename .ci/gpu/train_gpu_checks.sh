#!/bin/bash
# traingpu (issue 5): GPU tests, `engine eval --device cuda` on SmolLM2, and `engine train --device cuda` timings.
# Needs /tmp/smolpart.aa from the call before (carry .gpu/smolA, cp it to /tmp); carry .gpu/smolB and .gpu/traingpu.
# Layout (a copy of .ci/gpu/train_gpu_checks.sh): as .ci/gpu/train_full_recipe_gpu.sh, plus the stripped test binaries
# cuda_train, cuda_block_ap, cuda_backend, and engine-main (main's engine before issue 5, for the comparison).
cd "$(dirname "$0")"
cat /tmp/smolpart.aa ../smolB/smolpart.ab > /tmp/smol.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol.gguf" | sha256sum -c - || exit 1
export EQAT_SMOLLM2_GGUF=/tmp/smol.gguf
mkdir -p /work/shared/data/wikitext-2-raw && cp data/wiki.test.raw /work/shared/data/wikitext-2-raw/
nvidia-smi --query-gpu=memory.used --format=csv,noheader -lms 250 > $OUT/gpumem.csv &
for t in cuda_train cuda_block_ap cuda_backend; do
  timeout 120 ./$t --test-threads 1 > $OUT/$t.log 2>&1; echo "$t rc=$?"
  grep -E "^(PASS|FAIL)|skipped|test result|panicked|SmolLM2" $OUT/$t.log
done
G="--model /tmp/smol.gguf --wbits 2 --group-size 64"
C=data/c4-train.00000-of-01024.first1000.jsonl
T="/usr/bin/time -f wall=%es,maxrss=%MKB"
echo "== eval 8 x 2048 on cuda"
$T timeout 60 ./engine eval --model /tmp/smol.gguf --data data/wiki.test.raw --ctx 2048 --max-windows 8 --device cuda > $OUT/eval.log 2>&1; echo rc=$?; tail -2 $OUT/eval.log
echo "== main's engine (host streams), 256+16 x 1024 f32, first 25 s"
timeout 25 ./engine-main train $G --calib $C --train-size 256 --val-size 16 --seqlen 1024 --phase block-ap --eval-data none --device cuda --out /tmp/m0 > $OUT/main.log 2>&1
grep -E "done|step (16|128|256)/" $OUT/main.log | head -8
echo "== 256+16 x 1024 f32, the BENCHMARKS recipe (eval on cuda now)"
$T timeout 150 ./engine train $G --calib $C --eval-data data/wiki.test.raw --eval-windows 8 --train-size 256 --val-size 16 --seqlen 1024 --device cuda --out /tmp/r1 > $OUT/r1.log 2>&1; echo rc=$?
grep -E "block inputs|perplexity|wall|block (1|30) done|Block-AP  *[0-9]" $OUT/r1.log
echo "== same, bf16, Block-AP only"
$T timeout 60 ./engine train $G --calib $C --train-size 256 --val-size 16 --seqlen 1024 --phase block-ap --eval-data none --device cuda --dtype bf16 --out /tmp/r2 > $OUT/r2.log 2>&1; echo rc=$?
grep -E "wall|block (1|30) done" $OUT/r2.log
echo "== full-recipe shape, 256+64 x 2048 bf16, both C4 files, Block-AP only"
cat data/c4-train.00000-of-01024.first1000.jsonl data/c4_validation_2k.jsonl > /tmp/c4.jsonl
$T timeout 120 ./engine train $G --calib /tmp/c4.jsonl --train-size 256 --val-size 64 --seqlen 2048 --phase block-ap --eval-data none --device cuda --dtype bf16 --out /tmp/r3 > $OUT/r3.log 2>&1; echo rc=$?
grep -E "calibration|block inputs|wall|block (1|2|30) done" $OUT/r3.log
echo "== bench block-ap smollm2 B2 x T2048 (a wait per step)"
for d in f32 bf16; do timeout 30 ./engine bench block-ap --shape smollm2-135m --wbits 2 --group-size 64 --batch 2 --seqlen 2048 --device cuda --dtype $d --steps 20 --warmup 3 2>&1 | grep -iE "median|step"; done
kill %1; sort -n $OUT/gpumem.csv | tail -1
