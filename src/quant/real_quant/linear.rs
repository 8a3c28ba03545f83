//! real_quant_linear: E2E-QP's linear, y = x·Ŵᵀ with Ŵ = (q − z)·s dequantized on the fly from a
//! [`QuantizedLinear`]; x [.., K] (R rows once the leading dims are flattened), scales [N, K/g], y [.., N].
//!
//! Only the scales train (official E2E-QP: integer weights and zeros are frozen buffers, formats.md §1.2). There
//! is no rounding in this graph, only dequantization, so ∂ŵ[n, k]/∂s[n, j] = q[n, k] − z[n, j] exactly and
//!   dx = dy·Ŵ                                        [R, K]
//!   dscales[n, j] = Σ_{k in group j} dW[n, k] · (q[n, k] − z[n, j]),   dW = dyᵀ·x  [N, K]
//! dW is an intermediate, handed to nothing else. Both gradients are written (`=`); the tape adds.
//!
//! Memory: Ŵ exists only while one call runs (a [N, K] scratch, dropped at return); the backward keeps the shared
//! packed layer, not Ŵ, and dequantizes again. The scratch then holds dW after dx is done.
//! On the GPU (x and scales on one device) the same steps run there: see `real_quant::cuda`.
use super::QuantizedLinear;
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::ops::gemm::{sgemm, sgemm_ref};
use crate::ops::simd::dot;
use crate::quant::pack::unpack_stream_f32;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Row count R, in features K, out features N, group length g.
#[derive(Clone, Copy, Debug)]
pub struct RealQuantDims {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    pub g: usize,
}

/// Ŵ [N, K] in f64 from the integers w_int [N, K], zeros and scales [N, K/g].
fn dequant_ref(w_int: &[u32], zeros: &[u32], scales: &[f64], d: RealQuantDims) -> Vec<f64> {
    let ng = d.k / d.g;
    (0..d.n * d.k)
        .map(|i| {
            let j = i / d.k * ng + i % d.k / d.g;
            (w_int[i] as f64 - zeros[j] as f64) * scales[j]
        })
        .collect()
}

/// out [R, N] = x [R, K] · Ŵᵀ, in f64.
pub fn real_quant_linear_fwd_ref(
    out: &mut [f64],
    x: &[f64],
    w_int: &[u32],
    zeros: &[u32],
    scales: &[f64],
    d: RealQuantDims,
) {
    let w = dequant_ref(w_int, zeros, scales, d);
    sgemm_ref(false, true, d.rows, d.n, d.k, 1.0, x, &w, 0.0, out);
}

/// dx = dout·Ŵ and dscales[n, j] = Σ_r Σ_{k in j} dout[r, n]·x[r, k]·(q − z), in f64 loops.
#[allow(clippy::too_many_arguments)]
pub fn real_quant_linear_bwd_ref(
    dx: Option<&mut [f64]>,
    dscales: Option<&mut [f64]>,
    dout: &[f64],
    x: &[f64],
    w_int: &[u32],
    zeros: &[u32],
    scales: &[f64],
    d: RealQuantDims,
) {
    if let Some(dx) = dx {
        let w = dequant_ref(w_int, zeros, scales, d);
        sgemm_ref(false, false, d.rows, d.k, d.n, 1.0, dout, &w, 0.0, dx);
    }
    if let Some(ds) = dscales {
        let ng = d.k / d.g;
        ds.fill(0.0);
        for r in 0..d.rows {
            for n in 0..d.n {
                for k in 0..d.k {
                    let j = n * ng + k / d.g;
                    ds[j] += dout[r * d.n + n]
                        * x[r * d.k + k]
                        * (w_int[n * d.k + k] as f64 - zeros[j] as f64);
                }
            }
        }
    }
}

