//! rmsnorm (Llama): y = x * rstd * w per row of C, rstd = 1 / sqrt(mean(x^2) + eps).
//!
//! The forward saves rstd per row (llm.c caches it the same way), so the backward needs no second
//! reduction over x for it. With xhat = x * rstd and m = mean_j(dy_j * w_j * xhat_j):
//!   dx_i = rstd * (w_i * dy_i - xhat_i * m)        dw_i = sum over rows of dy_i * xhat_i
//! Gradients are written (`=`) into the tape's fresh buffers; the tape does the `+=` into the parameter grad.
//! dw is reduced over fixed blocks of rows and then in block order, so it is the same for any thread count.
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::ops::simd;
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::f32x8;

/// Rows per backward task: each task returns one partial dw of C values, summed afterwards in order.
const BWD_ROWS: usize = 32;

pub fn rmsnorm_fwd_ref(out: &mut [f64], rstd: &mut [f64], x: &[f64], w: &[f64], eps: f64) {
    let c = w.len();
    for ((o, r), x) in out
        .chunks_exact_mut(c)
        .zip(rstd.iter_mut())
        .zip(x.chunks_exact(c))
    {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / c as f64;
        *r = 1.0 / (ms + eps).sqrt();
        for i in 0..c {
            o[i] = x[i] * *r * w[i];
        }
    }
}

pub fn rmsnorm_bwd_ref(
    dx: &mut [f64],
    dw: &mut [f64],
    dout: &[f64],
    x: &[f64],
    w: &[f64],
    rstd: &[f64],
) {
    let c = w.len();
    dw.fill(0.0);
    for (row, &r) in rstd.iter().enumerate() {
        let (x, dy) = (&x[row * c..][..c], &dout[row * c..][..c]);
        let m = (0..c).map(|i| dy[i] * w[i] * x[i] * r).sum::<f64>() / c as f64;
        for i in 0..c {
            dx[row * c + i] = r * (w[i] * dy[i] - x[i] * r * m);
            dw[i] += dy[i] * x[i] * r;
        }
    }
}

pub fn rmsnorm_fwd_cpu(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let c = w.len();
    let n = c / 8 * 8;
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .for_each(|((o, r), x)| {
            *r = 1.0 / (simd::sum_squares(x) / c as f32 + eps).sqrt();
            let rv = f32x8::splat(*r);
            for ((o, x), w) in o[..n]
                .chunks_exact_mut(8)
                .zip(x[..n].chunks_exact(8))
                .zip(w[..n].chunks_exact(8))
            {
                o.copy_from_slice((simd::load(x) * rv * simd::load(w)).as_array_ref());
            }
            for i in n..c {
                o[i] = x[i] * *r * w[i];
            }
        });
}

/// Either gradient may be skipped (None) when its input does not need one.
pub fn rmsnorm_bwd_cpu(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
) {
    let c = w.len();
    let n = c / 8 * 8;
    let block = BWD_ROWS * c;
    let blocks = rstd.len().div_ceil(BWD_ROWS);
    let dx_blocks: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => dx.chunks_mut(block).map(Some).collect(),
        None => (0..blocks).map(|_| None).collect(),
    };
    let want_dw = dw.is_some();
    let partials: Vec<Vec<f32>> = dx_blocks
        .into_par_iter()
        .zip(dout.par_chunks(block).zip(x.par_chunks(block)))
        .zip(rstd.par_chunks(BWD_ROWS))
        .map(|((mut dx, (dout, x)), rstd)| {
            let mut dw = if want_dw { vec![0.0; c] } else { Vec::new() };
            for (row, &r) in rstd.iter().enumerate() {
                let (x, dy) = (&x[row * c..][..c], &dout[row * c..][..c]);
                if let Some(dx) = dx.as_deref_mut() {
                    // k = rstd^2 * m = rstd^3 * sum(dy * w * x) / C, so dx_i = rstd * w_i * dy_i - k * x_i.
                    let mut acc = f32x8::ZERO;
                    for i in (0..n).step_by(8) {
                        let wdy = simd::load(&w[i..]) * simd::load(&dy[i..]);
                        acc = wdy.mul_add(simd::load(&x[i..]), acc);
                    }
                    let s = acc.reduce_add() + (n..c).map(|i| w[i] * dy[i] * x[i]).sum::<f32>();
                    let k = r * r * r * s / c as f32;
                    let (rv, kv) = (f32x8::splat(r), f32x8::splat(k));
                    let dx = &mut dx[row * c..][..c];
                    for i in (0..n).step_by(8) {
                        let wdy = simd::load(&w[i..]) * simd::load(&dy[i..]);
                        let v = (rv * wdy) - kv * simd::load(&x[i..]);
                        dx[i..i + 8].copy_from_slice(v.as_array_ref());
                    }
                    for i in n..c {
                        dx[i] = r * w[i] * dy[i] - k * x[i];
                    }
                }
                if want_dw {
                    let rv = f32x8::splat(r);
                    for i in (0..n).step_by(8) {
                        let v = (simd::load(&dy[i..]) * simd::load(&x[i..]))
                            .mul_add(rv, simd::load(&dw[i..]));
                        dw[i..i + 8].copy_from_slice(v.as_array_ref());
                    }
                    for i in n..c {
                        dw[i] += dy[i] * x[i] * r;
                    }
                }
            }
            dw
        })
        .collect();
    if let Some(dw) = dw {
        dw.fill(0.0);
        for p in &partials {
            simd::add_assign(dw, p);
        }
    }
}

