//! The launches of `cuda/adamw.cu`: one update launch per parameter, and one finiteness check per gradient into a
//! shared flag buffer that is downloaded once per step.
use super::AdamWCoefs;
use crate::error::Result;
use crate::gpu::{Arg, GpuBuf, KernelSource};

pub const CUDA: KernelSource = KernelSource {
    op: "adamw",
    code: include_str!("../../../cuda/adamw.cu"),
};

/// A device parameter's first and second moments.
pub struct DeviceMoments {
    pub m: GpuBuf,
    pub v: GpuBuf,
}

/// The update of `adamw_update_cpu` on device buffers, in the same operation order.
pub fn adamw_update_cuda(
    p: &mut GpuBuf,
    g: &GpuBuf,
    m: &mut GpuBuf,
    v: &mut GpuBuf,
    c: &AdamWCoefs,
) -> Result<()> {
    let n = p.len();
    p.ctx().launch_1d(
        &CUDA,
        "adamw_update_f32",
        n,
        &[
            p.arg(),
            g.arg(),
            m.arg(),
            v.arg(),
            Arg::I64(n as i64),
            Arg::F32(c.decay),
            Arg::F32(c.beta2),
            Arg::F32(c.one_minus_beta1),
            Arg::F32(c.one_minus_beta2),
            Arg::F32(c.step_size),
            Arg::F32(c.bias_correction2_sqrt),
            Arg::F32(c.eps),
        ],
    )
}

/// For each gradient, whether it holds a NaN or an infinity: all checks queued, then one download.
pub fn nonfinite_cuda(grads: &[&GpuBuf]) -> Result<Vec<bool>> {
    let Some(first) = grads.first() else {
        return Ok(Vec::new());
    };
    let ctx = first.ctx().clone();
    let flags = ctx.zeros(grads.len())?;
    for (k, g) in grads.iter().enumerate() {
        ctx.launch_1d(
            &CUDA,
            "adamw_check_f32",
            g.len(),
            &[
                flags.arg(),
                Arg::I32(k as i32),
                g.arg(),
                Arg::I64(g.len() as i64),
            ],
        )?;
    }
    Ok(flags.to_vec()?.iter().map(|&f| f != 0.0).collect())
}
