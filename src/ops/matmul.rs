//! matmul: batched out[b] = a[b]·b[b] with a [Bt.., M, K], b [Bt.., K, N] -> out [Bt.., M, N]; both operands
//! have the same leading (batch) dims, possibly none (plain 2-D product). No broadcasting.
//!
//! Backward: da[b] = dout[b]·b[b]ᵀ, db[b] = a[b]ᵀ·dout[b], written (`=`; the tape adds). Rayon runs the batch
//! entries in parallel and each `sgemm` splits its own work too; rayon's work stealing nests the two, so a
//! single large product and many small ones (attention heads) both fill the cores. On the GPU each of the
//! three products is one cuBLAS strided-batched SGEMM over the whole batch (true f32, as `GpuContext::sgemm`).
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::GpuBuf;
use crate::ops::gemm::{sgemm, sgemm_ref};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Batch count and the matrix dims of one product: a [M, K], b [K, N], out [M, N].
#[derive(Clone, Copy, Debug)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

pub fn matmul_fwd_ref(out: &mut [f64], a: &[f64], b: &[f64], d: MatmulDims) {
    let MatmulDims { batch, m, k, n } = d;
    for i in 0..batch {
        let (a, b) = (&a[i * m * k..][..m * k], &b[i * k * n..][..k * n]);
        sgemm_ref(
            false,
            false,
            m,
            n,
            k,
            1.0,
            a,
            b,
            0.0,
            &mut out[i * m * n..][..m * n],
        );
    }
}

pub fn matmul_bwd_ref(
    da: Option<&mut [f64]>,
    db: Option<&mut [f64]>,
    dout: &[f64],
    a: &[f64],
    b: &[f64],
    d: MatmulDims,
) {
    let MatmulDims { batch, m, k, n } = d;
    if let Some(da) = da {
        for i in 0..batch {
            let (g, b) = (&dout[i * m * n..][..m * n], &b[i * k * n..][..k * n]);
            sgemm_ref(
                false,
                true,
                m,
                k,
                n,
                1.0,
                g,
                b,
                0.0,
                &mut da[i * m * k..][..m * k],
            );
        }
    }
    if let Some(db) = db {
        for i in 0..batch {
            let (a, g) = (&a[i * m * k..][..m * k], &dout[i * m * n..][..m * n]);
            sgemm_ref(
                true,
                false,
                k,
                n,
                m,
                1.0,
                a,
                g,
                0.0,
                &mut db[i * k * n..][..k * n],
            );
        }
    }
}

/// Runs `f(out_i, x_i, y_i)` for every batch entry in parallel; `sizes` are the per-entry lengths of out, x, y.
fn per_batch(
    out: &mut [f32],
    x: &[f32],
    y: &[f32],
    sizes: (usize, usize, usize),
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) {
    let (so, sx, sy) = sizes;
    // An empty output (M, N or K zero) has nothing to write, and par_chunks_mut(0) would panic.
    if so == 0 {
        return;
    }
    out.par_chunks_mut(so)
        .enumerate()
        .for_each(|(i, o)| f(o, &x[i * sx..][..sx], &y[i * sy..][..sy]));
}

pub fn matmul_fwd_cpu(out: &mut [f32], a: &[f32], b: &[f32], d: MatmulDims) {
    let MatmulDims { m, k, n, .. } = d;
    per_batch(out, a, b, (m * n, m * k, k * n), |o, a, b| {
        sgemm(false, false, m, n, k, 1.0, a, b, 0.0, o)
    });
}

/// Gradients of `matmul_fwd_cpu`; each `Some` slice is overwritten.
pub fn matmul_bwd_cpu(
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dout: &[f32],
    a: &[f32],
    b: &[f32],
    d: MatmulDims,
) {
    let MatmulDims { m, k, n, .. } = d;
    if let Some(da) = da {
        per_batch(da, dout, b, (m * k, m * n, k * n), |da, g, b| {
            sgemm(false, true, m, k, n, 1.0, g, b, 0.0, da)
        });
    }
    if let Some(db) = db {
        per_batch(db, a, dout, (k * n, m * k, m * n), |db, a, g| {
            sgemm(true, false, k, n, m, 1.0, a, g, 0.0, db)
        });
    }
}

#[cfg(feature = "cuda")]
pub fn matmul_fwd_cuda(out: &mut GpuBuf, a: &GpuBuf, b: &GpuBuf, d: MatmulDims) -> Result<()> {
    let MatmulDims { batch, m, k, n } = d;
    let ctx = a.ctx().clone();
    ctx.sgemm_strided_batched(false, false, batch, m, n, k, 1.0, a, b, 0.0, out)
}

