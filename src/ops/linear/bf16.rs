//! The bf16 mixed-precision mode of `linear` on the GPU (`GpuContext::set_matmul_bf16`): the f32 operands of each
//! product are rounded to bf16 by `linear_cast_bf16` and multiplied by cuBLAS GemmEx with f32 accumulation into
//! f32 outputs. Weights, activations and gradients stay f32 between ops; only the GEMM operands are rounded, as
//! under torch.autocast, so the optimizer and everything outside the GEMMs keeps f32 precision.
use crate::error::Result;
use crate::gpu::{Arg, Bf16Buf, GpuBuf, KernelSource};

pub const CUDA: KernelSource = KernelSource {
    op: "linear",
    code: include_str!("../../../cuda/linear.cu"),
};

/// A bf16 copy of `x` (round to nearest even).
pub fn cast_bf16_cuda(x: &GpuBuf) -> Result<Bf16Buf> {
    let mut out = x.ctx().alloc_bf16(x.len())?;
    cast_bf16_into_cuda(&mut out, x)?;
    Ok(out)
}

/// out = bf16(x) (round to nearest even) into an existing buffer of as many values.
pub fn cast_bf16_into_cuda(out: &mut Bf16Buf, x: &GpuBuf) -> Result<()> {
    let n = x.len();
    if out.len() != n {
        return Err(crate::error::Error::shape(
            "cast_bf16",
            format!("{n} values into a bf16 buffer of {}", out.len()),
        ));
    }
    x.ctx().launch_1d(
        &CUDA,
        "linear_cast_bf16",
        n.div_ceil(4),
        &[out.arg(), x.arg(), Arg::I64(n as i64)],
    )
}
