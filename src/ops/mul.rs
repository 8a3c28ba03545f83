//! mul: out = a * b elementwise, b with a's shape or a suffix of it (broadcast over leading dimensions).
//! Backward: da = dout * b; db = sum over broadcast rows of dout * a. On the GPU: `cuda/mul.cu`.
use crate::autograd::{Backward, Tape, Var};
#[cfg(feature = "cuda")]
use crate::error::Error;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::ops::{check_suffix, reduce_rows};
use crate::tensor::Tensor;
use rayon::prelude::*;

pub fn mul_fwd_ref(out: &mut [f64], a: &[f64], b: &[f64]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = a[i] * b[i % b.len()];
    }
}

pub fn mul_fwd_cpu(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(b.len())
        .zip(a.par_chunks(b.len()))
        .for_each(|(o, a)| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a * b;
            }
        });
}

/// Gradients of `mul_fwd_ref`: da = dout · b (broadcast), db = column sums of dout · a.
pub fn mul_bwd_ref(
    da: Option<&mut [f64]>,
    db: Option<&mut [f64]>,
    dout: &[f64],
    a: &[f64],
    b: &[f64],
) {
    if let Some(da) = da {
        mul_fwd_ref(da, dout, b);
    }
    if let Some(db) = db {
        db.fill(0.0);
        let nb = db.len();
        for (i, (g, a)) in dout.iter().zip(a).enumerate() {
            db[i % nb] += g * a;
        }
    }
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "mul",
    code: include_str!("../../cuda/mul.cu"),
};

