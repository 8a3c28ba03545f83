//! linear: y = x·Wᵀ + b, with x [.., K] (R rows once the leading dims are flattened), W [N, K] (the PyTorch
//! nn.Linear layout), optional b [N]; y [.., N].
//!
//! Backward: dx = dy·W [R, K]; dW = dyᵀ·x [N, K], summed over all R rows; db = column sums of dy (through
//! `ops::reduce_rows`). All three products go through `sgemm`; each gradient is written (`=`), the tape adds.
//! On the GPU the products are cuBLAS SGEMMs (`GpuContext::sgemm`, same row-major contract, true f32), the bias
//! is added by `add_fwd_cuda` and db is `add_bwd_cuda`'s column sums. In the context's bf16 mode the products
//! take bf16-rounded operands instead (`bf16.rs`).
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf};
use crate::ops::gemm::{sgemm, sgemm_ref};
use crate::ops::reduce_rows;
use crate::tensor::Tensor;
use rayon::prelude::*;

#[cfg(feature = "cuda")]
mod bf16;
#[cfg(feature = "cuda")]
pub use bf16::{cast_bf16_cuda, cast_bf16_into_cuda, CUDA};

/// Row count R, in features K, out features N: the dims every function below takes.
#[derive(Clone, Copy, Debug)]
pub struct LinearDims {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

/// out[R, N] = x[R, K]·w[N, K]ᵀ + bias, in f64.
pub fn linear_fwd_ref(out: &mut [f64], x: &[f64], w: &[f64], bias: Option<&[f64]>, d: LinearDims) {
    let LinearDims { rows, k, n } = d;
    for r in 0..rows {
        for j in 0..n {
            let dot: f64 = (0..k).map(|p| x[r * k + p] * w[j * k + p]).sum();
            out[r * n + j] = dot + bias.map_or(0.0, |b| b[j]);
        }
    }
}

/// Gradients of `linear_fwd_ref` for dout [R, N]: dx = dout·w, dw = doutᵀ·x, db = column sums of dout.
pub fn linear_bwd_ref(
    dx: Option<&mut [f64]>,
    dw: Option<&mut [f64]>,
    db: Option<&mut [f64]>,
    dout: &[f64],
    x: &[f64],
    w: &[f64],
    d: LinearDims,
) {
    let LinearDims { rows, k, n } = d;
    if let Some(dx) = dx {
        sgemm_ref(false, false, rows, k, n, 1.0, dout, w, 0.0, dx);
    }
    if let Some(dw) = dw {
        sgemm_ref(true, false, n, k, rows, 1.0, dout, x, 0.0, dw);
    }
    if let Some(db) = db {
        for (j, db) in db.iter_mut().enumerate() {
            *db = (0..rows).map(|r| dout[r * n + j]).sum();
        }
    }
}

/// out[R, N] = x[R, K]·w[N, K]ᵀ + bias. With a bias, out starts as the bias rows and the GEMM adds into it
/// (beta = 1), saving a pass over out.
pub fn linear_fwd_cpu(out: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, d: LinearDims) {
    let LinearDims { rows, k, n } = d;
    let beta = match bias {
        // (N = 0: out is empty and there is nothing to seed.)
        Some(b) if n > 0 => {
            out.par_chunks_mut(n).for_each(|o| o.copy_from_slice(b));
            1.0
        }
        _ => 0.0,
    };
    sgemm(false, true, rows, n, k, 1.0, x, w, beta, out);
}

/// Gradients of `linear_fwd_cpu`; each `Some` slice is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_cpu(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    d: LinearDims,
) {
    let LinearDims { rows, k, n } = d;
    if let Some(dx) = dx {
        sgemm(false, false, rows, k, n, 1.0, dout, w, 0.0, dx);
    }
    if let Some(dw) = dw {
        sgemm(true, false, n, k, rows, 1.0, dout, x, 0.0, dw);
    }
    if let Some(db) = db {
        // reduce_rows walks rows of db.len() values: nothing to do (and no zero-length chunks) when N = 0.
        if n > 0 {
            reduce_rows(db, dout);
        }
    }
}

/// out[R, N] = x[R, K]·w[N, K]ᵀ (+ bias broadcast over the rows).
#[cfg(feature = "cuda")]
pub fn linear_fwd_cuda(
    out: &mut GpuBuf,
    x: &GpuBuf,
    w: &GpuBuf,
    bias: Option<&GpuBuf>,
    d: LinearDims,
) -> Result<()> {
    let LinearDims { rows, k, n } = d;
    let ctx = x.ctx().clone();
    if ctx.matmul_bf16() {
        let (xb, wb) = (cast_bf16_cuda(x)?, cast_bf16_cuda(w)?);
        ctx.gemm_bf16(false, true, rows, n, k, 1.0, &xb, &wb, 0.0, out)?;
    } else {
        ctx.sgemm(false, true, rows, n, k, 1.0, x, w, 0.0, out)?;
    }
    match bias {
        Some(b) if n > 0 => {
            // In place: each thread reads out[i] and b[i % n] and then writes out[i].
            let n_out = out.len();
            ctx.launch_1d(
                &crate::ops::add::CUDA,
                "add_fwd_f32",
                n_out,
                &[
                    out.arg(),
                    out.arg(),
                    b.arg(),
                    Arg::I64(n_out as i64),
                    Arg::I64(n as i64),
                ],
            )
        }
        _ => Ok(()),
    }
}

