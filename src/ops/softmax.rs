//! softmax over the last dimension: y = exp(x - max(x)) / sum(exp(x - max(x))) per row. Subtracting the row
//! max keeps every exponent <= 0, so nothing overflows; -inf entries (masked positions) give exactly 0.
//!
//! Backward from the saved output: dx = y * (dy - sum_j dy_j * y_j) per row. Activation gradients are written
//! (`=`); the tape accumulates. On the GPU: `cuda/softmax.cu`, one block per row both ways.
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{GpuBuf, KernelSource};
use crate::ops::simd;
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::f32x8;

/// Rows per rayon task at least this many elements together, so that short rows do not become tiny tasks.
const MIN_TASK_ELEMS: usize = 1 << 12;

pub fn softmax_fwd_ref(out: &mut [f64], x: &[f64], c: usize) {
    for (o, x) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut total = 0.0;
        for (o, &x) in o.iter_mut().zip(x) {
            *o = (x - max).exp();
            total += *o;
        }
        for o in o.iter_mut() {
            *o /= total;
        }
    }
}

pub fn softmax_bwd_ref(dx: &mut [f64], dout: &[f64], y: &[f64], c: usize) {
    for ((dx, dy), y) in dx
        .chunks_exact_mut(c)
        .zip(dout.chunks_exact(c))
        .zip(y.chunks_exact(c))
    {
        let s: f64 = dy.iter().zip(y).map(|(a, b)| a * b).sum();
        for ((d, &g), &y) in dx.iter_mut().zip(dy).zip(y) {
            *d = y * (g - s);
        }
    }
}

/// One row in place: `row` holds x on entry and y on return.
fn softmax_row(row: &mut [f32]) {
    let n = row.len() / 8 * 8;
    let mut maxv = f32x8::splat(f32::NEG_INFINITY);
    for v in row[..n].chunks_exact(8) {
        maxv = maxv.max(simd::load(v));
    }
    let max = maxv
        .to_array()
        .iter()
        .chain(&row[n..])
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let (maxv, mut acc) = (f32x8::splat(max), f32x8::ZERO);
    for v in row[..n].chunks_exact_mut(8) {
        let e = (simd::load(v) - maxv).exp();
        acc += e;
        v.copy_from_slice(e.as_array_ref());
    }
    let mut total = acc.reduce_add();
    for v in &mut row[n..] {
        *v = (*v - max).exp();
        total += *v;
    }
    simd::scale_assign(row, 1.0 / total);
}

pub fn softmax_fwd_cpu(out: &mut [f32], x: &[f32], c: usize) {
    out.copy_from_slice(x);
    out.par_chunks_mut(c)
        .with_min_len(MIN_TASK_ELEMS.div_ceil(c))
        .for_each(softmax_row);
}

pub fn softmax_bwd_cpu(dx: &mut [f32], dout: &[f32], y: &[f32], c: usize) {
    dx.par_chunks_mut(c)
        .zip(dout.par_chunks(c).zip(y.par_chunks(c)))
        .with_min_len(MIN_TASK_ELEMS.div_ceil(c))
        .for_each(|(dx, (dy, y))| {
            let s = simd::dot(dy, y);
            for ((d, &g), &y) in dx.iter_mut().zip(dy).zip(y) {
                *d = y * (g - s);
            }
        });
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "softmax",
    code: include_str!("../../cuda/softmax.cu"),
};

/// Threads per row: the row length rounded up to whole warps, at most `gpu::BLOCK` (short attention rows
/// should not leave most of a 256-thread block idle).
#[cfg(feature = "cuda")]
fn row_threads(c: usize) -> u32 {
    (c.div_ceil(32) * 32).min(crate::gpu::BLOCK as usize) as u32
}

