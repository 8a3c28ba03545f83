//! fake_quant_linear: y = x·ŵᵀ with ŵ = fake_quant(w, scales, zeros), the Block-AP linear; x [.., K], w [N, K],
//! scales and zeros [N, K/g], y [.., N].
//!
//! Everywhere but the GPU's bf16 mode (`GpuContext::set_matmul_bf16`) this is `fake_quant` then `linear`, so
//! values and gradients are theirs. In the bf16 mode one kernel writes ŵ straight to bf16 and no f32 ŵ is made:
//!   forward   ŵ_b = bf16(fake_quant(w)) (`fake_quant_fwd_bf16`), x_b = bf16(x), y = x_b·ŵ_bᵀ (f32 accumulation)
//!   backward  dy_b = bf16(dy); dx = dy_b·ŵ_b; dŵ_b = bf16(dy_bᵀ·x_b) (f32 accumulation, rounded once, as
//!             torch.autocast's weight gradient), and fake_quant's backward on dŵ_b gives dw, dscales, dzeros (the
//!             formulas of this module's parent header)
//! ŵ_b and x_b are kept for the backward (2 bytes per weight and per input value), as torch.autocast keeps the
//! bf16 copies it multiplies; x_b is the tape's `bf16_copy`, shared by the linears that read the same x (q, k, v).
//! Gradients are written (`=`), except dx, which the GEMM adds (beta = 1) into x's gradient when the tape hands
//! over the sum so far (`Backward::accumulates`).
//! A weight the tape defers (`Tape::defer_fake_quant`: the bf16 mode's fused optimizer step) is not quantized
//! here: its ŵ_b is the one the optimizer wrote with the last update (made here only when there is none yet), and
//! the backward leaves dŵ_b in the weight's `DeferredGrad` and no gradient for scales and zeros (the optimizer does
//! fake-quant's backward).
use super::{fake_quant, QuantConfig};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::ops::linear::linear;

pub fn fake_quant_linear(
    tape: &mut Tape,
    x: Var,
    w: Var,
    scales: Var,
    zeros: Var,
    cfg: QuantConfig,
) -> Result<Var> {
    fake_quant_linear_to(tape, x, w, scales, zeros, cfg, false)
}

/// [`fake_quant_linear`] whose output is bf16 in the GPU's bf16 mode (the MLP's gate and up, which only the
/// bf16 SwiGLU reads, as torch.autocast keeps them); elsewhere the same f32 output.
pub fn fake_quant_linear_bf16_out(
    tape: &mut Tape,
    x: Var,
    w: Var,
    scales: Var,
    zeros: Var,
    cfg: QuantConfig,
) -> Result<Var> {
    fake_quant_linear_to(tape, x, w, scales, zeros, cfg, true)
}

fn fake_quant_linear_to(
    tape: &mut Tape,
    x: Var,
    w: Var,
    scales: Var,
    zeros: Var,
    cfg: QuantConfig,
    out_bf16: bool,
) -> Result<Var> {
    #[cfg(not(feature = "cuda"))]
    let _ = out_bf16;
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of(
        "fake_quant_linear",
        &[
            tape.value(x),
            tape.value(w),
            tape.value(scales),
            tape.value(zeros),
        ],
    )? {
        if ctx.matmul_bf16() {
            return bf16::fake_quant_linear_bf16(tape, x, w, scales, zeros, cfg, out_bf16);
        }
        if tape.deferred_fake_quant(w).is_some() {
            return Err(crate::error::Error::invalid(
                "fake_quant_linear",
                "a weight deferred to the fused optimizer step needs the bf16 mode (set_matmul_bf16)",
            ));
        }
    }
    let wq = fake_quant(tape, w, scales, zeros, cfg)?;
    linear(tape, x, wq, None)
}

#[cfg(feature = "cuda")]
mod bf16 {
    use super::super::{fake_quant_bwd_cuda, fake_quant_fwd_bf16_cuda, QuantConfig};
    use crate::autograd::{Backward, DeferredGrad, Tape, Var};
    use crate::error::{Error, Result};
    use crate::gpu::Bf16Buf;
    use crate::ops::linear::cast_bf16_cuda;
    use crate::ops::rmsnorm::norm_fold_bwd_cuda;
    use crate::tensor::Tensor;
    use std::sync::Arc;

    const OP: &str = "fake_quant_linear";

