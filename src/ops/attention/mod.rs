//! attention: causal self-attention with grouped-query heads, forward and backward.
//!
//! q [B, T, H, D], k and v [B, T, G, D] -> out [B, T, H, D]. Query head h reads key/value head h / (H/G), so
//! H % G must be 0. Row t of head h: out = softmax(scale · q_t · K[..=t]ᵀ) · V[..=t] with scale = 1/sqrt(D).
//!
//! Backward (P the probabilities, dO = dout): dP = dO·Vᵀ, dS = P∘(dP − rowsum(dO∘O)), dQ = scale·dS·K,
//! dK = scale·dSᵀ·Q, dV = Pᵀ·dO. A key/value head's gradient is the sum over the H/G query heads that share it.
//! Accumulation rule: all three gradients are written (`=`); the tape does the `+=`.
//!
//! Memory (flash-style): forward saves only the log-sum-exp of each score row, lse [B, H, T] (B·H·T floats,
//! 512 KiB at B=2, H=32, T=2048), not P (B·H·T² floats, 1 GiB there). Backward recomputes P one block of query
//! rows at a time as exp(S − lse), paying one extra QKᵀ product (5 products instead of 4). Transient memory:
//! forward, a [QUERY_BLOCK, T] score block per head in flight and a head-major copy of the output (the size
//! of q); backward, a score and a probability-gradient block per head in flight and head-major dQ, dK and dV
//! (3 × the size of q) before they are scattered or summed into the [B, T, ., D] layouts.
//!
//! On the GPU (inputs with CUDA storage, the `cuda` feature) the same algorithm runs fused in `cuda/attention.cu`
//! (see `cuda.rs`): one kernel writes out and lse, the backward recomputes P tile by tile; D <= 128 there. In the
//! context's bf16 mode (`GpuContext::set_matmul_bf16`) D 64 and 128 run on the tensor cores instead
//! (`cuda/attention_bf16.cu`, see `cuda_bf16.rs`): bf16 operands, f32 accumulation, f32 tensors in and out.
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_bf16;
mod reference;
#[cfg(test)]
mod tests;

pub use cpu::{attention_bwd_cpu, attention_fwd_cpu, QUERY_BLOCK};
#[cfg(feature = "cuda")]
pub use cuda::{
    attention_bwd_cuda, attention_fwd_cuda, time_attention_cuda, AttentionTiming, CUDA,
    MAX_HEAD_DIM,
};
#[cfg(feature = "cuda")]
pub use cuda_bf16::{has_bf16_kernels, runs_bf16, CUDA as CUDA_BF16};
pub use reference::{attention_bwd_ref, attention_fwd_ref};

use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The dimensions of one attention call: batch, tokens, query heads, key/value heads, head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub g: usize,
    pub d: usize,
}

impl AttentionShape {
    /// Checks q [B, T, H, D] and k, v [B, T, G, D] (every dimension > 0, H % G == 0) and returns the dims.
    pub fn check(q: &[usize], k: &[usize], v: &[usize]) -> Result<AttentionShape> {
        let shapes = format!("q {q:?}, k {k:?}, v {v:?}");
        if q.len() != 4 || k.len() != 4 || v.len() != 4 {
            return Err(Error::shape(
                "attention",
                format!("{shapes}: need q [B, T, H, D] and k, v [B, T, G, D] (4-D)"),
            ));
        }
        if k != v || q[0] != k[0] || q[1] != k[1] || q[3] != k[3] {
            return Err(Error::shape(
                "attention",
                format!("{shapes}: k and v must be equal and share B, T and D with q"),
            ));
        }
        if q.contains(&0) || k.contains(&0) {
            return Err(Error::shape(
                "attention",
                format!("{shapes}: every dimension must be positive"),
            ));
        }
        if !q[2].is_multiple_of(k[2]) {
            return Err(Error::invalid(
                "attention",
                format!(
                    "{shapes}: {} query heads are not a multiple of {} key/value heads",
                    q[2], k[2]
                ),
            ));
        }
        Ok(AttentionShape {
            b: q[0],
            t: q[1],
            h: q[2],
            g: k[2],
            d: q[3],
        })
    }

    /// Query heads per key/value head.
    pub fn group(self) -> usize {
        self.h / self.g
    }

