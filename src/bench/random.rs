//! Synthetic device tensors from a seed (`cuda/random.cu`): benchmark weights are generated where they are used,
//! so a 70B-shaped block never exists on the host. Element i depends only on (seed, i).
use crate::error::Result;
use crate::gpu::{Arg, GpuContext, KernelSource};
use crate::tensor::Tensor;
use std::sync::Arc;

pub const CUDA: KernelSource = KernelSource {
    op: "random",
    code: include_str!("../../cuda/random.cu"),
};

/// A device tensor of normal values N(mean, std²).
pub fn randn_cuda(
    ctx: &Arc<GpuContext>,
    shape: &[usize],
    mean: f32,
    std: f32,
    seed: u64,
) -> Result<Tensor> {
    fill(ctx, shape, "random_normal_f32", mean, std, seed)
}

/// A device tensor of uniform values in [lo, hi).
pub fn uniform_cuda(
    ctx: &Arc<GpuContext>,
    shape: &[usize],
    lo: f32,
    hi: f32,
    seed: u64,
) -> Result<Tensor> {
    fill(ctx, shape, "random_uniform_f32", lo, hi, seed)
}

fn fill(
    ctx: &Arc<GpuContext>,
    shape: &[usize],
    kernel: &'static str,
    a: f32,
    b: f32,
    seed: u64,
) -> Result<Tensor> {
    let n = crate::tensor::numel(shape);
    let out = ctx.alloc(n)?;
    ctx.launch_1d(
        &CUDA,
        kernel,
        n,
        &[
            out.arg(),
            Arg::I64(n as i64),
            Arg::U64(seed),
            Arg::F32(a),
            Arg::F32(b),
        ],
    )?;
    Tensor::from_gpu(shape, out)
}
