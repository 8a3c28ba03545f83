#!/bin/bash
# Issue 7 on two GPUs (call 1 of 2): NCCL tests with several ranks, engine train's data-parallel E2E-QP (one
# process with --e2e-gpus 0,1, and two launched processes) and MREM --gpus 0,1 on stories260K against one GPU.
cd "$(dirname "$0")"
cp smolpart.aa /tmp/ &
mkdir -p /tmp/nccl && ln -sf $(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))')/libnccl.so.2 /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
nvidia-smi -L
[ -z "$SKIP_TESTS" ] && for t in cuda_nccl cuda_e2e_dp cuda_mrem; do
  timeout 150 ./$t --test-threads=1 > $OUT/$t.log 2>&1; echo "$t rc $? $(grep 'test result' $OUT/$t.log)"
  grep -E "PASS|FAIL|panicked|skipped" $OUT/$t.log | head -6
done
A="--model stories260K.gguf --wbits 2 --group-size 4 --calib self --train-size 16 --val-size 2 --seqlen 64 --epochs 1 --eval-data none --device cuda --e2e-batch 8 --e2e-train-size 64"
t0=$(date +%s%N); timeout 120 ./engine train $A --out /tmp/one > $OUT/one.log 2>&1; echo "single rc $? $(( ($(date +%s%N) - t0) / 1000000 )) ms"
t0=$(date +%s%N); timeout 120 ./engine train $A --e2e-gpus 0,1 --out /tmp/g01 > $OUT/g01.log 2>&1; echo "--e2e-gpus 0,1 rc $? $(( ($(date +%s%N) - t0) / 1000000 )) ms"
t0=$(date +%s%N)
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 timeout 150 ./engine train $A --launcher env --out /tmp/env > $OUT/env$r.log 2>&1 &
done
wait; echo "launched ranks done $(( ($(date +%s%N) - t0) / 1000000 )) ms"; tail -n 2 $OUT/env0.log $OUT/env1.log
for d in g01 env; do for f in $(cd /tmp/one && find . -type f ! -name train_log.jsonl | sort); do cmp -s /tmp/one/$f /tmp/$d/$f && echo "$d same $f" || echo "$d differs $f"; done; done | sort | uniq -c | head -30
python3 - <<'PY'
import json
def e2e(d):
    return [(j["step"], j["loss"], j["grad_norm"]) for j in map(json.loads, open(f"/tmp/{d}/train_log.jsonl")) if j.get("phase") == "e2e-qp"]
one = e2e("one")
for d in ["g01", "env"]:
    o = e2e(d)
    rl = max(abs(a[1]-b[1])/abs(a[1]) for a, b in zip(one, o)); rg = max(abs(a[2]-b[2])/abs(a[2]) for a, b in zip(one, o))
    print(f"{d}: {len(o)} E2E-QP steps (single {len(one)}), max relative difference loss {rl:.2e}, grad norm {rg:.2e}")
PY
python3 - <<'PY'
import struct, json
def tensors(path):
    b = open(path, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8+n]); out = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]; out[k] = struct.unpack(f"<{(e-s)//4}f", b[8+n+s:8+n+e])
    return out
a = tensors("/tmp/one/e2e_scales.safetensors")
for d in ["g01", "env"]:
    b = tensors(f"/tmp/{d}/e2e_scales.safetensors")
    worst = max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))
    print(f"{d}: e2e scales worst |difference| {worst:.3e} over {sum(len(v) for v in a.values())} values")
PY
M="--model stories260K.gguf --wbits 4 --group-size 4 --calib self --train-size 16 --val-size 2 --seqlen 64 --epochs 1 --eval-data none --device cuda --phase block-ap"
timeout 100 ./engine train $M --out /tmp/mseq > $OUT/mseq.log 2>&1; echo "mrem seq rc $?"
timeout 100 ./engine train $M --parallel modules --gpus 0,1 --out /tmp/mpar > $OUT/mpar.log 2>&1; echo "mrem --gpus 0,1 rc $?"
grep -E "block 5 done|wall|summary" -A2 $OUT/mseq.log | head -5; grep -E "block 5 done|wall|summary|module" $OUT/mpar.log | head -6
wait; ls -la /tmp/smolpart.aa