    /// The softmax temperature 1/sqrt(D).
    pub fn scale(self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
}

/// Causal grouped-query attention: q [B, T, H, D], k and v [B, T, G, D] -> [B, T, H, D].
pub fn attention(tape: &mut Tape, q: Var, k: Var, v: Var) -> Result<Var> {
    let s = AttentionShape::check(
        tape.value(q).shape(),
        tape.value(k).shape(),
        tape.value(v).shape(),
    )?;
    let out_shape = [s.b, s.t, s.h, s.d];
    #[cfg(feature = "cuda")]
    if let Some(ctx) =
        crate::gpu::device_of("attention", &[tape.value(q), tape.value(k), tape.value(v)])?
    {
        const OP: &str = "attention";
        let mut lse = ctx.alloc(s.b * s.h * s.t)?;
        let (out, bf16) = match tape.value(q).dtype() {
            // bf16 q, k, v (the bf16 mode's rope outputs and v projection): read as they are, and the output is
            // bf16 too (the o projection's operand; its gradient comes back in bf16).
            crate::tensor::DType::BF16 => {
                let x = cuda_bf16::Bf16Inputs::shared(
                    tape.value(q).gpu_bf16(OP)?.clone(),
                    tape.value(k).gpu_bf16(OP)?.clone(),
                    tape.value(v).gpu_bf16(OP)?.clone(),
                );
                let mut out = ctx.alloc_bf16(s.b * s.t * s.h * s.d)?;
                cuda::attention_fwd_bf16_values(&mut out, &mut lse, &x, s)?;
                (Tensor::from_gpu_bf16(&out_shape, out)?, Some(x))
            }
            _ => {
                let mut out = ctx.alloc(s.b * s.t * s.h * s.d)?;
                let (qb, kb, vb) = (
                    tape.value(q).gpu(OP)?,
                    tape.value(k).gpu(OP)?,
                    tape.value(v).gpu(OP)?,
                );
                let kept = cuda::attention_fwd_cuda_keep(&mut out, &mut lse, qb, kb, vb, s)?;
                (Tensor::from_gpu(&out_shape, out)?, kept)
            }
        };
        let lse = Tensor::from_gpu(&[s.b, s.h, s.t], lse)?;
        return Ok(tape.push_op(
            out,
            &[q, k, v],
            Box::new(AttentionBackward {
                shape: s,
                lse,
                bf16,
            }),
        ));
    }
    let mut out = tape.alloc(&out_shape);
    let mut lse = vec![0.0; s.b * s.h * s.t];
    attention_fwd_cpu(
        out.f32s_mut("attention")?,
        &mut lse,
        tape.value(q).f32s("attention")?,
        tape.value(k).f32s("attention")?,
        tape.value(v).f32s("attention")?,
        s,
    );
    Ok(tape.push_op(
        out,
        &[q, k, v],
        Box::new(AttentionBackward {
            shape: s,
            lse: Tensor::from_vec(&[s.b, s.h, s.t], lse)?,
            #[cfg(feature = "cuda")]
            bf16: None,
        }),
    ))
}

/// The device buffer of a gradient slot, None when that gradient is not wanted.
#[cfg(feature = "cuda")]
fn gpu_grad(t: &mut Option<Tensor>) -> Result<Option<&mut crate::gpu::GpuBuf>> {
    t.as_mut().map(|t| t.gpu_mut("attention_bwd")).transpose()
}

struct AttentionBackward {
    shape: AttentionShape,
    /// Log-sum-exp of each scaled, masked score row, [B, H, T], where the forward ran (host or device).
    lse: Tensor,
    /// The bf16 copies of q, k, v the forward's tensor-core kernels read (GPU bf16 mode), reused by the backward.
    #[cfg(feature = "cuda")]
    bf16: Option<cuda_bf16::Bf16Inputs>,
}

/// The gradient slot of a bf16 value, bf16 or (`Backward::reads_f32_dout`: rope's outputs) f32, for the kernels
/// to write.
#[cfg(feature = "cuda")]
fn bf16_value_grad(t: &mut Option<Tensor>) -> Result<Option<cuda_bf16::OutBuf<'_>>> {
    t.as_mut()
        .map(|t| match t.dtype() {
            crate::tensor::DType::BF16 => {
                t.gpu_bf16_mut("attention_bwd").map(cuda_bf16::OutBuf::Bf16)
            }
            _ => t.gpu_mut("attention_bwd").map(cuda_bf16::OutBuf::F32),
        })
        .transpose()
}