/// dscales [N, K/g] = per-group Σ dw·(q − z) for a given dW [N, K] (the scale gradient of Ŵ). Rows in parallel,
/// each decoding its integers once into a per-thread buffer.
pub fn real_quant_dscales_cpu(
    dscales: &mut [f32],
    dw: &[f32],
    qlin: &QuantizedLinear,
) -> Result<()> {
    qlin.check_host()?;
    let (k, g, ng) = (qlin.in_features(), qlin.group_size(), qlin.groups());
    if dscales.len() != qlin.out_features() * ng || dw.len() != qlin.out_features() * k {
        return Err(Error::shape(
            "real_quant_linear_bwd",
            format!(
                "dscales {} and dW {} values for [{}, {k}] with group {g}",
                dscales.len(),
                dw.len(),
                qlin.out_features()
            ),
        ));
    }
    let wpr = qlin.qweight().len() / qlin.out_features().max(1);
    dscales
        .par_chunks_mut(ng)
        .zip(dw.par_chunks(k))
        .zip(
            qlin.qweight()
                .par_chunks(wpr.max(1))
                .zip(qlin.zeros().par_chunks(ng)),
        )
        .try_for_each_init(
            || vec![0.0f32; k],
            |q, ((ds, dw), (words, z))| {
                unpack_stream_f32(qlin.wbits(), super::INTERNAL_LAYOUT, words, q)?;
                for (((ds, q), dw), &z) in
                    ds.iter_mut().zip(q.chunks_mut(g)).zip(dw.chunks(g)).zip(z)
                {
                    let z = z as f32;
                    q.iter_mut().for_each(|v| *v -= z);
                    *ds = dot(dw, q);
                }
                Ok(())
            },
        )
}

/// out [R, N] = x·Ŵᵀ with Ŵ dequantized from `qlin` with `scales` into a scratch buffer.
pub fn real_quant_linear_fwd_cpu(
    out: &mut [f32],
    x: &[f32],
    qlin: &QuantizedLinear,
    scales: &[f32],
    rows: usize,
) -> Result<()> {
    let (k, n) = (qlin.in_features(), qlin.out_features());
    let mut w = vec![0.0f32; n * k];
    qlin.dequantize_into(scales, &mut w)?;
    sgemm(false, true, rows, n, k, 1.0, x, &w, 0.0, out);
    Ok(())
}

/// Gradients of [`real_quant_linear_fwd_cpu`]; each `Some` slice is overwritten.
pub fn real_quant_linear_bwd_cpu(
    dx: Option<&mut [f32]>,
    dscales: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    qlin: &QuantizedLinear,
    scales: &[f32],
    rows: usize,
) -> Result<()> {
    let (k, n) = (qlin.in_features(), qlin.out_features());
    let mut scratch = vec![0.0f32; n * k];
    if let Some(dx) = dx {
        qlin.dequantize_into(scales, &mut scratch)?;
        sgemm(false, false, rows, k, n, 1.0, dout, &scratch, 0.0, dx);
    }
    if let Some(ds) = dscales {
        sgemm(true, false, n, k, rows, 1.0, dout, x, 0.0, &mut scratch);
        real_quant_dscales_cpu(ds, &scratch, qlin)?;
    }
    Ok(())
}

