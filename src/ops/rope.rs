//! rope: rotary position embedding of x [B, T, H, D] at positions pos = pos0 + t.
//!
//! Pair i (i < D/2) is rotated by theta_i = pos * base^(-2i/D). Two layouts say which dims form pair i:
//! - `HalfSplit`: dims (i, i + D/2), HF Llama's `rotate_half` (y = x*cos + rotate_half(x)*sin);
//! - `Interleaved`: dims (2i, 2i + 1), Meta's original code and llama.cpp on GGUF files.
//!
//! llama.cpp's HF -> GGUF converter permutes q/k rows per head (GGUF dim 2i <- HF dim i, 2i + 1 <- i + D/2),
//! so Interleaved rope on GGUF weights equals HalfSplit rope on HF weights (the test
//! `rope_layouts_agree_under_the_gguf_permutation` checks exactly this).
//!
//! Angles: the CPU path uses a cos/sin table [T, D/2] whose angles and cos/sin are computed in f64 and then
//! rounded to f32, so the rotation is exact to f32 rounding at every position. (HF computes pos * inv_freq in
//! f32, whose rounding reaches ~2e-4 rad by position 4096; ours are the f64 values.)
//!
//! Backward is the rotation by -theta (the transpose of a rotation). Activation gradients are written (`=`).
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (i, i + D/2): HF transformers' Llama (`rotate_half`).
    HalfSplit,
    /// Pairs (2i, 2i + 1): Meta's Llama and llama.cpp/GGUF.
    Interleaved,
}

impl RopeLayout {
    /// The two dims that form pair i of a head of `d` dims.
    #[inline]
    fn pair(self, i: usize, d: usize) -> (usize, usize) {
        match self {
            RopeLayout::HalfSplit => (i, i + d / 2),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}

/// theta_i at position `pos` in f64.
fn angle(pos: usize, i: usize, d: usize, base: f64) -> f64 {
    pos as f64 * base.powf(-2.0 * i as f64 / d as f64)
}

/// cos and sin of theta_i at positions pos0..pos0 + t, row-major [t, d/2].
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(t: usize, d: usize, pos0: usize, base: f32) -> RopeTable {
        let half = d / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| angle(1, i, d, base as f64)).collect();
        let (cos, sin) = (0..t * half)
            .into_par_iter()
            .map(|k| {
                let (s, c) = ((pos0 + k / half) as f64 * inv_freq[k % half]).sin_cos();
                (c as f32, s as f32)
            })
            .unzip();
        RopeTable { cos, sin }
    }
}

/// y = R(sign * theta) x for one head. `sign` = 1 is the forward, -1 the backward.
#[inline]
fn rotate_ref(y: &mut [f64], x: &[f64], pos: usize, base: f64, layout: RopeLayout, sign: f64) {
    let d = x.len();
    for i in 0..d / 2 {
        let (s, c) = (sign * angle(pos, i, d, base)).sin_cos();
        let (a, b) = layout.pair(i, d);
        y[a] = x[a] * c - x[b] * s;
        y[b] = x[a] * s + x[b] * c;
    }
}

/// `shape` is [B, T, H, D].
pub fn rope_fwd_ref(
    out: &mut [f64],
    x: &[f64],
    shape: [usize; 4],
    pos0: usize,
    base: f64,
    layout: RopeLayout,
) {
    let [_, t, h, d] = shape;
    for (k, (y, x)) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
        rotate_ref(y, x, pos0 + (k / h) % t, base, layout, 1.0);
    }
}

pub fn rope_bwd_ref(
    dx: &mut [f64],
    dout: &[f64],
    shape: [usize; 4],
    pos0: usize,
    base: f64,
    layout: RopeLayout,
) {
    let [_, t, h, d] = shape;
    for (k, (dx, dy)) in dx.chunks_exact_mut(d).zip(dout.chunks_exact(d)).enumerate() {
        rotate_ref(dx, dy, pos0 + (k / h) % t, base, layout, -1.0);
    }
}

