#!/bin/bash
# The issue-5 full recipe on SmolLM2-135M: w2g64 Block-AP (4096 C4 windows of 2048 tokens, 2 epochs of batch 2,
# bf16 GEMMs) then E2E-QP and WikiText-2 perplexity, all on the GPU, in two 10-minute device calls on one warm
# machine. The run checkpoints every block to /tmp/eqat-full; the second call resumes it.
#
#   call 0: carry [".gpu/smolA"]                    command: cp .gpu/smolA/smolpart.aa /tmp/
#   call 1: carry [".gpu/smolB", ".gpu/traingpu"]   command: bash .gpu/traingpu/full.sh
#   call 2: carry [".gpu/traingpu"]  (at once)      command: bash .gpu/traingpu/full.sh
# Each call runs `engine train` for at most LIMIT seconds (default 570) and stops it there; rerun until the log
# ends with the summary. PHASE=block-ap runs only that phase (and its perplexity). Logs: $OUT/full.log (this call), /tmp/full.log (all calls).
# Layout (a copy of .ci/gpu/train_full_recipe_gpu.sh): .gpu/traingpu/{full.sh, engine (stripped release build with
# --features cuda,cli), data/wiki.test.raw, data/c4-train.00000-of-01024.first1000.jsonl, data/c4_validation_2k.jsonl};
# .gpu/smolA/smolpart.aa + .gpu/smolB/smolpart.ab = `split -b 60000000` of SmolLM2-135M-Instruct.Q4_1.gguf.
# Predicted (BENCHMARKS.md, issue 5): Block-AP ~8.5 min, E2E-QP 6.7-7.9 min, 16-17.5 min in all.
cd "$(dirname "$0")"
LIMIT=${LIMIT:-570}
if [ ! -f /tmp/smol.gguf ]; then
  cat /tmp/smolpart.aa ../smolB/smolpart.ab > /tmp/smol.gguf || exit 1
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol.gguf" | sha256sum -c - || exit 1
# The calibration text: both C4 files (~1.6M tokens); windows are drawn at random from its first 90%.
cat data/c4-train.00000-of-01024.first1000.jsonl data/c4_validation_2k.jsonl > /tmp/c4.jsonl
RESUME=""
[ -f /tmp/eqat-full/eqat.json ] && RESUME="--resume"
echo "== $(date -u +%T) engine train $RESUME (limit $LIMIT s)" | tee -a /tmp/full.log
/usr/bin/time -f "wall %e s, max RSS %M KB" timeout $LIMIT ./engine train --model /tmp/smol.gguf \
  --wbits 2 --group-size 64 --calib /tmp/c4.jsonl --train-size 4096 --val-size 64 --seqlen 2048 --epochs 2 \
  --eval-data data/wiki.test.raw --eval-windows 8 --device cuda --dtype bf16 --out /tmp/eqat-full $RESUME \
  ${PHASE:+--phase $PHASE} \
  2>&1 | tee -a /tmp/full.log | grep -E "calibration|block inputs|perplexity|done|E2E-QP step [0-9]*0/|summary|wall|error"
echo "rc=${PIPESTATUS[0]}"
cp /tmp/full.log $OUT/full.log
