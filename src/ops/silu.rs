//! silu: y = x * sigmoid(x), elementwise (the Llama MLP activation; `swiglu` fuses it with the up product).
//!
//! Backward: dx = dy * s * (1 + x * (1 - s)) with s = sigmoid(x), recomputed from the saved input rather than
//! stored. Activation gradients are written (`=`); the tape accumulates. On the GPU: `cuda/silu.cu`.
use crate::autograd::{Backward, Tape, Var};
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::ops::simd;
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::f32x8;

/// Elements per rayon task: large enough to amortise scheduling, a multiple of the 8 SIMD lanes.
pub(crate) const CHUNK: usize = 1 << 13;

/// sigmoid on 8 lanes. wide's `exp` returns 0 (not +inf) above 87.3, which would turn sigmoid of a very
/// negative x into 1; clamping -x at 87 keeps exp finite, where sigmoid is below 1.7e-38 (0 for every use).
#[inline]
pub(crate) fn sigmoid8(x: f32x8) -> f32x8 {
    let e = (-x).min(f32x8::splat(87.0)).exp();
    f32x8::ONE / (f32x8::ONE + e)
}

#[inline]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(crate) fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu_fwd_ref(out: &mut [f64], x: &[f64]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x * sigmoid64(x);
    }
}

pub fn silu_bwd_ref(dx: &mut [f64], dout: &[f64], x: &[f64]) {
    for ((d, &g), &x) in dx.iter_mut().zip(dout).zip(x) {
        let s = sigmoid64(x);
        *d = g * s * (1.0 + x * (1.0 - s));
    }
}

pub fn silu_fwd_cpu(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            let n = o.len() / 8 * 8;
            for (o, x) in o[..n].chunks_exact_mut(8).zip(x[..n].chunks_exact(8)) {
                let x = simd::load(x);
                o.copy_from_slice((x * sigmoid8(x)).as_array_ref());
            }
            for (o, &x) in o[n..].iter_mut().zip(&x[n..]) {
                *o = x * sigmoid(x);
            }
        });
}

pub fn silu_bwd_cpu(dx: &mut [f32], dout: &[f32], x: &[f32]) {
    dx.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK).zip(x.par_chunks(CHUNK)))
        .for_each(|(d, (g, x))| {
            let n = d.len() / 8 * 8;
            for ((d, g), x) in d[..n]
                .chunks_exact_mut(8)
                .zip(g[..n].chunks_exact(8))
                .zip(x[..n].chunks_exact(8))
            {
                let (g, x) = (simd::load(g), simd::load(x));
                let s = sigmoid8(x);
                let r = g * s * x.mul_add(f32x8::ONE - s, f32x8::ONE);
                d.copy_from_slice(r.as_array_ref());
            }
            for ((d, &g), &x) in d[n..].iter_mut().zip(&g[n..]).zip(&x[n..]) {
                let s = sigmoid(x);
                *d = g * s * (1.0 + x * (1.0 - s));
            }
        });
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "silu",
    code: include_str!("../../cuda/silu.cu"),
};

#[cfg(feature = "cuda")]
pub fn silu_fwd_cuda(out: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
    let n = out.len();
    out.ctx().launch_1d(
        &CUDA,
        "silu_fwd_f32",
        n,
        &[out.arg(), x.arg(), Arg::I64(n as i64)],
    )
}

#[cfg(feature = "cuda")]
pub fn silu_bwd_cuda(dx: &mut GpuBuf, dout: &GpuBuf, x: &GpuBuf) -> Result<()> {
    let n = dx.len();
    dx.ctx().launch_1d(
        &CUDA,
        "silu_bwd_f32",
        n,
        &[dx.arg(), dout.arg(), x.arg(), Arg::I64(n as i64)],
    )
}

pub fn silu(tape: &mut Tape, x: Var) -> Result<Var> {
    let shape = tape.value(x).shape().to_vec();
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("silu", &[tape.value(x)])? {
        let mut out = ctx.alloc(tape.value(x).numel())?;
        silu_fwd_cuda(&mut out, tape.value(x).gpu("silu")?)?;
        let out = Tensor::from_gpu(&shape, out)?;
        return Ok(tape.push_op(out, &[x], Box::new(SiluBackward)));
    }
    let mut out = tape.alloc(&shape);
    silu_fwd_cpu(out.f32s_mut("silu")?, tape.value(x).f32s("silu")?);
    Ok(tape.push_op(out, &[x], Box::new(SiluBackward)))
}

struct SiluBackward;

