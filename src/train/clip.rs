//! clip_grad_norm: torch.nn.utils.clip_grad_norm_ (L2) over every parameter gradient on the tape, as E2E-QP's
//! HF Trainer applies it (`max_grad_norm` 0.3; Block-AP does not clip, see formats.md §1.2).
//!
//! norm = sqrt(Σ_params Σ g²), squares accumulated in f64; coef = max_norm / (norm + 1e-6); when coef < 1 every
//! gradient is multiplied by coef (torch clamps coef at 1 and always multiplies; × 1 changes nothing, so it is
//! skipped). Returns the norm before clipping. A non-finite norm is an error that leaves the gradients as they
//! were, like torch's `error_if_nonfinite=True` (with the default False torch would scale every gradient by NaN).
//! Gradients on a GPU are summed and scaled there (`cuda/clip.cu`): one launch per gradient writes per-block
//! partial sums into one buffer, which comes back in a single copy.
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::ops::simd;
use rayon::prelude::*;

/// Σ g² in f64, over fixed chunks so that the result does not depend on the thread count.
pub fn sum_squares_f64(g: &[f32]) -> f64 {
    g.par_chunks(4096)
        .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .collect::<Vec<_>>()
        .iter()
        .sum()
}

/// Clips all parameter gradients to a global L2 norm of `max_norm` (> 0) and returns the pre-clip norm.
pub fn clip_grad_norm(tape: &mut Tape, max_norm: f32) -> Result<f32> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(Error::invalid(
            "clip_grad_norm",
            format!("max_norm {max_norm} must be positive"),
        ));
    }
    let mut sq = 0.0f64;
    #[cfg(feature = "cuda")]
    {
        sq += cuda::sum_squares(tape)?;
    }
    for g in tape.param_grads_mut().filter(|g| !g.is_cuda()) {
        sq += sum_squares_f64(g.f32s("clip_grad_norm")?);
    }
    let (norm, coef) = clip_coefficient(sq, max_norm)?;
    if coef < 1.0 {
        for g in tape.param_grads_mut() {
            #[cfg(feature = "cuda")]
            if g.is_cuda() {
                cuda::scale(g.gpu_mut("clip_grad_norm")?, coef as f32)?;
                continue;
            }
            g.f32s_mut("clip_grad_norm")?
                .par_chunks_mut(4096)
                .for_each(|c| simd::scale_assign(c, coef as f32));
        }
    }
    Ok(norm)
}

/// (norm, coef) from Σ g² over every gradient: the norm before clipping and the factor the gradients take when
/// it is below 1. A non-finite norm is an error (module docs).
pub fn clip_coefficient(sum_squares: f64, max_norm: f32) -> Result<(f32, f64)> {
    let norm = sum_squares.sqrt();
    if !norm.is_finite() {
        return Err(Error::NonFinite {
            what: format!("gradient norm ({norm}) before clipping"),
        });
    }
    Ok((norm as f32, max_norm as f64 / (norm + 1e-6)))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use crate::autograd::Tape;
    use crate::error::Result;
    use crate::gpu::{Arg, GpuBuf, KernelSource};

    pub const CUDA: KernelSource = KernelSource {
        op: "clip",
        code: include_str!("../../cuda/clip.cu"),
    };

    /// Blocks of the partial-sum launch: a fixed count, so the summation order never depends on the device.
    pub const PARTIALS: usize = 256;

    /// Σ g² over the parameter gradients that live on a GPU (0 when none does).
    pub fn sum_squares(tape: &mut Tape) -> Result<f64> {
        let grads: Vec<&GpuBuf> = tape
            .param_grads_mut()
            .filter(|g| g.is_cuda())
            .map(|g| g.gpu("clip_grad_norm"))
            .collect::<Result<_>>()?;
        let Some(first) = grads.first() else {
            return Ok(0.0);
        };
        let ctx = first.ctx().clone();
        let partials = ctx.zeros(grads.len() * PARTIALS)?;
        for (i, g) in grads.iter().enumerate() {
            partial_sum_squares(&partials, i, g)?;
        }
        sum_partials(&partials)
    }

    /// Writes gradient i's Σ g² partials into `partials` [n·PARTIALS] (zeroed) at i·PARTIALS.
    pub fn partial_sum_squares(partials: &GpuBuf, i: usize, g: &GpuBuf) -> Result<()> {
        let ctx = partials.ctx();
        if g.ctx().ordinal() != ctx.ordinal() || partials.len() < (i + 1) * PARTIALS {
            return Err(crate::error::Error::invalid(
                "clip_grad_norm",
                format!(
                    "gradient {i} on cuda:{} with {} partials on cuda:{}",
                    g.ctx().ordinal(),
                    partials.len(),
                    ctx.ordinal()
                ),
            ));
        }
        let blocks = g.len().div_ceil(crate::gpu::BLOCK as usize).min(PARTIALS) as u32;
        // Parameter i's partials start at i·PARTIALS (unused slots stay 0).
        let out = Arg::Ptr(partials.ptr() + (i * PARTIALS * 4) as u64);
        ctx.launch(
            &CUDA,
            "clip_sum_squares_f32",
            (blocks, 1, 1),
            (crate::gpu::BLOCK, 1, 1),
            0,
            &[out, g.arg(), Arg::I64(g.len() as i64)],
        )
    }

    /// Σ of the partials in f64, in order (one download).
    pub fn sum_partials(partials: &GpuBuf) -> Result<f64> {
        Ok(partials.to_vec()?.iter().map(|&p| p as f64).sum())
    }

    /// g *= coef in place.
    pub fn scale(g: &mut GpuBuf, coef: f32) -> Result<()> {
        let n = g.len();
        g.ctx().launch_1d(
            &CUDA,
            "clip_scale_f32",
            n,
            &[g.arg(), Arg::I64(n as i64), Arg::F32(coef)],
        )
    }
}