/// Checks rmsnorm's operands for `op`; returns x's shape.
fn check_operands(tape: &Tape, op: &'static str, x: Var, w: Var, eps: f32) -> Result<Vec<usize>> {
    let (sx, sw) = (tape.value(x).shape(), tape.value(w).shape());
    if sx.is_empty() || sw.len() != 1 || sw[0] != sx[sx.len() - 1] || sw[0] == 0 {
        return Err(Error::shape(
            op,
            format!(
                "x {sx:?} and weight {sw:?}: weight must be [C] with C the last dim of x, C > 0"
            ),
        ));
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ));
    }
    Ok(sx.to_vec())
}

pub fn rmsnorm(tape: &mut Tape, x: Var, w: Var, eps: f32) -> Result<Var> {
    let sx = check_operands(tape, "rmsnorm", x, w, eps)?;
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("rmsnorm", &[tape.value(x), tape.value(w)])? {
        return rmsnorm_cuda(tape, &ctx, (x, None), w, eps).map(|(_, y)| y);
    }
    let rows = tape.value(x).numel() / sx[sx.len() - 1];
    let mut out = tape.alloc(&sx);
    let mut rstd = vec![0.0; rows];
    rmsnorm_fwd_cpu(
        out.f32s_mut("rmsnorm")?,
        &mut rstd,
        tape.value(x).f32s("rmsnorm")?,
        tape.value(w).f32s("rmsnorm")?,
        eps,
    );
    let rstd = Tensor::from_vec(&[rows], rstd)?;
    Ok(tape.push_op(out, &[x, w], Box::new(RmsnormBackward::new(rstd, false))))
}

/// (x + res, rmsnorm(x + res)·w): the residual stream's add and the norm after it, as `add` then `rmsnorm` (the same
/// values and gradients), in one pass over the rows on the GPU (x + res is not read back).
pub fn add_rmsnorm(tape: &mut Tape, x: Var, res: Var, w: Var, eps: f32) -> Result<(Var, Var)> {
    #[cfg(feature = "cuda")]
    {
        let (vx, vr, vw) = (tape.value(x), tape.value(res), tape.value(w));
        let f32s = [vx, vr]
            .iter()
            .all(|t| t.dtype() == crate::tensor::DType::F32);
        if f32s && vx.shape() == vr.shape() {
            if let Some(ctx) = crate::gpu::device_of("add_rmsnorm", &[vx, vr, vw])? {
                check_operands(tape, "add_rmsnorm", x, w, eps)?;
                return rmsnorm_cuda(tape, &ctx, (x, Some(res)), w, eps);
            }
        }
    }
    let sum = crate::ops::add::add(tape, x, res)?;
    Ok((sum, rmsnorm(tape, sum, w, eps)?))
}

/// The GPU forward of `rmsnorm` on x, or with `res` of `add_rmsnorm` on x + res; returns (the sum's entry, or x;
/// the norm's). In the bf16 mode the output is a GEMM operand next: its bf16 copy is written in the same pass.
#[cfg(feature = "cuda")]
fn rmsnorm_cuda(
    tape: &mut Tape,
    ctx: &std::sync::Arc<crate::gpu::GpuContext>,
    (x, res): (Var, Option<Var>),
    w: Var,
    eps: f32,
) -> Result<(Var, Var)> {
    let shape = tape.value(x).shape().to_vec();
    let numel = tape.value(x).numel();
    let rows = numel / shape[shape.len() - 1];
    let (mut out, mut rstd) = (ctx.alloc(numel)?, ctx.alloc(rows)?);
    let mut out_b = ctx
        .matmul_bf16()
        .then(|| ctx.alloc_bf16(numel))
        .transpose()?;
    let mut sum = res.map(|_| ctx.alloc(numel)).transpose()?;
    let residual = match (res, sum.as_mut()) {
        (Some(r), Some(s)) => Some((tape.value(r).gpu("add_rmsnorm")?, s)),
        _ => None,
    };
    let outs = FwdOutputs {
        out: Some(&mut out),
        out_b: out_b.as_mut(),
        xhat_b: None,
        rstd: Some(&mut rstd),
        residual,
    };
    rmsnorm_fwd_cuda_into(
        outs,
        tape.value(x).gpu("rmsnorm")?,
        tape.value(w).gpu("rmsnorm")?,
        eps,
    )?;
    let normed = match (res, sum) {
        (Some(r), Some(s)) => {
            crate::ops::add::push_same_shape_add(tape, x, r, Tensor::from_gpu(&shape, s)?)
        }
        _ => x,
    };
    let rstd = Tensor::from_gpu(&[rows], rstd)?;
    let out = Tensor::from_gpu(&shape, out)?;
    let twin = tape.wants_bf16_twin(normed);
    let y = tape.push_op(
        out,
        &[normed, w],
        Box::new(RmsnormBackward::new(rstd, twin)),
    );
    if let Some(b) = out_b {
        tape.set_bf16_copy(y, b);
    }
    Ok((normed, y))
}