    /// The device buffer of a gradient slot the tape filled.
    fn slot(t: &mut Option<Tensor>) -> Result<Option<&mut crate::gpu::GpuBuf>> {
        t.as_mut()
            .map(|t| t.gpu_mut("fake_quant_linear_bwd"))
            .transpose()
    }

    pub fn fake_quant_linear_bf16(
        tape: &mut Tape,
        x: Var,
        w: Var,
        scales: Var,
        zeros: Var,
        cfg: QuantConfig,
        out_bf16: bool,
    ) -> Result<Var> {
        let (sx, sw) = (
            tape.value(x).shape().to_vec(),
            tape.value(w).shape().to_vec(),
        );
        let (n, k, g) = cfg.dims(&sw)?;
        let (ss, sz) = (tape.value(scales).shape(), tape.value(zeros).shape());
        if sx.last() != Some(&k) || ss != [n, k / g] || sz != [n, k / g] {
            return Err(Error::shape(
                OP,
                format!(
                    "x {sx:?}, w {sw:?}, scales {ss:?}, zeros {sz:?}: need x [.., {k}], scales and zeros \
                     [{n}, {}]",
                    k / g
                ),
            ));
        }
        let deferred = tape.deferred_fake_quant(w);
        if deferred.is_some_and(|d| d != (scales, zeros)) {
            return Err(Error::invalid(
                OP,
                format!(
                    "weight entry {} is deferred with other scales and zeros than entries {}, {}",
                    w.index(),
                    scales.index(),
                    zeros.index()
                ),
            ));
        }
        let rows = tape.value(x).numel() / k;
        let ctx = tape.value(w).gpu(OP)?.ctx().clone();
        let x_bf16 = tape.value(x).dtype() == crate::tensor::DType::BF16;
        let wq = match tape.fake_quant_copy(w) {
            Some(wq) => wq,
            None => {
                let mut wq = ctx.alloc_bf16(n * k)?;
                fake_quant_fwd_bf16_cuda(
                    &mut wq,
                    tape.value(w).gpu(OP)?,
                    tape.value(scales).gpu(OP)?,
                    tape.value(zeros).gpu(OP)?,
                    g,
                    cfg.qmax(),
                )?;
                let wq = Arc::new(wq);
                if deferred.is_some() {
                    tape.set_fake_quant_copy(w, wq.clone());
                }
                wq
            }
        };
        let xb = tape.bf16_copy(x)?;
        // A folded norm's output (ops::rmsnorm::fold): the dŵ GEMM reads x̂_b and γ is a fifth input.
        let fold = tape.norm_fold(x);
        if fold
            .as_ref()
            .is_some_and(|f| tape.value(f.gamma).numel() != k)
        {
            return Err(Error::shape(
                OP,
                format!("the folded norm's γ is not [{k}]"),
            ));
        }
        let mut so = sx;
        *so.last_mut().expect("x has a last dim") = n;
        let out = match out_bf16 {
            true => {
                let mut out = ctx.alloc_bf16(rows * n)?;
                ctx.gemm_bf16_to_bf16(false, true, rows, n, k, 1.0, &xb, &wq, &mut out)?;
                Tensor::from_gpu_bf16(&so, out)?
            }
            false => {
                let mut out = ctx.alloc(rows * n)?;
                ctx.gemm_bf16(false, true, rows, n, k, 1.0, &xb, &wq, 0.0, &mut out)?;
                Tensor::from_gpu(&so, out)?
            }
        };
        let mut inputs = vec![x, w, scales, zeros];
        inputs.extend(fold.as_ref().map(|f| f.gamma));
        let saved = match tape.needs_grad(&inputs) {
            true => Some((wq, fold.as_ref().map_or(xb, |f| f.xhat.clone()))),
            false => None,
        };
        Ok(tape.push_op(
            out,
            &inputs,
            Box::new(FakeQuantLinearBackward {
                rows,
                n,
                k,
                g,
                qmax: cfg.qmax(),
                deferred: tape.fake_quant_grad_slot(w),
                x_bf16,
                folded: fold.is_some(),
                saved,
            }),
        ))
    }

