//! add: out = a + b, where b has a's shape or a suffix of it (broadcast over a's leading dimensions).
//!
//! Backward: da = dout; db = dout summed over the broadcast rows (`ops::reduce_rows`, the one place that
//! reduces broadcast gradients). This file is the pattern every op follows: f64 `_ref` loops, the f32
//! SIMD/rayon `_cpu` version, the `_cuda` launches of `cuda/add.cu` (the `cuda` feature), the tape wrapper with
//! its `Backward` (which runs where the inputs are), and tests (the GPU ones in tests/cuda_equivalence.rs).
use crate::autograd::{Backward, Tape, Var};
#[cfg(feature = "cuda")]
use crate::error::Error;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::ops::{check_suffix, reduce_rows, simd};
#[cfg(feature = "cuda")]
use crate::tensor::numel;
use crate::tensor::Tensor;
use rayon::prelude::*;

pub fn add_fwd_ref(out: &mut [f64], a: &[f64], b: &[f64]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = a[i] + b[i % b.len()];
    }
}

pub fn add_fwd_cpu(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(b.len())
        .zip(a.par_chunks(b.len()))
        .for_each(|(o, a)| {
            o.copy_from_slice(a);
            simd::add_assign(o, b);
        });
}

pub fn add_bwd_ref(da: Option<&mut [f64]>, db: Option<&mut [f64]>, dout: &[f64]) {
    if let Some(da) = da {
        da.copy_from_slice(dout);
    }
    if let Some(db) = db {
        db.fill(0.0);
        let n = db.len();
        for (i, d) in dout.iter().enumerate() {
            db[i % n] += d;
        }
    }
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "add",
    code: include_str!("../../cuda/add.cu"),
};

/// out = a + b broadcast; out and a have the same length, a multiple of b's.
#[cfg(feature = "cuda")]
pub fn add_fwd_cuda(out: &mut GpuBuf, a: &GpuBuf, b: &GpuBuf) -> Result<()> {
    let n = out.len();
    out.ctx().launch_1d(
        &CUDA,
        "add_fwd_f32",
        n,
        &[
            out.arg(),
            a.arg(),
            b.arg(),
            Arg::I64(n as i64),
            Arg::I64(b.len() as i64),
        ],
    )
}

/// db[j] = sum over rows of dout[r, j], rows = dout.len() / db.len(): the column sums every broadcast gradient
/// and every per-block partial (rmsnorm's dw, linear's db) reduces with.
#[cfg(feature = "cuda")]
pub fn add_bwd_cuda(db: &mut GpuBuf, dout: &GpuBuf) -> Result<()> {
    let nb = db.len();
    if nb == 0 || !dout.len().is_multiple_of(nb) {
        return Err(Error::shape(
            "add_bwd_cuda",
            format!("{} values do not split into rows of {nb}", dout.len()),
        ));
    }
    let rows = dout.len() / nb;
    db.ctx().launch(
        &CUDA,
        "add_bwd_f32",
        (nb.div_ceil(32) as u32, 1, 1),
        (32, 8, 1),
        0,
        &[
            db.arg(),
            dout.arg(),
            Arg::I64(rows as i64),
            Arg::I64(nb as i64),
        ],
    )
}

/// dst += src (the tape's gradient accumulation on the device).
#[cfg(feature = "cuda")]
pub fn add_assign_cuda(dst: &mut GpuBuf, src: &GpuBuf) -> Result<()> {
    if dst.len() != src.len() {
        return Err(Error::shape(
            "add_assign_cuda",
            format!("{} values += {} values", dst.len(), src.len()),
        ));
    }
    let n = dst.len();
    dst.ctx().launch_1d(
        &CUDA,
        "add_assign_f32",
        n,
        &[dst.arg(), src.arg(), Arg::I64(n as i64)],
    )
}

pub fn add(tape: &mut Tape, a: Var, b: Var) -> Result<Var> {
    let (sa, sb) = (
        tape.value(a).shape().to_vec(),
        tape.value(b).shape().to_vec(),
    );
    check_suffix("add", &sa, &sb)?;
    let same_shape = sa == sb;
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("add", &[tape.value(a), tape.value(b)])? {
        let mut out = ctx.alloc(numel(&sa))?;
        add_fwd_cuda(
            &mut out,
            tape.value(a).gpu("add")?,
            tape.value(b).gpu("add")?,
        )?;
        let out = Tensor::from_gpu(&sa, out)?;
        return Ok(tape.push_op(out, &[a, b], Box::new(AddBackward { same_shape })));
    }
    let mut out = tape.alloc(&sa);
    add_fwd_cpu(
        out.f32s_mut("add")?,
        tape.value(a).f32s("add")?,
        tape.value(b).f32s("add")?,
    );
    Ok(tape.push_op(out, &[a, b], Box::new(AddBackward { same_shape })))
}

