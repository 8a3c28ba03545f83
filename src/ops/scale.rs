//! scale: out = c · x for a constant c (attention's 1/sqrt(D), loss weights, gradient-accumulation averaging).
//!
//! Backward: dx = c · dout. The op is linear and self-adjoint, so the backward is the forward applied to dout;
//! the finite-difference test checks that claim. Activation grads are written (`=`); the tape does the `+=`.
//! On the GPU: `cuda/scale.cu` (one kernel, used both ways).
use crate::autograd::{Backward, Tape, Var};
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::ops::simd;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Elements per rayon task: large enough that splitting costs little against the work.
const CHUNK: usize = 1 << 14;

pub fn scale_fwd_ref(out: &mut [f64], x: &[f64], c: f64) {
    for (o, x) in out.iter_mut().zip(x) {
        *o = c * x;
    }
}

pub fn scale_fwd_cpu(out: &mut [f32], x: &[f32], c: f32) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            o.copy_from_slice(x);
            simd::scale_assign(o, c);
        });
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "scale",
    code: include_str!("../../cuda/scale.cu"),
};

/// out = c · x; also the backward (dx = c · dout).
#[cfg(feature = "cuda")]
pub fn scale_fwd_cuda(out: &mut GpuBuf, x: &GpuBuf, c: f32) -> Result<()> {
    let n = out.len();
    out.ctx().launch_1d(
        &CUDA,
        "scale_fwd_f32",
        n,
        &[out.arg(), x.arg(), Arg::F32(c), Arg::I64(n as i64)],
    )
}

pub fn scale(tape: &mut Tape, x: Var, c: f32) -> Result<Var> {
    let shape = tape.value(x).shape().to_vec();
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("scale", &[tape.value(x)])? {
        let mut out = ctx.alloc(tape.value(x).numel())?;
        scale_fwd_cuda(&mut out, tape.value(x).gpu("scale")?, c)?;
        let out = Tensor::from_gpu(&shape, out)?;
        return Ok(tape.push_op(out, &[x], Box::new(ScaleBackward { c })));
    }
    let mut out = tape.alloc(&shape);
    scale_fwd_cpu(out.f32s_mut("scale")?, tape.value(x).f32s("scale")?, c);
    Ok(tape.push_op(out, &[x], Box::new(ScaleBackward { c })))
}

struct ScaleBackward {
    c: f32,
}

impl Backward for ScaleBackward {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn backward(
        &self,
        _: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            if let Some(dx) = &mut d[0] {
                scale_fwd_cuda(dx.gpu_mut("scale_bwd")?, dout.gpu("scale_bwd")?, self.c)?;
            }
            return Ok(());
        }
        if let Some(dx) = &mut d[0] {
            scale_fwd_cpu(dx.f32s_mut("scale_bwd")?, dout.f32s("scale_bwd")?, self.c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    /// One f32 multiply per element: within half an ulp of the f64 product.
    const TOL: f64 = 1e-6;

    #[test]
    fn scale_cpu_matches_ref_and_adjoint_matches_finite_differences() {
        let mut rng = Rng::new(21);
        // 40_000 spans several rayon chunks with a ragged last one.
        for (n, c) in [(1, 0.5), (7, -3.25), (13, 1.0 / 8f32.sqrt()), (40_000, 2.5)] {
            let x = rng.normal_vec(n, 1.0);
            let mut out = vec![0.0; n];
            scale_fwd_cpu(&mut out, &x, c);
            let mut want = vec![0.0; n];
            scale_fwd_ref(&mut want, &to_f64(&x), c as f64);
            assert_close("scale fwd", &out, &want, TOL, TOL);

            // Backward = forward on dout (self-adjoint); check the f64 claim against finite differences.
            let r = to_f64(&rng.normal_vec(n, 1.0));
            let mut dx_ref = vec![0.0; n];
            scale_fwd_ref(&mut dx_ref, &r, c as f64);
            if n <= 13 {
                let fd = finite_diff(&to_f64(&x), 1e-4, |x| {
                    let mut o = vec![0.0; n];
                    scale_fwd_ref(&mut o, x, c as f64);
                    dot64(&o, &r)
                });
                // Linear: central differences are exact up to f64 rounding (~1e-12 at h = 1e-4).
                assert_close_f64("scale dx ref vs fd", &dx_ref, &fd, 1e-9, 1e-9);
            }
            let mut dx = vec![0.0; n];
            scale_fwd_cpu(&mut dx, &to_f32(&r), c);
            assert_close("scale dx cpu", &dx, &dx_ref, TOL, TOL);
        }
    }

    #[test]
    fn scale_on_the_tape_gives_value_and_grad() {
        let mut rng = Rng::new(22);
        let shape = [3, 5, 7];
        let x = rng.normal_vec(105, 1.0);
        let r = rng.normal_vec(105, 1.0);
        let c = -0.7f32;
        let mut tape = Tape::new();
        let vx = tape.leaf(Tensor::from_vec(&shape, x.clone()).unwrap(), true);
        let y = scale(&mut tape, vx, c).unwrap();
        assert_eq!(tape.value(y).shape(), &shape);
        let mut want = vec![0.0; 105];
        scale_fwd_cpu(&mut want, &x, c);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
        let vr = tape.input(Tensor::from_vec(&shape, r.clone()).unwrap());
        let prod = crate::ops::mul::mul(&mut tape, y, vr).unwrap();
        let loss = crate::ops::sum::sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();
        let mut dx_ref = vec![0.0; 105];
        scale_fwd_ref(&mut dx_ref, &to_f64(&r), c as f64);
        assert_close(
            "scale tape dx",
            tape.grad(vx).unwrap().f32s("t").unwrap(),
            &dx_ref,
            TOL,
            TOL,
        );
    }

    #[test]
    fn scale_rejects_non_f32_storage_naming_the_op() {
        let mut tape = Tape::new();
        let x = tape.input(Tensor::zeros(&[2, 3]).to_dtype(crate::tensor::DType::BF16));
        let err = scale(&mut tape, x, 2.0).unwrap_err().to_string();
        assert!(err.contains("scale") && err.contains("BF16"), "{err}");
    }
}