    struct FakeQuantLinearBackward {
        rows: usize,
        n: usize,
        k: usize,
        g: usize,
        qmax: f32,
        /// Where dŵ_b goes for a deferred weight, whose scales and zeros get no gradient (module docs).
        deferred: Option<DeferredGrad>,
        /// x is a bf16 value (the MLP's SwiGLU output): its gradient is bf16, written by the GEMM.
        x_bf16: bool,
        /// x is a folded norm's output: the fifth input is γ, x_b below is x̂_b, and the dŵ GEMM's G becomes
        /// dŵ and γ's gradient in `norm_fold_bwd_cuda`.
        folded: bool,
        /// (ŵ_b, x_b); None when nothing needed a gradient at the forward. x_b is the tape's shared copy.
        saved: Option<(Arc<Bf16Buf>, Arc<Bf16Buf>)>,
    }

    impl Backward for FakeQuantLinearBackward {
        fn name(&self) -> &'static str {
            OP
        }
        /// Every kernel and GEMM of this backward writes each element of the gradients it is given.
        fn overwrites_dinputs(&self) -> bool {
            true
        }
        /// dx = dy_b·ŵ_b can add into x's f32 gradient so far (beta = 1 in the GEMM).
        fn accumulates(&self, i: usize) -> bool {
            i == 0 && !self.x_bf16
        }
        /// Every GEMM of this backward reads dy_b, the cast of an f32 dout.
        fn reads_dout_as_bf16(&self) -> bool {
            true
        }
        fn backward(
            &self,
            inputs: &[&Tensor],
            output: &Tensor,
            dout: &Tensor,
            d: &mut [Option<Tensor>],
        ) -> Result<()> {
            self.backward_into(inputs, output, dout, d, &[false; 5])
        }
        fn backward_into(
            &self,
            inputs: &[&Tensor],
            _: &Tensor,
            dout: &Tensor,
            d: &mut [Option<Tensor>],
            accumulate: &[bool],
        ) -> Result<()> {
            let op = "fake_quant_linear_bwd";
            let Some((wq, xb)) = &self.saved else {
                return Err(Error::Autograd(format!(
                    "{op}: the forward saved nothing (no gradient was needed then)"
                )));
            };
            let (rows, n, k) = (self.rows, self.n, self.k);
            // A bf16 output's gradient is bf16 already (the bf16 SwiGLU's backward wrote it).
            let dy = match dout.storage() {
                crate::tensor::Storage::CudaBf16(b) => b.clone(),
                _ => Arc::new(cast_bf16_cuda(dout.gpu(op)?)?),
            };
            let ctx = dy.ctx().clone();
            let (d, dgamma) = d.split_at_mut(4);
            let (dx, rest) = d.split_at_mut(1);
            match dx[0].as_mut() {
                Some(dx) if self.x_bf16 => ctx.gemm_bf16_to_bf16(
                    false,
                    false,
                    rows,
                    k,
                    n,
                    1.0,
                    &dy,
                    wq,
                    dx.gpu_bf16_mut(op)?,
                )?,
                Some(dx) => {
                    let beta = if accumulate[0] { 1.0 } else { 0.0 };
                    ctx.gemm_bf16(
                        false,
                        false,
                        rows,
                        k,
                        n,
                        1.0,
                        &dy,
                        wq,
                        beta,
                        dx.gpu_mut(op)?,
                    )?
                }
                None => {}
            }
            if self.deferred.is_none() && rest.iter().chain(dgamma.iter()).all(Option::is_none) {
                return Ok(());
            }
            let mut dwq = ctx.alloc_bf16(n * k)?;
            ctx.gemm_bf16_to_bf16(true, false, n, k, rows, 1.0, &dy, xb, &mut dwq)?;
            if self.folded {
                let dgamma = match dgamma.first_mut() {
                    Some(Some(t)) => Some(t.gpu_mut(op)?),
                    _ => None,
                };
                norm_fold_bwd_cuda(&mut dwq, wq, inputs[4].gpu(op)?, dgamma)?;
            }
            if let Some(slot) = &self.deferred {
                rest.iter_mut().for_each(|d| *d = None);
                return slot.put(dwq);
            }
            let [dw, ds, dz] = rest else {
                return Err(Error::Autograd(format!("{op}: expected 4 inputs")));
            };
            fake_quant_bwd_cuda(
                slot(dw)?,
                slot(ds)?,
                slot(dz)?,
                &dwq,
                inputs[1].gpu(op)?,
                inputs[2].gpu(op)?,
                inputs[3].gpu(op)?,
                self.g,
                self.qmax,
            )
        }
    }
}
