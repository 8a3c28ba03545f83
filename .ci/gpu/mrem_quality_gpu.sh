#!/bin/bash
# Issue 7's quality check on one GPU: SmolLM2-135M Block-AP, sequential (--parallel off) against MREM with two
# modules (--parallel modules --gpus 0,0: two contexts on GPU 0, the code path of one module per GPU), bf16 GEMMs,
# w3g64 and w4g64, 1 and 2 epochs of 128 C4 windows x 1024 tokens; WikiText-2 perplexity on 8 windows and the
# Block-AP wall time of each. Call 0 (carry [".gpu/smolA"]): `cp .gpu/smolA/smolpart.aa /tmp/`; call 1 at once
# (carry [".gpu/smolB", ".gpu/mq"]): `bash .gpu/mq/mrem_quality_gpu.sh`, with a stripped `engine` (release,
# --features cuda,cli) and data/{c4-train.00000-of-01024.first1000.jsonl, wiki.test.raw} beside this script.
cd "$(dirname "$0")"
cat /tmp/smolpart.aa ../smolB/smolpart.ab > /tmp/smol.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol.gguf" | sha256sum -c - || exit 1
for e in 1 2; do
  R="--model /tmp/smol.gguf --calib data/c4-train.00000-of-01024.first1000.jsonl --train-size 128 --val-size 8 --seqlen 1024 --epochs $e --eval-data data/wiki.test.raw --eval-windows 8 --device cuda --dtype bf16"
  for w in 3 4; do
    for p in off "modules --gpus 0,0"; do
      tag=w${w}e${e}_$(echo $p | cut -c1-3)
      timeout 200 ./engine train $R --wbits $w --group-size 64 --phase block-ap --parallel $p --out /tmp/$tag > $OUT/$tag.log 2>&1
      echo "$tag rc $? $(grep -E '^  (perplexity  FP|wall time)' $OUT/$tag.log | tr -s ' ' | tr '\n' ' ')"
    done
  done
done
grep -E "perplexity" $OUT/w3e1_off.log | head -3