/// Gradients of `linear_fwd_cuda`; each `Some` buffer is overwritten.
#[cfg(feature = "cuda")]
pub fn linear_bwd_cuda(
    dx: Option<&mut GpuBuf>,
    dw: Option<&mut GpuBuf>,
    db: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    x: &GpuBuf,
    w: &GpuBuf,
    d: LinearDims,
) -> Result<()> {
    let LinearDims { rows, k, n } = d;
    let ctx = dout.ctx().clone();
    if ctx.matmul_bf16() {
        let doutb = cast_bf16_cuda(dout)?;
        if let Some(dx) = dx {
            let wb = cast_bf16_cuda(w)?;
            ctx.gemm_bf16(false, false, rows, k, n, 1.0, &doutb, &wb, 0.0, dx)?;
        }
        if let Some(dw) = dw {
            let xb = cast_bf16_cuda(x)?;
            ctx.gemm_bf16(true, false, n, k, rows, 1.0, &doutb, &xb, 0.0, dw)?;
        }
    } else {
        if let Some(dx) = dx {
            ctx.sgemm(false, false, rows, k, n, 1.0, dout, w, 0.0, dx)?;
        }
        if let Some(dw) = dw {
            ctx.sgemm(true, false, n, k, rows, 1.0, dout, x, 0.0, dw)?;
        }
    }
    match db {
        Some(db) if n > 0 => crate::ops::add::add_bwd_cuda(db, dout),
        _ => Ok(()),
    }
}

pub fn linear(tape: &mut Tape, x: Var, w: Var, bias: Option<Var>) -> Result<Var> {
    #[cfg(feature = "cuda")]
    if tape.norm_fold(x).is_some() {
        return Err(Error::invalid(
            "linear",
            "x is a folded norm's output (ops::rmsnorm::fold), whose γ gets its gradient only through \
             fake-quantized bf16 linears",
        ));
    }
    let sx = tape.value(x).shape().to_vec();
    let sw = tape.value(w).shape().to_vec();
    let sb = bias.map(|b| tape.value(b).shape().to_vec());
    let (Some(&k), [n, kw]) = (sx.last(), sw.as_slice()) else {
        return Err(Error::shape(
            "linear",
            format!("x {sx:?} must have at least 1 dim and w {sw:?} exactly 2 ([N, K])"),
        ));
    };
    let n = *n;
    if k != *kw || sb.as_ref().is_some_and(|sb| *sb != [n]) {
        return Err(Error::shape(
            "linear",
            format!("x {sx:?}, w {sw:?}, bias {sb:?}: need x [.., K], w [N, K], bias [N]"),
        ));
    }
    let dims = LinearDims {
        rows: sx[..sx.len() - 1].iter().product(),
        k,
        n,
    };
    let mut so = sx.clone();
    *so.last_mut().expect("x has a last dim") = n;
    let inputs: Vec<Var> = [x, w].into_iter().chain(bias).collect();
    #[cfg(feature = "cuda")]
    {
        let values: Vec<&Tensor> = inputs.iter().map(|&v| tape.value(v)).collect();
        if let Some(ctx) = crate::gpu::device_of("linear", &values)? {
            let mut out = ctx.alloc(dims.rows * n)?;
            linear_fwd_cuda(
                &mut out,
                tape.value(x).gpu("linear")?,
                tape.value(w).gpu("linear")?,
                bias.map(|b| tape.value(b).gpu("linear")).transpose()?,
                dims,
            )?;
            let out = Tensor::from_gpu(&so, out)?;
            return Ok(tape.push_op(out, &inputs, Box::new(LinearBackward { dims })));
        }
    }
    let mut out = tape.alloc(&so);
    linear_fwd_cpu(
        out.f32s_mut("linear")?,
        tape.value(x).f32s("linear")?,
        tape.value(w).f32s("linear")?,
        bias.map(|b| tape.value(b).f32s("linear")).transpose()?,
        dims,
    );
    Ok(tape.push_op(out, &inputs, Box::new(LinearBackward { dims })))
}

/// The f32 buffer of a gradient slot the tape filled (Some when that input needs a gradient).
fn slot(t: &mut Option<Tensor>) -> Result<Option<&mut [f32]>> {
    t.as_mut().map(|t| t.f32s_mut("linear_bwd")).transpose()
}

/// The device buffer of a gradient slot the tape filled.
#[cfg(feature = "cuda")]
fn gpu_slot(t: &mut Option<Tensor>) -> Result<Option<&mut GpuBuf>> {
    t.as_mut().map(|t| t.gpu_mut("linear_bwd")).transpose()
}

struct LinearBackward {
    dims: LinearDims,
}

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }
    /// Every kernel and GEMM of this backward writes each element of the gradients it is given.
    fn overwrites_dinputs(&self) -> bool {
        true
    }
    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            let op = "linear_bwd";
            let (dxw, db) = d.split_at_mut(2);
            let (dx, dw) = dxw.split_at_mut(1);
            let db = match db.first_mut() {
                Some(t) => gpu_slot(t)?,
                None => None,
            };
            return linear_bwd_cuda(
                gpu_slot(&mut dx[0])?,
                gpu_slot(&mut dw[0])?,
                db,
                dout.gpu(op)?,
                inputs[0].gpu(op)?,
                inputs[1].gpu(op)?,
                self.dims,
            );
        }
        let (x, w) = (inputs[0].f32s("linear_bwd")?, inputs[1].f32s("linear_bwd")?);
        let (dxw, db) = d.split_at_mut(2);
        let (dx, dw) = dxw.split_at_mut(1);
        let db = match db.first_mut() {
            Some(t) => slot(t)?,
            None => None,
        };
        linear_bwd_cpu(
            slot(&mut dx[0])?,
            slot(&mut dw[0])?,
            db,
            dout.f32s("linear_bwd")?,
            x,
            w,
            self.dims,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests;
