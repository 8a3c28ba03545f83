//! rmsnorm's CUDA launchers (cuda/rmsnorm.cu): the forward with its optional outputs (`FwdOutputs`: the bf16 GEMM
//! operand, the folded norm's x̂, a fused residual add) and the backward with per-block dw partials.
use crate::error::{Error, Result};
use crate::gpu::{opt_arg, Arg, Bf16Buf, GpuBuf, KernelSource};

/// Rows per block of `rmsnorm_bwd_f32`: few, so that a [4096, C] gradient runs as 1024 blocks (several per SM)
/// rather than 128 (one per SM, latency-bound: 0.38 ms at C = 4096 with 32 rows); the partial dw rows this
/// leaves (R/4 × C) are still a small read for `add_bwd_f32`.
const BWD_ROWS_CUDA: usize = 4;

/// The CUDA kernel for rows of c values (`kernel` or its twin `wide`, cuda/rmsnorm.cu) and its threads per block:
/// each thread holds at most 8 values of a row (32 in the wide kernel), threads a multiple of 32, at least 128;
/// rows of more than 16384 values are refused.
fn kernel_for(
    op: &'static str,
    [kernel, wide]: [&'static str; 2],
    c: usize,
) -> Result<(&'static str, u32)> {
    let threads = |per: usize| c.div_ceil(per).next_multiple_of(32).max(128) as u32;
    match c {
        0..=8192 => Ok((kernel, threads(8))),
        8193..=16384 => Ok((wide, threads(32))),
        _ => Err(Error::shape(
            op,
            format!("rows of {c} values: the GPU kernels take at most 16384"),
        )),
    }
}

pub const CUDA: KernelSource = KernelSource {
    op: "rmsnorm",
    code: include_str!("../../../cuda/rmsnorm.cu"),
};

/// One block per row of C = w.len() values.
pub fn rmsnorm_fwd_cuda(
    out: &mut GpuBuf,
    rstd: &mut GpuBuf,
    x: &GpuBuf,
    w: &GpuBuf,
    eps: f32,
) -> Result<()> {
    let outs = FwdOutputs {
        out: Some(out),
        rstd: Some(rstd),
        ..FwdOutputs::default()
    };
    rmsnorm_fwd_cuda_into(outs, x, w, eps)
}

/// What `rmsnorm_fwd_f32` writes; each may be left out. `out_b` is bf16(y), the bf16 mode's GEMM operand;
/// `xhat_b` is bf16(x·rstd), the folded norm's (fold.rs).
#[derive(Default)]
pub(super) struct FwdOutputs<'a> {
    pub(super) out: Option<&'a mut GpuBuf>,
    pub(super) out_b: Option<&'a mut Bf16Buf>,
    pub(super) xhat_b: Option<&'a mut Bf16Buf>,
    pub(super) rstd: Option<&'a mut GpuBuf>,
    /// (res, x + res): the residual add fused in front of the norm, which normalizes x + res.
    pub(super) residual: Option<(&'a GpuBuf, &'a mut GpuBuf)>,
}

pub(super) fn rmsnorm_fwd_cuda_into(o: FwdOutputs, x: &GpuBuf, w: &GpuBuf, eps: f32) -> Result<()> {
    let c = w.len();
    let rows = x.len() / c;
    let lens = [
        o.out.as_ref().map(|b| b.len()),
        o.out_b.as_ref().map(|b| b.len()),
        o.xhat_b.as_ref().map(|b| b.len()),
    ];
    let res_lens = o.residual.as_ref().map(|(r, s)| (r.len(), s.len()));
    if x.len() != rows * c
        || lens.iter().flatten().any(|&l| l != x.len())
        || o.rstd.as_ref().is_some_and(|r| r.len() != rows)
        || res_lens.is_some_and(|(r, s)| r != x.len() || s != x.len())
    {
        return Err(Error::shape(
            "rmsnorm_fwd_cuda",
            format!(
                "x of {} values in rows of {c}: outputs {lens:?}, rstd {:?}, residual and sum {res_lens:?}",
                x.len(),
                o.rstd.as_ref().map(|r| r.len())
            ),
        ));
    }
    let (kernel, threads) = kernel_for(
        "rmsnorm_fwd_cuda",
        ["rmsnorm_fwd_f32", "rmsnorm_fwd_f32_wide"],
        c,
    )?;
    x.ctx().launch(
        &CUDA,
        kernel,
        (rows as u32, 1, 1),
        (threads, 1, 1),
        0,
        &[
            opt_arg(&o.out),
            o.out_b.map_or(Arg::NULL, |b| b.arg()),
            o.xhat_b.map_or(Arg::NULL, |b| b.arg()),
            opt_arg(&o.rstd),
            x.arg(),
            o.residual.as_ref().map_or(Arg::NULL, |(r, _)| r.arg()),
            o.residual.as_ref().map_or(Arg::NULL, |(_, s)| s.arg()),
            w.arg(),
            Arg::I32(c as i32),
            Arg::F32(eps),
        ],
    )
}

/// dx and dw as `rmsnorm_bwd_cpu`; dw goes through per-block partials of BWD_ROWS_CUDA rows, summed by
/// add_bwd_cuda.
pub fn rmsnorm_bwd_cuda(
    dx: Option<&mut GpuBuf>,
    dw: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    x: &GpuBuf,
    w: &GpuBuf,
    rstd: &GpuBuf,
) -> Result<()> {
    rmsnorm_bwd_cuda_into((dx, None), dw, dout, x, w, rstd, false)
}

/// `rmsnorm_bwd_cuda` adding dx into the gradient dx holds when `accumulate_dx` (the residual stream's), and writing the bf16 rounding of
/// the result into dx_b when given.
pub(super) fn rmsnorm_bwd_cuda_into(
    (dx, dx_b): (Option<&mut GpuBuf>, Option<&mut crate::gpu::Bf16Buf>),
    dw: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    x: &GpuBuf,
    w: &GpuBuf,
    rstd: &GpuBuf,
    accumulate_dx: bool,
) -> Result<()> {
    let (c, rows) = (w.len(), rstd.len());
    let ctx = dout.ctx().clone();
    let blocks = rows.div_ceil(BWD_ROWS_CUDA);
    let mut partial = match dw.is_some() {
        true => Some(ctx.alloc(blocks * c)?),
        false => None,
    };
    let (kernel, threads) = kernel_for(
        "rmsnorm_bwd_cuda",
        ["rmsnorm_bwd_f32", "rmsnorm_bwd_f32_wide"],
        c,
    )?;
    ctx.launch(
        &CUDA,
        kernel,
        (blocks as u32, 1, 1),
        (threads, 1, 1),
        0,
        &[
            opt_arg(&dx),
            dx_b.map_or(Arg::NULL, |b| b.arg()),
            opt_arg(&partial.as_mut()),
            dout.arg(),
            x.arg(),
            w.arg(),
            rstd.arg(),
            Arg::I64(rows as i64),
            Arg::I32(c as i32),
            Arg::I32(BWD_ROWS_CUDA as i32),
            Arg::I32(accumulate_dx as i32),
        ],
    )?;
    match (dw, &partial) {
        (Some(dw), Some(p)) => crate::ops::add::add_bwd_cuda(dw, p),
        _ => Ok(()),
    }
}
