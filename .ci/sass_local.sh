#!/bin/bash
# Registers, spills, wgmma serialization notes and the SASS opcode mix of the Hopper kernels, without a GPU:
# NVRTC's PTX (dumped by the compile test) through ptxas and cuobjdump from the pip wheels nvidia-cuda-nvcc,
# nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm (CUDA 13). Usage: .ci/sass_local.sh [op ...] (default: attention_bf16 fake_quant);
# SASS lands in /tmp/eqat_sass/<op>.sass. Needs libnvrtc (NVRTC_LIB, default /tmp/nvrtc/nvidia/cu13/lib).
set -e
cd "$(dirname "$0")/.."
T=/tmp/eqat_sass
mkdir -p $T
if [ ! -x $T/x/nvidia/cu13/bin/ptxas ] || [ ! -x $T/x/nvidia/cu13/bin/cuobjdump ] || [ ! -x $T/x/nvidia/cu13/bin/nvdisasm ]; then
  pip download -q --no-deps "nvidia-cuda-nvcc==13.*" "nvidia-cuda-cuobjdump==13.*" "nvidia-cuda-nvdisasm==13.*" -d $T/wheels
  for w in $T/wheels/*.whl; do unzip -q -o "$w" -d $T/x; done
fi
BIN=$T/x/nvidia/cu13/bin
LD_LIBRARY_PATH=${NVRTC_LIB:-/tmp/nvrtc/nvidia/cu13/lib} EQAT_DUMP_PTX=$T \
  cargo test -q --release --features cuda --lib every_kernel_source > /dev/null
for op in ${@:-attention_bf16 fake_quant}; do
  $BIN/ptxas -arch=sm_90a -O3 -v -o $T/$op.cubin $T/${op}_sm_90.ptx 2>&1 | grep -E "sm90|g64_f32'|serializ|spill" | grep -vE "^ptxas info    : (Compiling|Function properties)" | sed 's/ptxas info    : //' || true
  PATH=$BIN:$PATH $BIN/cuobjdump -sass $T/$op.cubin > $T/$op.sass
done
