//! transpose: swaps two dimensions of a contiguous tensor into a new contiguous tensor
//! (e.g. [B, T, H, D] -> [B, H, T, D] with dims 1, 2, or a weight [N, K] -> [K, N]).
//!
//! Backward: dx = transpose(dout, dim0, dim1): swapping the same two dims of the output shape gives back the
//! input shape, so the op is its own inverse and its own adjoint. Activation grads are written (`=`).
//! On the GPU: `cuda/transpose.cu`, one thread per output value.
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Output rows per task when the contiguous run `inner` is short: a TILE x TILE block of (j, i) pairs keeps
/// the strided reads of x within a few cache lines (a blocked transpose).
const TILE: usize = 16;

/// `shape` with entries `dim0` and `dim1` swapped. Both must be in range (checked by `transpose`).
pub fn transposed_shape(shape: &[usize], dim0: usize, dim1: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s.swap(dim0, dim1);
    s
}

/// Reference by multi-indices: out[idx] = x[idx with idx[dim0] and idx[dim1] swapped].
pub fn transpose_fwd_ref(out: &mut [f64], x: &[f64], shape: &[usize], dim0: usize, dim1: usize) {
    let out_shape = transposed_shape(shape, dim0, dim1);
    let mut idx = vec![0usize; shape.len()];
    for (flat, o) in out.iter_mut().enumerate() {
        let mut rest = flat;
        for d in (0..out_shape.len()).rev() {
            idx[d] = rest % out_shape[d];
            rest /= out_shape[d];
        }
        idx.swap(dim0, dim1);
        let src = idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i);
        *o = x[src];
    }
}

/// x seen as [outer, n0, mid, n1, inner] (n0, n1 the swapped dims, a < b) becomes out [outer, n1, mid, n0, inner].
/// Each task writes a contiguous block of output rows j (one row = mid·n0·inner values) and copies runs of
/// `inner` contiguous values.
pub fn transpose_fwd_cpu(out: &mut [f32], x: &[f32], shape: &[usize], dim0: usize, dim1: usize) {
    let (a, b) = (dim0.min(dim1), dim0.max(dim1));
    if a == b || out.is_empty() {
        out.par_chunks_mut(1 << 16)
            .zip(x.par_chunks(1 << 16))
            .for_each(|(o, x)| o.copy_from_slice(x));
        return;
    }
    let (n0, n1) = (shape[a], shape[b]);
    let mid: usize = shape[a + 1..b].iter().product();
    let inner: usize = shape[b + 1..].iter().product();
    let out_row = mid * n0 * inner;
    let rows_per_task = if inner >= TILE { 1 } else { TILE };
    out.par_chunks_mut(n1 * out_row)
        .zip(x.par_chunks(n0 * mid * n1 * inner))
        .for_each(|(out_slab, x_slab)| {
            out_slab
                .par_chunks_mut(rows_per_task * out_row)
                .enumerate()
                .for_each(|(task, o)| {
                    let j0 = task * rows_per_task;
                    let rows = o.len() / out_row;
                    for m in 0..mid {
                        for i0 in (0..n0).step_by(TILE) {
                            for jj in 0..rows {
                                for i in i0..(i0 + TILE).min(n0) {
                                    let src = ((i * mid + m) * n1 + j0 + jj) * inner;
                                    let dst = ((jj * mid + m) * n0 + i) * inner;
                                    o[dst..dst + inner].copy_from_slice(&x_slab[src..src + inner]);
                                }
                            }
                        }
                    }
                });
        });
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "transpose",
    code: include_str!("../../cuda/transpose.cu"),
};

/// `transpose_fwd_cpu` on the GPU: x of `shape` with dims `dim0` and `dim1` swapped into out (the backward
/// is the same call on dout with the transposed shape). Equal dims are a plain device copy.
#[cfg(feature = "cuda")]
pub fn transpose_fwd_cuda(
    out: &mut GpuBuf,
    x: &GpuBuf,
    shape: &[usize],
    dim0: usize,
    dim1: usize,
) -> Result<()> {
    let (a, b) = (dim0.min(dim1), dim0.max(dim1));
    if a == b {
        return out.copy_from(x);
    }
    let n = out.len();
    let (n0, n1) = (shape[a], shape[b]);
    let mid: usize = shape[a + 1..b].iter().product();
    let inner: usize = shape[b + 1..].iter().product();
    out.ctx().launch_1d(
        &CUDA,
        "transpose_fwd_f32",
        n,
        &[
            out.arg(),
            x.arg(),
            Arg::I64(n as i64),
            Arg::I64(n0 as i64),
            Arg::I64(mid as i64),
            Arg::I64(n1 as i64),
            Arg::I64(inner as i64),
        ],
    )
}