/// One head: y = R(theta) x with `sin` negated for the backward.
#[inline]
fn rotate_head(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], layout: RopeLayout, sign: f32) {
    let half = cos.len();
    match layout {
        RopeLayout::HalfSplit => {
            let (y1, y2) = y.split_at_mut(half);
            let (x1, x2) = x.split_at(half);
            for i in 0..half {
                let (c, s) = (cos[i], sign * sin[i]);
                y1[i] = x1[i] * c - x2[i] * s;
                y2[i] = x1[i] * s + x2[i] * c;
            }
        }
        RopeLayout::Interleaved => {
            for (i, (y, x)) in y.chunks_exact_mut(2).zip(x.chunks_exact(2)).enumerate() {
                let (c, s) = (cos[i], sign * sin[i]);
                y[0] = x[0] * c - x[1] * s;
                y[1] = x[0] * s + x[1] * c;
            }
        }
    }
}

/// Parallel over the B*T rows of H*D values; every head of a row shares that row's table entries.
fn rotate_cpu(
    y: &mut [f32],
    x: &[f32],
    dims: [usize; 4],
    table: &RopeTable,
    layout: RopeLayout,
    sign: f32,
) {
    let [_, t, h, d] = dims;
    if y.is_empty() {
        return; // also covers H = 0, whose rows of H * D = 0 values could not be chunked
    }
    let half = d / 2;
    y.par_chunks_mut(h * d)
        .zip(x.par_chunks(h * d))
        .enumerate()
        .for_each(|(row, (y, x))| {
            let tt = row % t;
            let (cos, sin) = (
                &table.cos[tt * half..][..half],
                &table.sin[tt * half..][..half],
            );
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                rotate_head(y, x, cos, sin, layout, sign);
            }
        });
}

pub fn rope_fwd_cpu(
    out: &mut [f32],
    x: &[f32],
    shape: [usize; 4],
    table: &RopeTable,
    layout: RopeLayout,
) {
    rotate_cpu(out, x, shape, table, layout, 1.0);
}

pub fn rope_bwd_cpu(
    dx: &mut [f32],
    dout: &[f32],
    shape: [usize; 4],
    table: &RopeTable,
    layout: RopeLayout,
) {
    rotate_cpu(dx, dout, shape, table, layout, -1.0);
}

pub fn rope(tape: &mut Tape, x: Var, pos0: usize, base: f32, layout: RopeLayout) -> Result<Var> {
    let sx = tape.value(x).shape().to_vec();
    let shape: [usize; 4] = match sx[..] {
        [b, t, h, d] if d % 2 == 0 && d > 0 => [b, t, h, d],
        _ => {
            return Err(Error::shape(
                "rope",
                format!("x {sx:?} must be [B, T, H, D] with D even and > 0"),
            ))
        }
    };
    if !(base > 0.0 && base.is_finite()) {
        return Err(Error::invalid(
            "rope",
            format!("base must be finite and > 0, got {base}"),
        ));
    }
    let table = RopeTable::new(shape[1], shape[3], pos0, base);
    let mut out = tape.alloc(&sx);
    rope_fwd_cpu(
        out.f32s_mut("rope")?,
        tape.value(x).f32s("rope")?,
        shape,
        &table,
        layout,
    );
    let backward = RopeBackward {
        table,
        shape,
        layout,
    };
    Ok(tape.push_op(out, &[x], Box::new(backward)))
}

struct RopeBackward {
    table: RopeTable,
    shape: [usize; 4],
    layout: RopeLayout,
}

