#!/bin/bash
# Merged main (session 4) on the H100: the E2E-QP progress save/resume on the GPU (tests and a SIGKILL mid-E2E-QP),
# alone and with two data-parallel ranks on the one GPU.
cd "$(dirname "$0")"
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
for t in cuda_e2e cuda_e2e_dp cuda_fused_adamw cuda_train; do
  timeout 200 ./$t --test-threads=1 > $OUT/$t.log 2>&1; echo "$t rc $? $(grep 'test result' $OUT/$t.log)"
  grep -E "FAIL|panicked|skipped|PASS" $OUT/$t.log | head -8
done
for ranks in "" "--e2e-ranks 2"; do
  A="--model stories260K.gguf --wbits 2 --group-size 4 --calib self --train-size 8 --val-size 2 --seqlen 64 --epochs 1 --eval-data none --device cuda --e2e-batch 2 --e2e-checkpoint-every 2 $ranks"
  rm -rf /tmp/whole /tmp/killed
  ./engine train $A --out /tmp/whole > /tmp/w.log 2>&1; echo "[$ranks] whole rc $?"
  EQAT_TEST_PAUSE_AT_STEP=23 ./engine train $A --out /tmp/killed > /tmp/k.log 2>&1 &
  pid=$!; for i in $(seq 300); do grep -q "paused at step" /tmp/k.log && break; sleep 0.1; done
  kill -9 $pid; wait $pid 2>/dev/null; grep -E "paused at step|progress after" /tmp/k.log | tail -3
  ls /tmp/killed | tr '\n' ' '; echo
  ./engine train $A --out /tmp/killed --resume > /tmp/r.log 2>&1; echo "[$ranks] resume rc $?"; grep -E "continuing|progress after" /tmp/r.log | head -3
  for f in $(cd /tmp/whole && find . -type f ! -name train_log.jsonl | sort); do cmp -s /tmp/whole/$f /tmp/killed/$f && echo "same $f" || echo "DIFFERS $f"; done | tr "\n" " "; echo
done
