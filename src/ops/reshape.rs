//! reshape: the same values in the same row-major order under a new shape with the same element count
//! (e.g. [B, T, H·D] -> [B, T, H, D] before rope). Tape values own their buffers, so the data is copied; on
//! the GPU that copy is one device-to-device memcpy, no kernel (a copy-free view would need tensors that
//! share one device buffer, which `Storage::Cuda` does not do). bf16 device values (`Storage::CudaBf16`) are
//! shared buffers, so their reshape copies nothing.
//!
//! Backward: dx = dout under x's shape (again a copy in the same order). Activation grads are written (`=`).
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};
use rayon::prelude::*;

/// Elements per rayon task for the copy.
const CHUNK: usize = 1 << 16;

/// Row-major order does not change under a reshape, so the reference is the element-by-element identity.
pub fn reshape_fwd_ref(out: &mut [f64], x: &[f64]) {
    for (o, x) in out.iter_mut().zip(x) {
        *o = *x;
    }
}

/// Parallel copy; also the backward (dx = dout in the same order).
pub fn reshape_fwd_cpu(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| o.copy_from_slice(x));
}

pub fn reshape(tape: &mut Tape, x: Var, shape: &[usize]) -> Result<Var> {
    let from = tape.value(x).shape().to_vec();
    if numel(shape) != numel(&from) {
        return Err(Error::shape(
            "reshape",
            format!(
                "{from:?} ({} elements) -> {shape:?} ({} elements): the element count must not change",
                numel(&from),
                numel(shape)
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    match tape.value(x).storage() {
        crate::tensor::Storage::Cuda(b) => {
            let out = Tensor::from_gpu(shape, b.try_clone()?)?;
            return Ok(tape.push_op(out, &[x], Box::new(ReshapeBackward)));
        }
        // bf16 device values are shared, never written once made: the output shares x's buffer.
        crate::tensor::Storage::CudaBf16(_) => {
            let out = tape.value(x).clone().reshape(shape)?;
            return Ok(tape.push_op(out, &[x], Box::new(ReshapeBackward)));
        }
        _ => {}
    }
    let mut out = tape.alloc(shape);
    reshape_fwd_cpu(out.f32s_mut("reshape")?, tape.value(x).f32s("reshape")?);
    Ok(tape.push_op(out, &[x], Box::new(ReshapeBackward)))
}

struct ReshapeBackward;

impl Backward for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn passes_dout_through(&self) -> bool {
        true
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
                dx.gpu_mut("reshape_bwd")?
                    .copy_from(dout.gpu("reshape_bwd")?)?;
            }
            return Ok(());
        }
        if let Some(dx) = &mut d[0] {
            reshape_fwd_cpu(dx.f32s_mut("reshape_bwd")?, dout.f32s("reshape_bwd")?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    #[test]
    fn reshape_cpu_matches_ref_and_adjoint_matches_finite_differences() {
        let mut rng = Rng::new(31);
        // 70_001 spans two rayon chunks with a ragged last one.
        for n in [1, 7, 13, 70_001] {
            let x = rng.normal_vec(n, 1.0);
            let mut out = vec![0.0; n];
            reshape_fwd_cpu(&mut out, &x);
            let mut want = vec![0.0; n];
            reshape_fwd_ref(&mut want, &to_f64(&x));
            // A copy: exact.
            assert_close("reshape fwd", &out, &want, 0.0, 0.0);
            if n <= 13 {
                let r = to_f64(&rng.normal_vec(n, 1.0));
                let fd = finite_diff(&to_f64(&x), 1e-4, |x| {
                    let mut o = vec![0.0; n];
                    reshape_fwd_ref(&mut o, x);
                    dot64(&o, &r)
                });
                // The backward is the same copy applied to dout: d(dot(out, r))/dx = r.
                let mut dx = vec![0.0; n];
                reshape_fwd_ref(&mut dx, &r);
                assert_close_f64("reshape dx ref vs fd", &dx, &fd, 1e-9, 1e-9);
            }
        }
    }

    #[test]
    fn reshape_on_the_tape_keeps_order_and_routes_grads_back() {
        let mut rng = Rng::new(32);
        let x = rng.normal_vec(2 * 3 * 12, 1.0);
        let r = rng.normal_vec(2 * 3 * 12, 1.0);
        let mut tape = Tape::new();
        let vx = tape.leaf(Tensor::from_vec(&[2, 3, 12], x.clone()).unwrap(), true);
        let y = reshape(&mut tape, vx, &[2, 3, 4, 3]).unwrap();
        assert_eq!(tape.value(y).shape(), &[2, 3, 4, 3]);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &x[..]);
        // Through a second reshape, so the gradient crosses two shape changes.
        let z = reshape(&mut tape, y, &[6, 12]).unwrap();
        let vr = tape.input(Tensor::from_vec(&[6, 12], r.clone()).unwrap());
        let prod = crate::ops::mul::mul(&mut tape, z, vr).unwrap();
        let loss = crate::ops::sum::sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();
        let g = tape.grad(vx).unwrap();
        assert_eq!(g.shape(), &[2, 3, 12]);
        assert_eq!(g.f32s("t").unwrap(), &r[..]);
        // A one-element tensor reshapes to a scalar and back.
        let s = tape.input(Tensor::from_vec(&[1, 1], vec![4.0]).unwrap());
        let s = reshape(&mut tape, s, &[]).unwrap();
        assert_eq!(tape.value(s).shape(), &[] as &[usize]);
    }

    #[test]
    fn reshape_rejects_a_different_element_count() {
        let mut tape = Tape::new();
        let x = tape.input(Tensor::zeros(&[2, 3]));
        let err = reshape(&mut tape, x, &[4, 2]).unwrap_err().to_string();
        assert!(
            err.contains("reshape") && err.contains("[2, 3]") && err.contains("[4, 2]"),
            "{err}"
        );
    }
}