impl Backward for RopeBackward {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn backward(
        &self,
        _: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        if let Some(dx) = &mut d[0] {
            rope_bwd_cpu(
                dx.f32s_mut("rope_bwd")?,
                dout.f32s("rope_bwd")?,
                self.shape,
                &self.table,
                self.layout,
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
    use RopeLayout::{HalfSplit, Interleaved};

    // cos/sin rounded to f32 (relative 6e-8) and two f32 products per output: a few 1e-7 for |x| ~ 1.
    const ATOL: f64 = 1e-6;
    const RTOL: f64 = 1e-5;

    #[test]
    fn rope_cpu_matches_ref_forward_and_backward() {
        let mut rng = Rng::new(61);
        let shapes = [[1, 1, 1, 2], [2, 5, 3, 8], [1, 7, 2, 6], [2, 13, 3, 64]];
        // pos0 4090 is where an f32 angle would be off by ~2e-4 rad; base 5e5 as in Llama 3.
        for (shape, (pos0, base)) in shapes
            .iter()
            .zip([(0, 1e4), (4090, 1e4), (17, 5e5), (3, 1e4)])
        {
            for layout in [HalfSplit, Interleaved] {
                let n = shape.iter().product();
                let x = rng.normal_vec(n, 1.0);
                let dout = rng.normal_vec(n, 1.0);
                let table = RopeTable::new(shape[1], shape[3], pos0, base);
                let name = format!("rope {shape:?} {layout:?} pos0 {pos0}");
                let mut y = vec![0.0; n];
                rope_fwd_cpu(&mut y, &x, *shape, &table, layout);
                let mut want = vec![0.0; n];
                rope_fwd_ref(&mut want, &to_f64(&x), *shape, pos0, base as f64, layout);
                assert_close(&format!("{name} fwd"), &y, &want, ATOL, RTOL);
                let mut dx = vec![0.0; n];
                rope_bwd_cpu(&mut dx, &dout, *shape, &table, layout);
                let mut want = vec![0.0; n];
                rope_bwd_ref(&mut want, &to_f64(&dout), *shape, pos0, base as f64, layout);
                assert_close(&format!("{name} bwd"), &dx, &want, ATOL, RTOL);
            }
        }
    }

    #[test]
    fn rope_bwd_ref_matches_finite_differences() {
        let mut rng = Rng::new(62);
        let shape = [2, 3, 2, 6];
        let n = 72;
        for layout in [HalfSplit, Interleaved] {
            let x = to_f64(&rng.normal_vec(n, 1.0));
            let r = to_f64(&rng.normal_vec(n, 1.0));
            let mut dx = vec![0.0; n];
            rope_bwd_ref(&mut dx, &r, shape, 5, 1e4, layout);
            let fd = finite_diff(&x, 1e-4, |x| {
                let mut y = vec![0.0; n];
                rope_fwd_ref(&mut y, x, shape, 5, 1e4, layout);
                dot64(&y, &r)
            });
            // Linear in x: central differences are exact up to f64 rounding.
            assert_close_f64(&format!("rope {layout:?} dx vs fd"), &dx, &fd, 1e-9, 1e-9);
        }
    }

    #[test]
    fn rope_rotates_each_pair_by_pos_times_theta() {
        // D = 4, base = 100: theta_0 = pos, theta_1 = pos / 10. Unit vectors in each pair's first dim
        // must come out as (cos theta, sin theta) in that pair's dims.
        let (d, pos0, t) = (4, 3, 2);
        // Values of order 1 through f32 cos/sin and (for the round trip) c^2 + s^2: a couple of ulp of 1.
        const UNIT_ATOL: f64 = 3e-7;
        for layout in [HalfSplit, Interleaved] {
            for i in 0..2 {
                let (a, b) = layout.pair(i, d);
                let mut x = vec![0.0; t * d];
                x[a] = 1.0;
                x[d + a] = 1.0;
                let table = RopeTable::new(t, d, pos0, 100.0);
                let mut y = vec![0.0; t * d];
                rope_fwd_cpu(&mut y, &x, [1, t, 1, d], &table, layout);
                for tt in 0..t {
                    let theta = (pos0 + tt) as f64 / 10f64.powi(i as i32);
                    let mut want = vec![0.0; d];
                    (want[b], want[a]) = theta.sin_cos();
                    assert_close(
                        &format!("{layout:?} pair {i} t {tt}"),
                        &y[tt * d..][..d],
                        &want,
                        UNIT_ATOL,
                        0.0,
                    );
                }
                // The backward is the inverse rotation.
                let mut back = vec![0.0; t * d];
                rope_bwd_cpu(&mut back, &y, [1, t, 1, d], &table, layout);
                assert_close(
                    &format!("{layout:?} bwd undoes fwd"),
                    &back,
                    &to_f64(&x),
                    UNIT_ATOL,
                    0.0,
                );
            }
        }
    }

    /// llama.cpp's `LlamaModel.permute` of q/k rows, applied to head vectors: per head, view the D dims as
    /// [2, D/2], swap the two axes and flatten, i.e. GGUF dim 2i + j <- HF dim j * D/2 + i.
    fn hf_to_gguf(x: &[f32], d: usize) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            for j in 0..2 {
                for i in 0..d / 2 {
                    o[i * 2 + j] = x[j * (d / 2) + i];
                }
            }
        }
        out
    }

    #[test]
    fn rope_layouts_agree_under_the_gguf_permutation() {
        let mut rng = Rng::new(63);
        for shape in [[2, 5, 3, 8], [1, 9, 9, 64]] {
            let (n, d) = (shape.iter().product(), shape[3]);
            let x = rng.normal_vec(n, 1.0);
            let table = RopeTable::new(shape[1], d, 11, 1e4);
            let mut hf = vec![0.0; n];
            rope_fwd_cpu(&mut hf, &x, shape, &table, HalfSplit);
            let mut gguf = vec![0.0; n];
            rope_fwd_cpu(&mut gguf, &hf_to_gguf(&x, d), shape, &table, Interleaved);
            // Same products on the same operands in both layouts, so bit-identical.
            assert_eq!(gguf, hf_to_gguf(&hf, d), "forward {shape:?}");
            let mut hf_dx = vec![0.0; n];
            rope_bwd_cpu(&mut hf_dx, &x, shape, &table, HalfSplit);
            let mut gguf_dx = vec![0.0; n];
            rope_bwd_cpu(&mut gguf_dx, &hf_to_gguf(&x, d), shape, &table, Interleaved);
            assert_eq!(gguf_dx, hf_to_gguf(&hf_dx, d), "backward {shape:?}");
        }
    }

    #[test]
    fn rope_on_tape_matches_cpu_kernels() {
        let mut rng = Rng::new(64);
        let shape = [2, 3, 2, 10];
        let n = 120;
        let (x, r) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
        let table = RopeTable::new(3, 10, 7, 1e4);
        for layout in [HalfSplit, Interleaved] {
            let mut tape = Tape::new();
            let vx = tape.leaf(Tensor::from_vec(&shape, x.clone()).unwrap(), true);
            let y = rope(&mut tape, vx, 7, 1e4, layout).unwrap();
            let mut want = vec![0.0; n];
            rope_fwd_cpu(&mut want, &x, shape, &table, layout);
            assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
            let vr = tape.input(Tensor::from_vec(&shape, r.clone()).unwrap());
            let p = mul(&mut tape, y, vr).unwrap();
            let loss = sum(&mut tape, p).unwrap();
            tape.backward(loss).unwrap();
            rope_bwd_cpu(&mut want, &r, shape, &table, layout);
            assert_eq!(tape.grad(vx).unwrap().f32s("t").unwrap(), &want[..]);
        }
        // No heads: an empty output, not a panic on zero-length rows.
        let mut tape = Tape::new();
        let vx = tape.input(Tensor::zeros(&[1, 2, 0, 4]));
        let y = rope(&mut tape, vx, 0, 1e4, HalfSplit).unwrap();
        assert_eq!(tape.value(y).shape(), &[1, 2, 0, 4]);
    }

    #[test]
    fn rope_rejects_bad_shapes_and_base() {
        let mut tape = Tape::new();
        for shape in [vec![2, 3, 8], vec![1, 2, 3, 5], vec![1, 2, 3, 0]] {
            let x = tape.input(Tensor::zeros(&shape));
            let err = rope(&mut tape, x, 0, 1e4, HalfSplit)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("rope") && err.contains(&format!("{shape:?}")),
                "{err}"
            );
        }
        let x = tape.input(Tensor::zeros(&[1, 2, 3, 4]));
        for base in [0.0, -1.0, f32::INFINITY] {
            let err = rope(&mut tape, x, 0, base, Interleaved)
                .unwrap_err()
                .to_string();
            assert!(err.contains("rope") && err.contains("base"), "{err}");
        }
    }
}