pub fn transpose(tape: &mut Tape, x: Var, dim0: usize, dim1: usize) -> Result<Var> {
    let shape = tape.value(x).shape().to_vec();
    if dim0 >= shape.len() || dim1 >= shape.len() {
        return Err(Error::invalid(
            "transpose",
            format!(
                "dims ({dim0}, {dim1}) out of range for shape {shape:?} ({} dims)",
                shape.len()
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("transpose", &[tape.value(x)])? {
        let mut out = ctx.alloc(tape.value(x).numel())?;
        transpose_fwd_cuda(
            &mut out,
            tape.value(x).gpu("transpose")?,
            &shape,
            dim0,
            dim1,
        )?;
        let out = Tensor::from_gpu(&transposed_shape(&shape, dim0, dim1), out)?;
        return Ok(tape.push_op(out, &[x], Box::new(TransposeBackward { dim0, dim1 })));
    }
    let mut out = tape.alloc(&transposed_shape(&shape, dim0, dim1));
    transpose_fwd_cpu(
        out.f32s_mut("transpose")?,
        tape.value(x).f32s("transpose")?,
        &shape,
        dim0,
        dim1,
    );
    Ok(tape.push_op(out, &[x], Box::new(TransposeBackward { dim0, dim1 })))
}

struct TransposeBackward {
    dim0: usize,
    dim1: usize,
}

impl Backward for TransposeBackward {
    fn name(&self) -> &'static str {
        "transpose"
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
                let op = "transpose_bwd";
                let (gx, g) = (dx.gpu_mut(op)?, dout.gpu(op)?);
                transpose_fwd_cuda(gx, g, output.shape(), self.dim0, self.dim1)?;
            }
            return Ok(());
        }
        if let Some(dx) = &mut d[0] {
            transpose_fwd_cpu(
                dx.f32s_mut("transpose_bwd")?,
                dout.f32s("transpose_bwd")?,
                output.shape(),
                self.dim0,
                self.dim1,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::numel;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    /// Shapes and dim pairs covering: last two dims with inner = 1 (tiled path, ragged tiles), the attention
    /// layout swap with a long inner run, a non-adjacent pair with a mid block, dims given in reverse order,
    /// a size-1 dim, and dim0 == dim1 (a copy).
    fn cases() -> Vec<(Vec<usize>, usize, usize)> {
        vec![
            (vec![1, 1], 0, 1),
            (vec![7, 13], 0, 1),
            (vec![33, 17], 1, 0),
            (vec![2, 5, 3, 16], 1, 2),
            (vec![3, 7, 2, 5, 3], 1, 3),
            (vec![2, 1, 9, 4], 3, 1),
            (vec![4, 6], 1, 1),
        ]
    }

    #[test]
    fn transpose_cpu_matches_ref_and_backward_matches_finite_differences() {
        let mut rng = Rng::new(41);
        for (shape, d0, d1) in cases() {
            let n = numel(&shape);
            let x = rng.normal_vec(n, 1.0);
            let mut out = vec![0.0; n];
            transpose_fwd_cpu(&mut out, &x, &shape, d0, d1);
            let mut want = vec![0.0; n];
            transpose_fwd_ref(&mut want, &to_f64(&x), &shape, d0, d1);
            // A permutation of the values: exact.
            assert_close(
                &format!("transpose fwd {shape:?} ({d0}, {d1})"),
                &out,
                &want,
                0.0,
                0.0,
            );

            // Backward: the same swap applied to dout, whose shape is the transposed one.
            let out_shape = transposed_shape(&shape, d0, d1);
            let r = rng.normal_vec(n, 1.0);
            let mut dx_ref = vec![0.0; n];
            transpose_fwd_ref(&mut dx_ref, &to_f64(&r), &out_shape, d0, d1);
            let fd = finite_diff(&to_f64(&x), 1e-4, |x| {
                let mut o = vec![0.0; n];
                transpose_fwd_ref(&mut o, x, &shape, d0, d1);
                dot64(&o, &to_f64(&r))
            });
            // Linear: central differences are exact up to f64 rounding.
            assert_close_f64("transpose dx ref vs fd", &dx_ref, &fd, 1e-9, 1e-9);
            let mut dx = vec![0.0; n];
            transpose_fwd_cpu(&mut dx, &r, &out_shape, d0, d1);
            assert_close("transpose dx cpu", &dx, &dx_ref, 0.0, 0.0);
        }
    }

    #[test]
    fn transpose_cpu_matches_ref_on_a_large_matrix() {
        // Many tiles per task and tasks per slab, with ragged edges (ragged in both dims).
        let mut rng = Rng::new(42);
        let shape = [2, 301, 77];
        let x = rng.normal_vec(numel(&shape), 1.0);
        let mut out = vec![0.0; x.len()];
        transpose_fwd_cpu(&mut out, &x, &shape, 1, 2);
        let mut want = vec![0.0; x.len()];
        transpose_fwd_ref(&mut want, &to_f64(&x), &shape, 1, 2);
        assert_close("transpose large", &out, &want, 0.0, 0.0);
    }

    #[test]
    fn transpose_on_the_tape_gives_value_and_grad() {
        let mut rng = Rng::new(43);
        let shape = [2, 5, 3, 4];
        let n = numel(&shape);
        let x = rng.normal_vec(n, 1.0);
        let r = rng.normal_vec(n, 1.0);
        let mut tape = Tape::new();
        let vx = tape.leaf(Tensor::from_vec(&shape, x.clone()).unwrap(), true);
        let y = transpose(&mut tape, vx, 1, 2).unwrap();
        assert_eq!(tape.value(y).shape(), &[2, 3, 5, 4]);
        let mut want = vec![0.0; n];
        transpose_fwd_cpu(&mut want, &x, &shape, 1, 2);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
        let vr = tape.input(Tensor::from_vec(&[2, 3, 5, 4], r.clone()).unwrap());
        let prod = crate::ops::mul::mul(&mut tape, y, vr).unwrap();
        let loss = crate::ops::sum::sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();
        let mut dx_ref = vec![0.0; n];
        transpose_fwd_ref(&mut dx_ref, &to_f64(&r), &[2, 3, 5, 4], 1, 2);
        let g = tape.grad(vx).unwrap();
        assert_eq!(g.shape(), &shape);
        assert_close("transpose tape dx", g.f32s("t").unwrap(), &dx_ref, 0.0, 0.0);
    }

    #[test]
    fn transpose_rejects_dims_out_of_range() {
        let mut tape = Tape::new();
        let x = tape.input(Tensor::zeros(&[2, 3]));
        let err = transpose(&mut tape, x, 0, 2).unwrap_err().to_string();
        assert!(
            err.contains("transpose") && err.contains("[2, 3]") && err.contains("(0, 2)"),
            "{err}"
        );
    }
}