/// The grid: one block per row of `c` values (c > 0).
#[cfg(feature = "cuda")]
fn grid_rows(len: usize, c: usize) -> Result<u32> {
    u32::try_from(len / c).map_err(|_| {
        Error::invalid(
            "softmax_cuda",
            format!("{} rows exceed one launch", len / c),
        )
    })
}

/// One block per row of `c` values (c > 0).
#[cfg(feature = "cuda")]
pub fn softmax_fwd_cuda(out: &mut GpuBuf, x: &GpuBuf, c: usize) -> Result<()> {
    let rows = grid_rows(x.len(), c)?;
    out.ctx().launch(
        &CUDA,
        "softmax_fwd_f32",
        (rows, 1, 1),
        (row_threads(c), 1, 1),
        0,
        &[out.arg(), x.arg(), crate::gpu::Arg::I32(c as i32)],
    )
}

/// dx = y · (dy − Σ dy·y) per row, from the saved output y.
#[cfg(feature = "cuda")]
pub fn softmax_bwd_cuda(dx: &mut GpuBuf, dout: &GpuBuf, y: &GpuBuf, c: usize) -> Result<()> {
    let rows = grid_rows(y.len(), c)?;
    dx.ctx().launch(
        &CUDA,
        "softmax_bwd_f32",
        (rows, 1, 1),
        (row_threads(c), 1, 1),
        0,
        &[
            dx.arg(),
            dout.arg(),
            y.arg(),
            crate::gpu::Arg::I32(c as i32),
        ],
    )
}

pub fn softmax(tape: &mut Tape, x: Var) -> Result<Var> {
    let shape = tape.value(x).shape().to_vec();
    let c = match shape.last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(Error::shape(
                "softmax",
                format!("input {shape:?} needs a non-empty last dimension to normalise over"),
            ))
        }
    };
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("softmax", &[tape.value(x)])? {
        let mut out = ctx.alloc(tape.value(x).numel())?;
        softmax_fwd_cuda(&mut out, tape.value(x).gpu("softmax")?, c)?;
        let out = Tensor::from_gpu(&shape, out)?;
        return Ok(tape.push_op(out, &[x], Box::new(SoftmaxBackward { c })));
    }
    let mut out = tape.alloc(&shape);
    softmax_fwd_cpu(out.f32s_mut("softmax")?, tape.value(x).f32s("softmax")?, c);
    Ok(tape.push_op(out, &[x], Box::new(SoftmaxBackward { c })))
}

struct SoftmaxBackward {
    c: usize,
}