/// y [.., N] = x [.., K] · Ŵᵀ, Ŵ from `qlin`'s integers and `scales` [N, K/g] (a Var: the trainable copy, whose
/// initial value is `qlin.scales()`). Gradients reach x and scales only.
pub fn real_quant_linear(
    tape: &mut Tape,
    x: Var,
    qlin: &QuantizedLinear,
    scales: Var,
) -> Result<Var> {
    let sx = tape.value(x).shape().to_vec();
    let ss = tape.value(scales).shape().to_vec();
    let (k, n, ng) = (qlin.in_features(), qlin.out_features(), qlin.groups());
    if sx.last() != Some(&k) || ss != [n, ng] {
        return Err(Error::shape(
            "real_quant_linear",
            format!("x {sx:?}, scales {ss:?}: need x [.., {k}] and scales [{n}, {ng}] for layer [{n}, {k}]"),
        ));
    }
    let rows = sx[..sx.len() - 1].iter().product();
    let mut so = sx;
    *so.last_mut().expect("x has a last dim") = n;
    let backward = RealQuantLinearBackward {
        qlin: qlin.clone(),
        rows,
        #[cfg(feature = "cuda")]
        x_b: None,
    };
    #[cfg(feature = "cuda")]
    if let Some(ctx) =
        crate::gpu::device_of("real_quant_linear", &[tape.value(x), tape.value(scales)])?
    {
        let mut out = ctx.alloc(rows * n)?;
        let op = "real_quant_linear";
        // In the bf16 mode x's bf16 copy is the tape's (made once for the linears reading the same x, or written
        // by the op that made x) and is kept for the backward's dscales product.
        let x_b = match ctx.matmul_bf16() {
            true => {
                let xb = tape.bf16_copy(x)?;
                let scales = tape.value(scales).gpu(op)?;
                super::cuda::real_quant_linear_fwd_bf16_cuda(&mut out, &xb, qlin, scales, rows)?;
                Some(xb)
            }
            false => {
                let (vx, vs) = (tape.value(x).gpu(op)?, tape.value(scales).gpu(op)?);
                super::cuda::real_quant_linear_fwd_cuda(&mut out, vx, qlin, vs, rows)?;
                None
            }
        };
        let backward = RealQuantLinearBackward {
            x_b: x_b.filter(|_| tape.needs_grad(&[x, scales])),
            ..backward
        };
        let out = Tensor::from_gpu(&so, out)?;
        return Ok(tape.push_op(out, &[x, scales], Box::new(backward)));
    }
    let mut out = tape.alloc(&so);
    real_quant_linear_fwd_cpu(
        out.f32s_mut("real_quant_linear")?,
        tape.value(x).f32s("real_quant_linear")?,
        qlin,
        tape.value(scales).f32s("real_quant_linear")?,
        rows,
    )?;
    Ok(tape.push_op(out, &[x, scales], Box::new(backward)))
}

struct RealQuantLinearBackward {
    /// Shares the packed layer (Arc); its own scales are unused (the tape passes the scales Var's value).
    qlin: QuantizedLinear,
    rows: usize,
    /// x's bf16 copy from the forward (GPU bf16 mode).
    #[cfg(feature = "cuda")]
    x_b: Option<std::sync::Arc<crate::gpu::Bf16Buf>>,
}

impl Backward for RealQuantLinearBackward {
    fn name(&self) -> &'static str {
        "real_quant_linear"
    }
    /// In the bf16 mode (x's bf16 copy kept) both products read dout's bf16 copy only.
    #[cfg(feature = "cuda")]
    fn reads_dout_as_bf16(&self) -> bool {
        self.x_b.is_some()
    }
    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        let op = "real_quant_linear_bwd";
        let [dx, ds] = d else {
            return Err(Error::Autograd(format!(
                "{op}: expected 2 inputs, got {}",
                d.len()
            )));
        };
        #[cfg(feature = "cuda")]
        if let crate::tensor::Storage::CudaBf16(doutb) = dout.storage() {
            return super::cuda::real_quant_linear_bwd_bf16_cuda(
                dx.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                ds.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                doutb,
                (inputs[0].gpu(op)?, self.x_b.as_deref()),
                &self.qlin,
                inputs[1].gpu(op)?,
                self.rows,
            );
        }
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            return super::cuda::real_quant_linear_bwd_cuda(
                dx.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                ds.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dout.gpu(op)?,
                (inputs[0].gpu(op)?, self.x_b.as_deref()),
                &self.qlin,
                inputs[1].gpu(op)?,
                self.rows,
            );
        }
        real_quant_linear_bwd_cpu(
            dx.as_mut().map(|t| t.f32s_mut(op)).transpose()?,
            ds.as_mut().map(|t| t.f32s_mut(op)).transpose()?,
            dout.f32s(op)?,
            inputs[0].f32s(op)?,
            &self.qlin,
            inputs[1].f32s(op)?,
            self.rows,
        )
    }
}
