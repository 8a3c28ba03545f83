//! The launches of `cuda/cross_entropy.cu`: the forward one block per row (max, then the f64 sum of exps) plus a
//! one-block launch for the mean, the backward one block per row. The formulas are in the parent's header.
//! Buffers: logits, dlogits [N, V]; targets [N] (the i32 bits, `GpuContext::upload_bits`); lse_max and
//! lse_log_sum [N] f32, written for counted rows and read back by the backward.
use crate::error::{Error, Result};
use crate::gpu::{Arg, GpuBuf, KernelSource};

pub const CUDA: KernelSource = KernelSource {
    op: "cross_entropy",
    code: include_str!("../../../cuda/cross_entropy.cu"),
};

/// Threads per row: V rounded up to whole warps, at most 1024 (a 128k row is then 125 values per thread).
fn row_threads(v: usize) -> u32 {
    (v.div_ceil(32) * 32).min(1024) as u32
}

fn grid_rows(rows: usize) -> Result<u32> {
    u32::try_from(rows).map_err(|_| {
        Error::invalid(
            "cross_entropy_cuda",
            format!("{rows} rows exceed one launch"),
        )
    })
}

/// loss[0] = mean over counted rows of -log softmax(logits[r])[targets[r]], `count` (> 0) the number of rows
/// whose target is not ignore_index (the caller counts the host targets). Fills lse_max and lse_log_sum.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_fwd_cuda(
    loss: &mut GpuBuf,
    lse_max: &mut GpuBuf,
    lse_log_sum: &mut GpuBuf,
    logits: &GpuBuf,
    targets: &GpuBuf,
    ignore_index: i32,
    v: usize,
    count: usize,
) -> Result<()> {
    let rows = targets.len();
    let ctx = logits.ctx().clone();
    // f64 per-row NLL, two f32 slots each (device allocations are 256-byte aligned).
    let nll = ctx.alloc(2 * rows)?;
    ctx.launch(
        &CUDA,
        "cross_entropy_fwd_f32",
        (grid_rows(rows)?, 1, 1),
        (row_threads(v), 1, 1),
        0,
        &[
            nll.arg(),
            lse_max.arg(),
            lse_log_sum.arg(),
            logits.arg(),
            targets.arg(),
            Arg::I32(ignore_index),
            Arg::I64(v as i64),
        ],
    )?;
    ctx.launch(
        &CUDA,
        "cross_entropy_loss_f32",
        (1, 1, 1),
        (1024, 1, 1),
        0,
        &[
            loss.arg(),
            nll.arg(),
            Arg::I64(rows as i64),
            Arg::I64(count as i64),
        ],
    )
}

/// dlogits = (softmax − onehot(target)) · dout[0] / count for counted rows, 0 for ignored rows.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_bwd_cuda(
    dlogits: &mut GpuBuf,
    logits: &GpuBuf,
    targets: &GpuBuf,
    ignore_index: i32,
    lse_max: &GpuBuf,
    lse_log_sum: &GpuBuf,
    dout: &GpuBuf,
    v: usize,
    count: usize,
) -> Result<()> {
    let rows = targets.len();
    dlogits.ctx().launch(
        &CUDA,
        "cross_entropy_bwd_f32",
        (grid_rows(rows)?, 1, 1),
        (row_threads(v), 1, 1),
        0,
        &[
            dlogits.arg(),
            logits.arg(),
            targets.arg(),
            Arg::I32(ignore_index),
            lse_max.arg(),
            lse_log_sum.arg(),
            dout.arg(),
            Arg::I64(count as i64),
            Arg::I64(v as i64),
        ],
    )
}