struct RmsnormBackward {
    /// 1/rms per row, where the forward ran (host or device).
    rstd: Tensor,
    /// Whether the GPU backward writes dx's bf16 twin (`Tape::wants_bf16_twin`), and the twin it wrote.
    #[cfg(feature = "cuda")]
    twin: Option<std::sync::Mutex<Option<crate::gpu::Bf16Buf>>>,
}

impl RmsnormBackward {
    fn new(rstd: Tensor, twin: bool) -> RmsnormBackward {
        #[cfg(not(feature = "cuda"))]
        let _ = twin;
        RmsnormBackward {
            rstd,
            #[cfg(feature = "cuda")]
            twin: twin.then(|| std::sync::Mutex::new(None)),
        }
    }
}

impl Backward for RmsnormBackward {
    fn name(&self) -> &'static str {
        "rmsnorm"
    }
    /// Every kernel and GEMM of this backward writes each element of the gradients it is given.
    fn overwrites_dinputs(&self) -> bool {
        true
    }
    /// On the GPU the kernel can add dx into x's gradient so far (the residual stream's).
    fn accumulates(&self, i: usize) -> bool {
        i == 0 && self.rstd.is_cuda()
    }
    #[cfg(feature = "cuda")]
    fn take_bf16_twin(&self, i: usize) -> Option<crate::gpu::Bf16Buf> {
        match (i, &self.twin) {
            (0, Some(t)) => t.lock().unwrap_or_else(|e| e.into_inner()).take(),
            _ => None,
        }
    }
    fn backward(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        self.backward_into(inputs, output, dout, d, &[false; 2])
    }
    fn backward_into(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
        accumulate: &[bool],
    ) -> Result<()> {
        let (dx, dw) = d.split_at_mut(1);
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            let op = "rmsnorm_bwd";
            let dx = dx[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?;
            let mut twin = match (&self.twin, &dx) {
                (Some(_), Some(d)) => Some(d.ctx().alloc_bf16(d.len())?),
                _ => None,
            };
            rmsnorm_bwd_cuda_into(
                (dx, twin.as_mut()),
                dw[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dout.gpu(op)?,
                inputs[0].gpu(op)?,
                inputs[1].gpu(op)?,
                self.rstd.gpu(op)?,
                accumulate[0],
            )?;
            if let (Some(slot), Some(b)) = (&self.twin, twin) {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
            }
            return Ok(());
        }
        if accumulate[0] {
            return Err(Error::Autograd(
                "rmsnorm_bwd: dx is added into a gradient only on the GPU".into(),
            ));
        }
        rmsnorm_bwd_cpu(
            dx[0]
                .as_mut()
                .map(|t| t.f32s_mut("rmsnorm_bwd"))
                .transpose()?,
            dw[0]
                .as_mut()
                .map(|t| t.f32s_mut("rmsnorm_bwd"))
                .transpose()?,
            dout.f32s("rmsnorm_bwd")?,
            inputs[0].f32s("rmsnorm_bwd")?,
            inputs[1].f32s("rmsnorm_bwd")?,
            self.rstd.f32s("rmsnorm_bwd")?,
        );
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::{rmsnorm_bwd_cuda, rmsnorm_fwd_cuda, CUDA};
#[cfg(feature = "cuda")]
use cuda::{rmsnorm_bwd_cuda_into, rmsnorm_fwd_cuda_into, FwdOutputs};
#[cfg(feature = "cuda")]
mod fold;
#[cfg(feature = "cuda")]
pub use fold::{norm_fold_bwd_cuda, rmsnorm_folded, NormFold};

#[cfg(test)]
mod tests;
