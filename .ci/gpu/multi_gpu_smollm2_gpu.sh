#!/bin/bash
# Issue 7 on two GPUs (call 2 of 2, on the machine that ran multi_gpu_dp_gpu.sh, which copied the GGUF's first
# part to /tmp): SmolLM2-135M MREM-parallel Block-AP (--gpus 0,1) against sequential at w3g64 and w4g64 (1 and 2
# epochs), and data-parallel E2E-QP on 1 and 2 GPUs from one Block-AP checkpoint. Session 4 ran it as four calls.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
cat /tmp/smolpart.aa smolpart.ab > /tmp/smol.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol.gguf" | sha256sum -c - || exit 1
R="--model /tmp/smol.gguf --calib data/c4-train.00000-of-01024.first1000.jsonl --train-size 128 --val-size 8 --seqlen 1024 --epochs 1 --eval-data data/wiki.test.raw --eval-windows 8 --device cuda --dtype bf16"
for w in 3 4; do
  for p in off "modules --gpus 0,1"; do
    tag=w${w}_$(echo $p | cut -c1-3)
    /usr/bin/time -f "wall %e s" timeout 150 ./engine train $R --wbits $w --group-size 64 --phase block-ap --parallel $p --out /tmp/$tag > $OUT/$tag.log 2>&1; echo "$tag rc $?"
    grep -E "perplexity|wall time|^wall" $OUT/$tag.log | tail -4
  done
done
# Data-parallel E2E-QP on 1 and 2 GPUs from one Block-AP checkpoint (16 and 64 steps of 16 x 1024 tokens).
E="--model /tmp/smol.gguf --calib data/c4-train.00000-of-01024.first1000.jsonl --train-size 128 --val-size 8 --seqlen 1024 --epochs 1 --eval-data data/wiki.test.raw --eval-windows 4 --device cuda --dtype bf16 --wbits 2 --group-size 64 --e2e-train-size 256 --e2e-batch 16 --e2e-seqlen 1024"
timeout 200 ./engine train $E --phase all --out /tmp/e1 > $OUT/e1.log 2>&1; echo "e2e 1 GPU rc $?"; grep -E "perplexity|wall time|offload|GPU memory" $OUT/e1.log | tail -5
rm -rf /tmp/e2 && cp -r /tmp/e1 /tmp/e2 && rm -f /tmp/e2/e2e_*
timeout 200 ./engine train $E --phase all --e2e-gpus 0,1 --resume --out /tmp/e2 > $OUT/e2.log 2>&1; echo "e2e 2 GPUs rc $?"; grep -E "perplexity|wall time|data-parallel|continuing|error" $OUT/e2.log | tail -5

# The same on 1024 sequences (64 steps).
E="--model /tmp/smol.gguf --calib data/c4-train.00000-of-01024.first1000.jsonl --train-size 128 --val-size 8 --seqlen 1024 --epochs 1 --eval-data data/wiki.test.raw --eval-windows 4 --device cuda --dtype bf16 --wbits 2 --group-size 64 --e2e-train-size 1024 --e2e-batch 16 --e2e-seqlen 1024"
for g in 0 0,1; do
  rm -rf /tmp/f$g && cp -r /tmp/e1 /tmp/f$g && rm -f /tmp/f$g/e2e_*
  timeout 200 ./engine train $E --phase all --e2e-gpus $g --resume --out /tmp/f$g > $OUT/f$g.log 2>&1; echo "e2e --e2e-gpus $g rc $?"; grep -E "E2E-QP: |wall time|\+E2E|error" $OUT/f$g.log | tail -3
done
# MREM against sequential at 2 epochs, w3g64 then w4g64.
R="--model /tmp/smol.gguf --calib data/c4-train.00000-of-01024.first1000.jsonl --train-size 128 --val-size 8 --seqlen 1024 --epochs 2 --eval-data data/wiki.test.raw --eval-windows 8 --device cuda --dtype bf16"
for w in 3 4; do
  for p in off "modules --gpus 0,1"; do
    tag=w${w}e2_$(echo $p | cut -c1-3)
    timeout 150 ./engine train $R --wbits $w --group-size 64 --phase block-ap --parallel $p --out /tmp/$tag > $OUT/$tag.log 2>&1; echo "$tag rc $?"
    grep -E "perplexity  FP|wall time" $OUT/$tag.log | tail -2
  done
done
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
