#!/bin/bash
# SASS instruction mixes of the attention and fused-step kernels: copy NVRTC's PTX of cuda/attention_bf16 and
# cuda/fake_quant (dumped here with `eqat::gpu::ptx`, its `.version` lowered to the device ptxas's 9.0) next to this
# script as attention_bf16.ptx and fake_quant.ptx; prints registers, spills and opcode counts, SASS under $OUT.
cd "$(dirname "$0")"
for f in attention_bf16 fake_quant; do
  PATH=/usr/local/cuda/bin:$PATH ptxas -arch=sm_90a -O3 -v -o /tmp/$f.cubin $f.ptx 2>&1 | grep -A1 -E "sm90|g64_f32'" | grep -E "Function|registers|spill" | head -12
  /usr/local/cuda/bin/cuobjdump -sass /tmp/$f.cubin > $OUT/$f.sass
done
python3 - <<'PY'
import re, collections, os
out=os.environ["OUT"]
for f, names in [("attention_bf16", ["attention_fwd_bf16_d128_sm90", "attention_bwd_bf16_d128_sm90"]), ("fake_quant", ["fake_quant_adamw_g64_f32"])]:
    txt=open(f"{out}/{f}.sass").read()
    funcs=re.split(r"\n\s*Function : ", txt)
    for fn in funcs[1:]:
        name=fn.split("\n")[0].strip()
        if not any(n == name for n in names): continue
        ops=collections.Counter()
        for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?", fn):
            ops[m.group(2)]+=1
        print(name, sum(ops.values()), "static instructions")
        print("  ", ", ".join(f"{k} {v}" for k,v in ops.most_common(45)))
PY
