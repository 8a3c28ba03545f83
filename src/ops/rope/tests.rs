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
