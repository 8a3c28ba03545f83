//! The launches of `cuda/fake_quant.cu` (forward per element, backward one warp per group); the formulas are in
//! this module's parent header. Buffers: w, out, dw [N, K]; scales, zeros, ds, dz [N, K/g].
use crate::error::Result;
use crate::gpu::{opt_arg, Arg, GpuBuf, KernelSource};

pub const CUDA: KernelSource = KernelSource {
    op: "fake_quant",
    code: include_str!("../../../cuda/fake_quant.cu"),
};

pub fn fake_quant_fwd_cuda(
    out: &mut GpuBuf,
    w: &GpuBuf,
    scales: &GpuBuf,
    zeros: &GpuBuf,
    g: usize,
    qmax: f32,
) -> Result<()> {
    let n = out.len();
    out.ctx().launch_1d(
        &CUDA,
        "fake_quant_fwd_f32",
        n,
        &[
            out.arg(),
            w.arg(),
            scales.arg(),
            zeros.arg(),
            Arg::I64(n as i64),
            Arg::I64(g as i64),
            Arg::F32(qmax),
        ],
    )
}

/// dw, ds, dz as `fake_quant_bwd_cpu` (each written when given), one warp per group.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_bwd_cuda(
    dw: Option<&mut GpuBuf>,
    ds: Option<&mut GpuBuf>,
    dz: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    w: &GpuBuf,
    scales: &GpuBuf,
    zeros: &GpuBuf,
    g: usize,
    qmax: f32,
) -> Result<()> {
    let n_groups = scales.len();
    // 32 threads per group: the 1-D launch covers n_groups warps.
    dout.ctx().launch_1d(
        &CUDA,
        "fake_quant_bwd_f32",
        n_groups * 32,
        &[
            opt_arg(&dw),
            opt_arg(&ds),
            opt_arg(&dz),
            dout.arg(),
            w.arg(),
            scales.arg(),
            zeros.arg(),
            Arg::I64(n_groups as i64),
            Arg::I64(g as i64),
            Arg::F32(qmax),
        ],
    )
}