impl Backward for SiluBackward {
    fn name(&self) -> &'static str {
        "silu"
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
            if let Some(dx) = &mut d[0] {
                let op = "silu_bwd";
                silu_bwd_cuda(dx.gpu_mut(op)?, dout.gpu(op)?, inputs[0].gpu(op)?)?;
            }
            return Ok(());
        }
        if let Some(dx) = &mut d[0] {
            silu_bwd_cpu(
                dx.f32s_mut("silu_bwd")?,
                dout.f32s("silu_bwd")?,
                inputs[0].f32s("silu_bwd")?,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{mul::mul, sum::sum};
    use crate::tensor::{rng::Rng, DType};
    use crate::testing::*;

    /// Normal inputs of std 4 (the sigmoid's curved range and both tails) plus values past wide's exp
    /// cut-off at |x| = 87.3, where the clamp in `sigmoid8` matters.
    fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut x = rng.normal_vec(n, 4.0);
        for (i, v) in [-200.0, -88.0, -30.0, 30.0, 88.0, 200.0].iter().enumerate() {
            if i * 5 < n {
                x[i * 5] = *v;
            }
        }
        x
    }

    // f32 vs f64: a few ulp from exp and the division, times |x| up to 200 in the tails.
    const FWD_ATOL: f64 = 1e-6;
    const FWD_RTOL: f64 = 2e-6;
    // The derivative adds one product and one fma on top: still a few ulp.
    const BWD_ATOL: f64 = 1e-6;
    const BWD_RTOL: f64 = 1e-5;

    #[test]
    fn silu_cpu_matches_ref_forward_and_backward() {
        let mut rng = Rng::new(21);
        // 8195 spans two rayon chunks and ends in a 3-element scalar tail.
        for n in [1, 7, 13, 33, 1000, CHUNK + 3] {
            let x = inputs(&mut rng, n);
            let dout = rng.normal_vec(n, 1.0);
            let mut y = vec![0.0; n];
            silu_fwd_cpu(&mut y, &x);
            let mut want = vec![0.0; n];
            silu_fwd_ref(&mut want, &to_f64(&x));
            assert_close(&format!("silu fwd n={n}"), &y, &want, FWD_ATOL, FWD_RTOL);

            let mut dx = vec![0.0; n];
            silu_bwd_cpu(&mut dx, &dout, &x);
            let mut want = vec![0.0; n];
            silu_bwd_ref(&mut want, &to_f64(&dout), &to_f64(&x));
            assert_close(&format!("silu bwd n={n}"), &dx, &want, BWD_ATOL, BWD_RTOL);
        }
    }

    #[test]
    fn silu_bwd_ref_matches_finite_differences() {
        let mut rng = Rng::new(22);
        let x = to_f64(&rng.normal_vec(41, 3.0));
        let r = to_f64(&rng.normal_vec(41, 1.0));
        let mut dx = vec![0.0; 41];
        silu_bwd_ref(&mut dx, &r, &x);
        let fd = finite_diff(&x, 1e-5, |x| {
            let mut y = vec![0.0; x.len()];
            silu_fwd_ref(&mut y, x);
            dot64(&y, &r)
        });
        // Central differences: O(h^2 * f''') ~ 1e-10 truncation plus ~1e-11 rounding.
        assert_close_f64("silu dx vs fd", &dx, &fd, 1e-8, 1e-7);
    }

    #[test]
    fn silu_on_tape_matches_cpu_kernels() {
        let mut rng = Rng::new(23);
        let shape = [3, 5, 7];
        let x = inputs(&mut rng, 105);
        let r = rng.normal_vec(105, 1.0);
        let mut tape = Tape::new();
        let vx = tape.leaf(Tensor::from_vec(&shape, x.clone()).unwrap(), true);
        let y = silu(&mut tape, vx).unwrap();
        assert_eq!(tape.value(y).shape(), &shape);
        let mut want = vec![0.0; 105];
        silu_fwd_cpu(&mut want, &x);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
        let vr = tape.input(Tensor::from_vec(&shape, r.clone()).unwrap());
        let p = mul(&mut tape, y, vr).unwrap();
        let loss = sum(&mut tape, p).unwrap();
        tape.backward(loss).unwrap();
        let mut want = vec![0.0; 105];
        silu_bwd_cpu(&mut want, &r, &x);
        assert_eq!(tape.grad(vx).unwrap().f32s("t").unwrap(), &want[..]);
    }

    #[test]
    fn silu_rejects_non_f32_storage() {
        let mut tape = Tape::new();
        let x = tape.input(Tensor::zeros(&[2, 3]).to_dtype(DType::F16));
        let err = silu(&mut tape, x).unwrap_err().to_string();
        assert!(err.contains("silu") && err.contains("F16"), "{err}");
    }
}
