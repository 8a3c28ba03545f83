//! Helpers of the bf16-mode GPU tests (tests/cuda_bf16_values.rs, tests/cuda_bf16_grads.rs).
use super::{device, Report};
use eqat::autograd::{Tape, Var};
use eqat::gpu::GpuContext;
use eqat::ops::attention::AttentionShape;
use eqat::quant::fake_quant::{init_minmax, QuantConfig};
use eqat::{Rng, Tensor};
use std::sync::Arc;

/// A context of its own in the bf16 mode (bf16 GEMMs), with fresh buffers poisoned (NaN), a report named `name` and
/// a generator seeded with `seed`; None, with the skip printed, without a GPU.
pub fn bf16_mode(name: &'static str, seed: u64) -> Option<(Arc<GpuContext>, Report, Rng)> {
    device(name)?;
    let ctx = GpuContext::new(0).unwrap();
    ctx.set_poison(true);
    ctx.set_matmul_bf16(true);
    Some((ctx, Report::new(name), Rng::new(seed)))
}

pub fn shape(b: usize, t: usize, h: usize, g: usize, d: usize) -> AttentionShape {
    AttentionShape { b, t, h, g, d }
}

/// Random N(0, 1) q [B, T, H, D], k and v [B, T, G, D] of shape s, rounded to bf16 (f32 tensors).
pub fn bf16_qkv(s: AttentionShape, rng: &mut Rng) -> Vec<Tensor> {
    [s.h, s.g, s.g]
        .iter()
        .map(|&heads| {
            let t = Tensor::randn(&[s.b, s.t, heads, s.d], 1.0, rng);
            Tensor::from_vec(t.shape(), round_bf16(&t.to_f32_vec())).unwrap()
        })
        .collect()
}

/// Values rounded to bf16 (to nearest even), as f32.
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// Each weight with its min-max scales and zeros as device parameters [w, s, z] on `tape`.
pub fn quant_params(
    tape: &mut Tape,
    ctx: &Arc<GpuContext>,
    ws: &[Tensor],
    cfg: QuantConfig,
) -> Vec<Vec<Var>> {
    ws.iter()
        .map(|w| {
            let (s, z) = init_minmax(w, cfg).unwrap();
            [w, &s, &z]
                .iter()
                .map(|t| tape.param(t.to_device(ctx).unwrap()).unwrap())
                .collect()
        })
        .collect()
}

/// A gradient's dtype: bf16 for bf16 values, f32 otherwise.
pub fn assert_grad_dtype(g: &Tensor, bf16: bool) {
    let want = match bf16 {
        true => eqat::tensor::DType::BF16,
        false => eqat::tensor::DType::F32,
    };
    assert_eq!(g.dtype(), want, "gradient dtype");
}
