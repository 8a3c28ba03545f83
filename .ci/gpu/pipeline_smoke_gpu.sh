#!/bin/bash
# The whole `engine train --device cuda` pipeline (Block-AP then E2E-QP, WikiText-2 perplexity after each) on SmolLM2
# w2g64 at a quarter of the full recipe's calibration set (1024 × 2048 C4 windows), after call 0 of
# train_full_recipe_gpu.sh placed the GGUF's first half in /tmp.
cd "$(dirname "$0")"
[ -f /tmp/smol.gguf ] || cat /tmp/smolpart.aa ../smolB/smolpart.ab > /tmp/smol.gguf || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol.gguf" | sha256sum -c - || exit 1
cat data/c4-train.00000-of-01024.first1000.jsonl data/c4_validation_2k.jsonl > /tmp/c4.jsonl
rm -rf /tmp/eqat-q
/usr/bin/time -f "wall %e s, max RSS %M KB" timeout 540 ./engine train --model /tmp/smol.gguf --wbits 2 --group-size 64 \
  --calib /tmp/c4.jsonl --train-size 1024 --val-size 64 --seqlen 2048 --epochs 2 --eval-data data/wiki.test.raw \
  --eval-windows 8 --device cuda --dtype bf16 --out /tmp/eqat-q 2>&1 | tee /tmp/q.log | grep -E "perplexity|summary|wall time|E2E-QP step [0-9]*0/|wall|error"
echo "rc=${PIPESTATUS[0]}"
