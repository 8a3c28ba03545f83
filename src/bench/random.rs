//! Synthetic device tensors from a seed (`cuda/random.cu`): benchmark weights are generated where they are used,
//! so a 70B-shaped block never exists on the host. Element i depends only on (seed, i).
use crate::error::Result;
use crate::gpu::{Arg, GpuBuf, GpuContext, KernelSource};
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

/// A device tensor of uniform values in [lo, hi] (hi is reached only by the rounding of lo + (hi − lo)·u).
pub fn uniform_cuda(
    ctx: &Arc<GpuContext>,
    shape: &[usize],
    lo: f32,
    hi: f32,
    seed: u64,
) -> Result<Tensor> {
    fill(ctx, shape, "random_uniform_f32", lo, hi, seed)
}

/// A device buffer of `n` uniform values in [lo, hi] as [`uniform_cuda`] (lo == hi: the constant lo).
pub fn uniform_buf_cuda(
    ctx: &Arc<GpuContext>,
    n: usize,
    lo: f32,
    hi: f32,
    seed: u64,
) -> Result<GpuBuf> {
    fill_buf(ctx, n, "random_uniform_f32", lo, hi, seed)
}

/// A device buffer of `n` random 32-bit words, read by kernels as `unsigned int*` (packed integer weights).
pub fn random_bits_cuda(ctx: &Arc<GpuContext>, n: usize, seed: u64) -> Result<GpuBuf> {
    let out = ctx.alloc(n)?;
    ctx.launch_1d(
        &CUDA,
        "random_bits_u32",
        n,
        &[out.arg(), Arg::I64(n as i64), Arg::U64(seed)],
    )?;
    Ok(out)
}

fn fill(
    ctx: &Arc<GpuContext>,
    shape: &[usize],
    kernel: &'static str,
    a: f32,
    b: f32,
    seed: u64,
) -> Result<Tensor> {
    let out = fill_buf(ctx, crate::tensor::numel(shape), kernel, a, b, seed)?;
    Tensor::from_gpu(shape, out)
}

fn fill_buf(
    ctx: &Arc<GpuContext>,
    n: usize,
    kernel: &'static str,
    a: f32,
    b: f32,
    seed: u64,
) -> Result<GpuBuf> {
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
    Ok(out)
}