#[cfg(feature = "cuda")]
pub use cuda::CUDA;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Var;
    use crate::ops::{mul::mul, sum::sum};
    use crate::tensor::rng::Rng;
    use crate::tensor::Tensor;
    use crate::testing::*;

    /// Three parameters with gradients r (sizes 1, 13, 5000) and one without a gradient.
    fn tape_with_grads(rng: &mut Rng, grad_std: f64) -> (Tape, Vec<Var>, Vec<Vec<f32>>) {
        let mut tape = Tape::new();
        let sizes = [1usize, 13, 5000, 3];
        let vars: Vec<Var> = sizes
            .iter()
            .map(|&n| tape.param(Tensor::randn(&[n], 1.0, rng)).unwrap())
            .collect();
        let mut grads = Vec::new();
        for (&v, &n) in vars.iter().zip(&sizes).take(3) {
            let r = rng.normal_vec(n, grad_std);
            let rv = tape.input(Tensor::from_vec(&[n], r.clone()).unwrap());
            let prod = mul(&mut tape, v, rv).unwrap();
            let loss = sum(&mut tape, prod).unwrap();
            tape.backward(loss).unwrap();
            grads.push(r);
        }
        (tape, vars, grads)
    }

    fn norm64(grads: &[Vec<f32>]) -> f64 {
        grads
            .iter()
            .flatten()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn clip_scales_to_max_norm_and_returns_the_pre_clip_norm() {
        let mut rng = Rng::new(12);
        let (mut tape, vars, grads) = tape_with_grads(&mut rng, 1.0);
        let want = norm64(&grads);
        let got = clip_grad_norm(&mut tape, 0.3).unwrap();
        assert!((got as f64 - want).abs() <= 1e-6 * want, "{got} vs {want}");
        let coef = 0.3 / (want + 1e-6);
        for (v, g) in vars.iter().zip(&grads) {
            let scaled: Vec<f64> = g.iter().map(|&x| x as f64 * coef).collect();
            assert_close(
                "clipped",
                tape.grad(*v).unwrap().f32s("t").unwrap(),
                &scaled,
                1e-9,
                1e-6,
            );
        }
        assert!(tape.grad(vars[3]).is_none());
        let after = clip_grad_norm(&mut tape, 1e3).unwrap() as f64;
        assert!((after - 0.3).abs() < 1e-6, "norm after clipping {after}");
    }

    #[test]
    fn clip_leaves_small_gradients_untouched() {
        let mut rng = Rng::new(13);
        let (mut tape, vars, grads) = tape_with_grads(&mut rng, 1e-3);
        let norm = clip_grad_norm(&mut tape, 0.3).unwrap() as f64;
        assert!(norm < 0.3 && (norm - norm64(&grads)).abs() <= 1e-6 * norm);
        for (v, g) in vars.iter().zip(&grads) {
            assert_eq!(tape.grad(*v).unwrap().f32s("t").unwrap(), &g[..]);
        }
    }

    #[test]
    fn clip_refuses_non_finite_norms_and_bad_max_norm() {
        let mut rng = Rng::new(14);
        let (mut tape, vars, mut grads) = tape_with_grads(&mut rng, 1.0);
        grads[1][4] = f32::NAN;
        let rv = tape.input(Tensor::from_vec(&[13], grads[1].clone()).unwrap());
        tape.zero_grad();
        let prod = mul(&mut tape, vars[1], rv).unwrap();
        let loss = sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();
        let before = tape.grad(vars[1]).unwrap().f32s("t").unwrap().to_vec();
        let err = clip_grad_norm(&mut tape, 0.3).unwrap_err().to_string();
        assert!(err.contains("non-finite"), "{err}");
        let after = tape.grad(vars[1]).unwrap().f32s("t").unwrap();
        assert!(before
            .iter()
            .zip(after)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(clip_grad_norm(&mut tape, bad).is_err());
        }
    }
}