#[cfg(feature = "cuda")]
impl AttentionBackward {
    /// The backward of bf16 q, k, v: their gradients are bf16 too, or f32 where the tape gives an f32 slot (q and
    /// k from rope, which rounds after rotating). dk and dv are written by the kernels in the slot's dtype; dq, a
    /// sum of atomic adds, goes into an f32 slot as it is, or through an f32 buffer rounded once into a bf16 one.
    fn backward_bf16_values(
        &self,
        dout: &Tensor,
        out: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        const OP: &str = "attention_bwd";
        let Some(x) = self.bf16.as_ref() else {
            return Err(crate::error::Error::Autograd(format!(
                "{OP}: the forward kept no bf16 inputs"
            )));
        };
        let [dq, dk, dv] = d else {
            unreachable!("attention has three inputs")
        };
        let ctx = self.lse.gpu(OP)?.ctx().clone();
        let bf16_dq = dq
            .as_ref()
            .is_some_and(|t| t.dtype() == crate::tensor::DType::BF16);
        let mut dq32 = match bf16_dq {
            true => dq.as_ref().map(|t| ctx.alloc(t.numel())).transpose()?,
            false => None,
        };
        let dout_out = cuda_bf16::DoutOut::Bf16 {
            dout: dout.gpu_bf16(OP)?,
            out: out.gpu_bf16(OP)?,
        };
        let grads = [bf16_value_grad(dk)?, bf16_value_grad(dv)?];
        let dq_out = match dq32.as_mut() {
            Some(b) => Some(b),
            None => dq.as_mut().map(|t| t.gpu_mut(OP)).transpose()?,
        };
        cuda_bf16::bwd(dq_out, grads, dout_out, x, self.lse.gpu(OP)?, self.shape)?;
        if let (Some(slot), Some(g)) = (dq, &dq32) {
            crate::ops::linear::cast_bf16_into_cuda(slot.gpu_bf16_mut(OP)?, g)?;
        }
        Ok(())
    }
}

impl Backward for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn backward(
        &self,
        x: &[&Tensor],
        out: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        const OP: &str = "attention_bwd";
        #[cfg(feature = "cuda")]
        if x[0].dtype() == crate::tensor::DType::BF16 {
            return self.backward_bf16_values(dout, out, d);
        }
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            let [dq, dk, dv] = d else {
                unreachable!("attention has three inputs")
            };
            return cuda::attention_bwd_cuda_with(
                gpu_grad(dq)?,
                gpu_grad(dk)?,
                gpu_grad(dv)?,
                dout.gpu(OP)?,
                x[0].gpu(OP)?,
                x[1].gpu(OP)?,
                x[2].gpu(OP)?,
                out.gpu(OP)?,
                self.lse.gpu(OP)?,
                self.bf16.as_ref(),
                self.shape,
            );
        }
        let (q, k, v) = (x[0].f32s(OP)?, x[1].f32s(OP)?, x[2].f32s(OP)?);
        // The products share dS, so all three gradients are computed; one not asked for lands in scratch.
        let mut scratch: [Vec<f32>; 3] = Default::default();
        let mut grads = Vec::with_capacity(3);
        for ((slot, scratch), len) in
            d.iter_mut()
                .zip(&mut scratch)
                .zip([q.len(), k.len(), v.len()])
        {
            grads.push(match slot {
                Some(t) => t.f32s_mut(OP)?,
                None => {
                    *scratch = vec![0.0; len];
                    scratch.as_mut_slice()
                }
            });
        }
        let [dq, dk, dv] = <[&mut [f32]; 3]>::try_from(grads).expect("three gradient buffers");
        attention_bwd_cpu(
            dq,
            dk,
            dv,
            dout.f32s(OP)?,
            q,
            k,
            v,
            out.f32s(OP)?,
            self.lse.f32s(OP)?,
            self.shape,
        );
        Ok(())
    }
}