/// Gradients of `matmul_fwd_cuda`; each `Some` buffer is overwritten.
#[cfg(feature = "cuda")]
pub fn matmul_bwd_cuda(
    da: Option<&mut GpuBuf>,
    db: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    a: &GpuBuf,
    b: &GpuBuf,
    d: MatmulDims,
) -> Result<()> {
    let MatmulDims { batch, m, k, n } = d;
    let ctx = dout.ctx().clone();
    if let Some(da) = da {
        ctx.sgemm_strided_batched(false, true, batch, m, k, n, 1.0, dout, b, 0.0, da)?;
    }
    if let Some(db) = db {
        ctx.sgemm_strided_batched(true, false, batch, k, n, m, 1.0, a, dout, 0.0, db)?;
    }
    Ok(())
}

pub fn matmul(tape: &mut Tape, a: Var, b: Var) -> Result<Var> {
    let sa = tape.value(a).shape().to_vec();
    let sb = tape.value(b).shape().to_vec();
    let r = sa.len();
    if r < 2 || sb.len() != r || sa[..r - 2] != sb[..r - 2] || sa[r - 1] != sb[r - 2] {
        return Err(Error::shape(
            "matmul",
            format!("a {sa:?}, b {sb:?}: need a [Bt.., M, K], b [Bt.., K, N] with equal Bt.."),
        ));
    }
    let dims = MatmulDims {
        batch: sa[..r - 2].iter().product(),
        m: sa[r - 2],
        k: sa[r - 1],
        n: sb[r - 1],
    };
    let mut so = sa.clone();
    so[r - 1] = dims.n;
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("matmul", &[tape.value(a), tape.value(b)])? {
        let mut out = ctx.alloc(dims.batch * dims.m * dims.n)?;
        matmul_fwd_cuda(
            &mut out,
            tape.value(a).gpu("matmul")?,
            tape.value(b).gpu("matmul")?,
            dims,
        )?;
        let out = Tensor::from_gpu(&so, out)?;
        return Ok(tape.push_op(out, &[a, b], Box::new(MatmulBackward { dims })));
    }
    let mut out = tape.alloc(&so);
    matmul_fwd_cpu(
        out.f32s_mut("matmul")?,
        tape.value(a).f32s("matmul")?,
        tape.value(b).f32s("matmul")?,
        dims,
    );
    Ok(tape.push_op(out, &[a, b], Box::new(MatmulBackward { dims })))
}

struct MatmulBackward {
    dims: MatmulDims,
}