/// out = a · b broadcast; out and a have the same length, a multiple of b's.
#[cfg(feature = "cuda")]
pub fn mul_fwd_cuda(out: &mut GpuBuf, a: &GpuBuf, b: &GpuBuf) -> Result<()> {
    let n = out.len();
    out.ctx().launch_1d(
        &CUDA,
        "mul_fwd_f32",
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

/// da = dout · b (broadcast) and db = column sums of dout · a over the broadcast rows, each when given.
#[cfg(feature = "cuda")]
pub fn mul_bwd_cuda(
    da: Option<&mut GpuBuf>,
    db: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    a: &GpuBuf,
    b: &GpuBuf,
) -> Result<()> {
    let nb = b.len();
    if nb == 0 || !dout.len().is_multiple_of(nb) || a.len() != dout.len() {
        return Err(Error::shape(
            "mul_bwd_cuda",
            format!(
                "a {} and dout {} values do not split into rows of {nb}",
                a.len(),
                dout.len()
            ),
        ));
    }
    if let Some(da) = da {
        mul_fwd_cuda(da, dout, b)?;
    }
    if let Some(db) = db {
        let rows = dout.len() / nb;
        db.ctx().launch(
            &CUDA,
            "mul_bwd_f32",
            (nb.div_ceil(32) as u32, 1, 1),
            (32, 8, 1),
            0,
            &[
                db.arg(),
                a.arg(),
                dout.arg(),
                Arg::I64(rows as i64),
                Arg::I64(nb as i64),
            ],
        )?;
    }
    Ok(())
}

pub fn mul(tape: &mut Tape, a: Var, b: Var) -> Result<Var> {
    let (sa, sb) = (
        tape.value(a).shape().to_vec(),
        tape.value(b).shape().to_vec(),
    );
    check_suffix("mul", &sa, &sb)?;
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("mul", &[tape.value(a), tape.value(b)])? {
        let mut out = ctx.alloc(tape.value(a).numel())?;
        mul_fwd_cuda(
            &mut out,
            tape.value(a).gpu("mul")?,
            tape.value(b).gpu("mul")?,
        )?;
        let out = Tensor::from_gpu(&sa, out)?;
        return Ok(tape.push_op(out, &[a, b], Box::new(MulBackward)));
    }
    let mut out = tape.alloc(&sa);
    mul_fwd_cpu(
        out.f32s_mut("mul")?,
        tape.value(a).f32s("mul")?,
        tape.value(b).f32s("mul")?,
    );
    Ok(tape.push_op(out, &[a, b], Box::new(MulBackward)))
}

struct MulBackward;

impl Backward for MulBackward {
    fn name(&self) -> &'static str {
        "mul"
    }
    fn backward(
        &self,
        x: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            let op = "mul_bwd";
            let (da, db) = d.split_at_mut(1);
            return mul_bwd_cuda(
                da[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                db[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dout.gpu(op)?,
                x[0].gpu(op)?,
                x[1].gpu(op)?,
            );
        }
        let (a, b, dout) = (
            x[0].f32s("mul_bwd")?,
            x[1].f32s("mul_bwd")?,
            dout.f32s("mul_bwd")?,
        );
        if let Some(da) = &mut d[0] {
            mul_fwd_cpu(da.f32s_mut("mul_bwd")?, dout, b);
        }
        if let Some(db) = &mut d[1] {
            let mut prod = vec![0.0; a.len()];
            prod.par_iter_mut()
                .zip(a.par_iter().zip(dout.par_iter()))
                .for_each(|(p, (a, g))| *p = a * g);
            reduce_rows(db.f32s_mut("mul_bwd")?, &prod);
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
    fn mul_grads_match_finite_differences_including_repeated_input() {
        let mut rng = Rng::new(11);
        for (sa, sb) in [(vec![3, 5], vec![3, 5]), (vec![2, 3, 13], vec![13])] {
            let a = rng.normal_vec(sa.iter().product(), 1.0);
            let b = rng.normal_vec(sb.iter().product(), 1.0);
            let mut tape = Tape::new();
            let va = tape.leaf(Tensor::from_vec(&sa, a.clone()).unwrap(), true);
            let vb = tape.leaf(Tensor::from_vec(&sb, b.clone()).unwrap(), true);
            let y = mul(&mut tape, va, vb).unwrap();
            let loss = crate::ops::sum::sum(&mut tape, y).unwrap();
            tape.backward(loss).unwrap();
            let (a64, b64) = (to_f64(&a), to_f64(&b));
            let f = |a: &[f64], b: &[f64]| {
                let mut o = vec![0.0; a.len()];
                mul_fwd_ref(&mut o, a, b);
                o.iter().sum::<f64>()
            };
            let fd_a = finite_diff(&a64, 1e-3, |x| f(x, &b64));
            let fd_b = finite_diff(&b64, 1e-3, |x| f(&a64, x));
            // The f64 reference of the backward (dout = 1 for a plain sum) against the same differences.
            let (mut ra, mut rb) = (vec![0.0; a.len()], vec![0.0; b.len()]);
            mul_bwd_ref(
                Some(&mut ra),
                Some(&mut rb),
                &vec![1.0; a.len()],
                &a64,
                &b64,
            );
            assert_close_f64("mul da ref", &ra, &fd_a, 1e-8, 1e-8);
            assert_close_f64("mul db ref", &rb, &fd_b, 1e-8, 1e-8);
            // Bilinear: central differences are exact up to rounding; f32 products give ~1e-6 relative error.
            assert_close(
                "mul da",
                tape.grad(va).unwrap().f32s("t").unwrap(),
                &fd_a,
                1e-5,
                1e-5,
            );
            assert_close(
                "mul db",
                tape.grad(vb).unwrap().f32s("t").unwrap(),
                &fd_b,
                1e-5,
                1e-5,
            );
        }
        // x * x: the tape must add both contributions, d/dx sum(x^2) = 2x.
        let x = rng.normal_vec(10, 1.0);
        let mut tape = Tape::new();
        let vx = tape.leaf(Tensor::from_vec(&[10], x.clone()).unwrap(), true);
        let y = mul(&mut tape, vx, vx).unwrap();
        let loss = crate::ops::sum::sum(&mut tape, y).unwrap();
        tape.backward(loss).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| 2.0 * v as f64).collect();
        assert_close(
            "mul x*x",
            tape.grad(vx).unwrap().f32s("t").unwrap(),
            &want,
            1e-6,
            1e-6,
        );
    }
}