impl Backward for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax"
    }
    fn backward(
        &self,
        _: &[&Tensor],
        output: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            if let Some(dx) = &mut d[0] {
                let op = "softmax_bwd";
                softmax_bwd_cuda(dx.gpu_mut(op)?, dout.gpu(op)?, output.gpu(op)?, self.c)?;
            }
            return Ok(());
        }
        if let Some(dx) = &mut d[0] {
            softmax_bwd_cpu(
                dx.f32s_mut("softmax_bwd")?,
                dout.f32s("softmax_bwd")?,
                output.f32s("softmax_bwd")?,
                self.c,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{mul::mul, sum::sum};
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    // y in (0, 1]: f32 exp (a few ulp) and the normalising sum over up to 1000 terms give ~1e-6 relative.
    const FWD_ATOL: f64 = 1e-7;
    const FWD_RTOL: f64 = 1e-5;
    // dx = y * (dy - s): s is a dot of f32 values of order 1, so its absolute error (~1e-6) dominates.
    const BWD_ATOL: f64 = 2e-6;
    const BWD_RTOL: f64 = 1e-5;

    /// Rows of std 3, one row shifted by +1000 (overflows without the max subtraction) and, where rows are
    /// long enough, -inf entries as a causal mask writes them.
    fn inputs(rng: &mut Rng, rows: usize, c: usize) -> Vec<f32> {
        let mut x = rng.normal_vec(rows * c, 3.0);
        for v in &mut x[..c] {
            *v += 1000.0;
        }
        if rows > 1 && c > 2 {
            x[c + c / 2..2 * c].fill(f32::NEG_INFINITY);
        }
        x
    }

    #[test]
    fn softmax_cpu_matches_ref_forward_and_backward() {
        let mut rng = Rng::new(41);
        for (rows, c) in [(1, 1), (3, 7), (5, 13), (4, 33), (2, 1000), (700, 9)] {
            let x = inputs(&mut rng, rows, c);
            let dout = rng.normal_vec(rows * c, 1.0);
            let mut y = vec![0.0; rows * c];
            softmax_fwd_cpu(&mut y, &x, c);
            let mut want = vec![0.0; rows * c];
            softmax_fwd_ref(&mut want, &to_f64(&x), c);
            let name = format!("softmax fwd [{rows}, {c}]");
            assert_close(&name, &y, &want, FWD_ATOL, FWD_RTOL);

            // Both backwards from the reference output, so that only the backward is compared.
            let mut dx = vec![0.0; rows * c];
            softmax_bwd_cpu(&mut dx, &dout, &to_f32(&want), c);
            let mut want_dx = vec![0.0; rows * c];
            softmax_bwd_ref(&mut want_dx, &to_f64(&dout), &want, c);
            let name = format!("softmax bwd [{rows}, {c}]");
            assert_close(&name, &dx, &want_dx, BWD_ATOL, BWD_RTOL);
        }
    }

    #[test]
    fn softmax_bwd_ref_matches_finite_differences() {
        let mut rng = Rng::new(42);
        let (rows, c) = (3, 11);
        let x = to_f64(&rng.normal_vec(rows * c, 2.0));
        let r = to_f64(&rng.normal_vec(rows * c, 1.0));
        let fwd = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            softmax_fwd_ref(&mut y, x, c);
            y
        };
        let mut dx = vec![0.0; rows * c];
        softmax_bwd_ref(&mut dx, &r, &fwd(&x), c);
        let fd = finite_diff(&x, 1e-5, |x| dot64(&fwd(x), &r));
        // Central differences: O(h^2) truncation ~1e-10, rounding ~1e-11.
        assert_close_f64("softmax dx vs fd", &dx, &fd, 1e-8, 1e-7);
    }

    #[test]
    fn softmax_on_tape_matches_cpu_kernels() {
        let mut rng = Rng::new(43);
        let shape = [2, 3, 17];
        let n = 102;
        let x = rng.normal_vec(n, 2.0);
        let r = rng.normal_vec(n, 1.0);
        let mut tape = Tape::new();
        let vx = tape.leaf(Tensor::from_vec(&shape, x.clone()).unwrap(), true);
        let y = softmax(&mut tape, vx).unwrap();
        let mut want_y = vec![0.0; n];
        softmax_fwd_cpu(&mut want_y, &x, 17);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want_y[..]);
        for row in want_y.chunks(17) {
            let total: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((total - 1.0).abs() < 1e-6, "row sums to {total}");
        }
        let vr = tape.input(Tensor::from_vec(&shape, r.clone()).unwrap());
        let p = mul(&mut tape, y, vr).unwrap();
        let loss = sum(&mut tape, p).unwrap();
        tape.backward(loss).unwrap();
        let mut want = vec![0.0; n];
        softmax_bwd_cpu(&mut want, &r, &want_y, 17);
        assert_eq!(tape.grad(vx).unwrap().f32s("t").unwrap(), &want[..]);
    }

    #[test]
    fn softmax_rejects_an_empty_last_dimension() {
        let mut tape = Tape::new();
        for shape in [vec![3, 0], vec![]] {
            let x = tape.input(Tensor::zeros(&shape));
            let err = softmax(&mut tape, x).unwrap_err().to_string();
            assert!(
                err.contains("softmax") && err.contains(&format!("{shape:?}")),
                "{err}"
            );
        }
    }
}
