#!/bin/bash
# MREM anneal length on SmolLM2 (two modules on GPU 0, 2 epochs, w3g64 and w4g64): the default T0 (one block's steps
# in the build of session 9 that ran it, c5101dd's parent; the module's steps since), then T0 = 960 and 1920 steps
# (half and all of a 15-block module's 1920 steps). Set up as .ci/gpu/mrem_quality_gpu.sh (same folder, the GGUF in
# /tmp/smol.gguf from its call).
cd "$(dirname "$0")"
R="--model /tmp/smol.gguf --calib data/c4-train.00000-of-01024.first1000.jsonl --train-size 128 --val-size 8 --seqlen 1024 --epochs 2 --eval-data data/wiki.test.raw --eval-windows 8 --device cuda --dtype bf16 --phase block-ap"
for w in 3 4; do
  for a in "" 960 1920; do
    tag=w${w}_a${a:-def}
    timeout 200 ./engine train $R --wbits $w --group-size 64 --parallel modules --gpus 0,0 ${a:+--mrem-anneal-steps $a} --out /tmp/$tag > $OUT/$tag.log 2>&1
    echo "$tag rc $? $(grep -E '^  (perplexity  FP|wall time)' $OUT/$tag.log | tr -s ' ' | tr '\n' ' ')"
  done
done