/// Records `value` = a + b for same-shaped a and b, computed by a fused kernel (`ops::rmsnorm::add_rmsnorm`), with
/// `add`'s backward.
#[cfg(feature = "cuda")]
pub(crate) fn push_same_shape_add(tape: &mut Tape, a: Var, b: Var, value: Tensor) -> Var {
    tape.push_op(value, &[a, b], Box::new(AddBackward { same_shape: true }))
}

/// `same_shape`: b is not broadcast, so both gradients are dout itself (the residual stream's add), which the
/// tape passes on without a copy.
struct AddBackward {
    same_shape: bool,
}

impl Backward for AddBackward {
    fn name(&self) -> &'static str {
        "add"
    }
    fn passes_dout_through(&self) -> bool {
        self.same_shape
    }
    fn overwrites_dinputs(&self) -> bool {
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
            let dout = dout.gpu("add_bwd")?;
            if let Some(da) = &mut d[0] {
                da.gpu_mut("add_bwd")?.copy_from(dout)?;
            }
            if let Some(db) = &mut d[1] {
                add_bwd_cuda(db.gpu_mut("add_bwd")?, dout)?;
            }
            return Ok(());
        }
        let dout = dout.f32s("add_bwd")?;
        if let Some(da) = &mut d[0] {
            da.f32s_mut("add_bwd")?.copy_from_slice(dout);
        }
        if let Some(db) = &mut d[1] {
            reduce_rows(db.f32s_mut("add_bwd")?, dout);
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
    fn add_cpu_matches_ref_and_grads_match_finite_differences() {
        let mut rng = Rng::new(7);
        for (sa, sb) in [
            (vec![3, 5], vec![3, 5]),
            (vec![2, 3, 17], vec![17]),
            (vec![4, 9], vec![9]),
            // Two scalars (summed losses).
            (vec![], vec![]),
        ] {
            let a = rng.normal_vec(sa.iter().product(), 1.0);
            let b = rng.normal_vec(sb.iter().product(), 1.0);
            let mut out = vec![0.0; a.len()];
            add_fwd_cpu(&mut out, &a, &b);
            let mut want = vec![0.0; a.len()];
            add_fwd_ref(&mut want, &to_f64(&a), &to_f64(&b));
            assert_close("add fwd", &out, &want, 1e-6, 1e-6);

            // Tape backward against finite differences of the f64 reference (exact for a linear op).
            let r = to_f64(&rng.normal_vec(a.len(), 1.0));
            let mut tape = Tape::new();
            let va = tape.leaf(Tensor::from_vec(&sa, a.clone()).unwrap(), true);
            let vb = tape.leaf(Tensor::from_vec(&sb, b.clone()).unwrap(), true);
            let y = add(&mut tape, va, vb).unwrap();
            let rv = tape.input(Tensor::from_vec(&sa, to_f32(&r)).unwrap());
            let prod = crate::ops::mul::mul(&mut tape, y, rv).unwrap();
            let loss = crate::ops::sum::sum(&mut tape, prod).unwrap();
            tape.backward(loss).unwrap();
            let (a64, b64) = (to_f64(&a), to_f64(&b));
            let f = |a: &[f64], b: &[f64]| {
                let mut o = vec![0.0; a.len()];
                add_fwd_ref(&mut o, a, b);
                dot64(&o, &r)
            };
            let fd_a = finite_diff(&a64, 1e-3, |x| f(x, &b64));
            let fd_b = finite_diff(&b64, 1e-3, |x| f(&a64, x));
            // The op is linear, so central differences are exact up to f64 rounding.
            assert_close(
                "add da",
                tape.grad(va).unwrap().f32s("t").unwrap(),
                &fd_a,
                1e-5,
                1e-5,
            );
            assert_close(
                "add db",
                tape.grad(vb).unwrap().f32s("t").unwrap(),
                &fd_b,
                1e-5,
                1e-5,
            );
        }
    }

    #[test]
    fn add_rejects_shapes_that_do_not_broadcast() {
        let mut tape = Tape::new();
        let a = tape.input(Tensor::zeros(&[2, 3]));
        let b = tape.input(Tensor::zeros(&[2]));
        let err = add(&mut tape, a, b).unwrap_err().to_string();
        assert!(
            err.contains("add") && err.contains("[2, 3]") && err.contains("[2]"),
            "{err}"
        );
        // A scalar is not a suffix of a tensor's shape.
        let s = tape.input(Tensor::zeros(&[]));
        assert!(add(&mut tape, a, s).is_err());
    }
}