impl Backward for MatmulBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        let [da, db] = d else {
            return Err(Error::Autograd(format!(
                "matmul backward got {} gradient slots, expected 2",
                d.len()
            )));
        };
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            let op = "matmul_bwd";
            return matmul_bwd_cuda(
                da.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                db.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dout.gpu(op)?,
                inputs[0].gpu(op)?,
                inputs[1].gpu(op)?,
                self.dims,
            );
        }
        let (a, b) = (inputs[0].f32s("matmul_bwd")?, inputs[1].f32s("matmul_bwd")?);
        let da = da.as_mut().map(|t| t.f32s_mut("matmul_bwd")).transpose()?;
        let db = db.as_mut().map(|t| t.f32s_mut("matmul_bwd")).transpose()?;
        matmul_bwd_cpu(da, db, dout.f32s("matmul_bwd")?, a, b, self.dims);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    /// (batch dims, M, K, N): 2-D, one and two batch dims, odd sizes, sizes that cross sgemm's blocks, K = 0.
    const SHAPES: &[(&[usize], usize, usize, usize)] = &[
        (&[], 1, 1, 1),
        (&[], 7, 13, 5),
        (&[3], 1, 9, 17),
        (&[2, 3], 5, 7, 3),
        (&[4], 33, 65, 20),
        (&[2], 150, 40, 70),
        (&[2], 3, 0, 4),
    ];

    fn dims(bt: &[usize], m: usize, k: usize, n: usize) -> MatmulDims {
        let batch = bt.iter().product();
        MatmulDims { batch, m, k, n }
    }

    fn shape(bt: &[usize], r: usize, c: usize) -> Vec<usize> {
        bt.iter().copied().chain([r, c]).collect()
    }

    #[test]
    fn matmul_cpu_matches_ref_forward_and_backward() {
        let mut rng = Rng::new(31);
        for &(bt, m, k, n) in SHAPES {
            let d = dims(bt, m, k, n);
            let a = rng.normal_vec(d.batch * m * k, 1.0);
            let b = rng.normal_vec(d.batch * k * n, 1.0);
            let g = rng.normal_vec(d.batch * m * n, 1.0);
            let (a64, b64, g64) = (to_f64(&a), to_f64(&b), to_f64(&g));
            let mut out = vec![f32::NAN; g.len()];
            matmul_fwd_cpu(&mut out, &a, &b, d);
            let mut want = vec![0.0; g.len()];
            matmul_fwd_ref(&mut want, &a64, &b64, d);
            // f32 sums of at most 150 unit-variance products: rounding far below 1e-4.
            const TOL: f64 = 1e-4;
            assert_close(&format!("matmul fwd {d:?}"), &out, &want, TOL, TOL);
            let (mut da, mut db) = (vec![f32::NAN; a.len()], vec![f32::NAN; b.len()]);
            matmul_bwd_cpu(Some(&mut da), Some(&mut db), &g, &a, &b, d);
            let (mut wa, mut wb) = (vec![0.0; a.len()], vec![0.0; b.len()]);
            matmul_bwd_ref(Some(&mut wa), Some(&mut wb), &g64, &a64, &b64, d);
            assert_close(&format!("matmul da {d:?}"), &da, &wa, TOL, TOL);
            assert_close(&format!("matmul db {d:?}"), &db, &wb, TOL, TOL);
        }
    }

    #[test]
    fn matmul_bwd_ref_matches_finite_differences() {
        let mut rng = Rng::new(32);
        let d = dims(&[2], 3, 4, 5);
        let a = to_f64(&rng.normal_vec(2 * 3 * 4, 1.0));
        let b = to_f64(&rng.normal_vec(2 * 4 * 5, 1.0));
        let r = to_f64(&rng.normal_vec(2 * 3 * 5, 1.0));
        let loss = |a: &[f64], b: &[f64]| {
            let mut o = vec![0.0; r.len()];
            matmul_fwd_ref(&mut o, a, b, d);
            dot64(&o, &r)
        };
        let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
        matmul_bwd_ref(Some(&mut da), Some(&mut db), &r, &a, &b, d);
        // Bilinear loss: central differences are exact up to f64 rounding.
        const TOL: f64 = 1e-8;
        let fd_a = finite_diff(&a, 1e-4, |v| loss(v, &b));
        let fd_b = finite_diff(&b, 1e-4, |v| loss(&a, v));
        assert_close_f64("matmul da fd", &da, &fd_a, TOL, TOL);
        assert_close_f64("matmul db fd", &db, &fd_b, TOL, TOL);
    }

    #[test]
    fn matmul_on_the_tape_matches_cpu_value_and_ref_grads() {
        let mut rng = Rng::new(33);
        let (bt, m, k, n) = (&[2usize, 3][..], 4, 6, 5);
        let d = dims(bt, m, k, n);
        let a = rng.normal_vec(d.batch * m * k, 1.0);
        let b = rng.normal_vec(d.batch * k * n, 1.0);
        let r = rng.normal_vec(d.batch * m * n, 1.0);
        let mut tape = Tape::new();
        let va = tape.leaf(Tensor::from_vec(&shape(bt, m, k), a.clone()).unwrap(), true);
        let vb = tape.leaf(Tensor::from_vec(&shape(bt, k, n), b.clone()).unwrap(), true);
        let y = matmul(&mut tape, va, vb).unwrap();
        assert_eq!(tape.value(y).shape(), &shape(bt, m, n)[..]);
        let mut want = vec![0.0; r.len()];
        matmul_fwd_cpu(&mut want, &a, &b, d);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);

        let rv = tape.input(Tensor::from_vec(&shape(bt, m, n), r.clone()).unwrap());
        let prod = crate::ops::mul::mul(&mut tape, y, rv).unwrap();
        let loss = crate::ops::sum::sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();
        let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
        matmul_bwd_ref(
            Some(&mut da),
            Some(&mut db),
            &to_f64(&r),
            &to_f64(&a),
            &to_f64(&b),
            d,
        );
        // Sums of at most 6 unit-variance products in f32.
        const TOL: f64 = 1e-5;
        let ga = tape.grad(va).unwrap().f32s("t").unwrap();
        let gb = tape.grad(vb).unwrap().f32s("t").unwrap();
        assert_close("tape matmul da", ga, &da, TOL, TOL);
        assert_close("tape matmul db", gb, &db, TOL, TOL);
    }

    #[test]
    fn matmul_rejects_mismatched_shapes() {
        let mut tape = Tape::new();
        for (sa, sb) in [
            (vec![2, 3], vec![4, 5]),
            (vec![2, 2, 3], vec![3, 3, 5]),
            (vec![2, 3], vec![2, 3, 5]),
            (vec![3], vec![3]),
        ] {
            let a = tape.input(Tensor::zeros(&sa));
            let b = tape.input(Tensor::zeros(&sb));
            let err = matmul(&mut tape, a, b).unwrap_err().to_string();
            assert!(
                err.contains("matmul")
                    && err.contains(&format!("{sa:?}"))
                    && err.contains(&format!("{sb:?}")),
                "{err}"
            );
        }
    }
}
