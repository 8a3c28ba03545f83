use super::*;
use crate::ops::{mul::mul, sum::sum};
use crate::tensor::rng::Rng;
use crate::testing::*;

/// Random q [B, T, H, D], k and v [B, T, G, D] with unit-variance entries.
fn inputs(s: AttentionShape, rng: &mut Rng) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
    (
        rng.normal_vec(nq, 1.0),
        rng.normal_vec(nkv, 1.0),
        rng.normal_vec(nkv, 1.0),
    )
}

fn shape(b: usize, t: usize, h: usize, g: usize, d: usize) -> AttentionShape {
    AttentionShape { b, t, h, g, d }
}

fn fwd_cpu(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; s.b * s.h * s.t];
    attention_fwd_cpu(&mut out, &mut lse, q, k, v, s);
    (out, lse)
}

/// Reference gradients (dq, dk, dv) for upstream gradient r.
fn bwd_ref(r: &[f64], q: &[f64], k: &[f64], v: &[f64], s: AttentionShape) -> [Vec<f64>; 3] {
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_bwd_ref(&mut dq, &mut dk, &mut dv, r, q, k, v, s);
    [dq, dk, dv]
}

// f32 vs f64 on unit-variance inputs, T up to 130: the largest differences seen are 1.2e-7 (forward, a convex
// combination of V rows) and 6e-7 (gradients, sums of up to T products through the softmax Jacobian);
// the bounds leave several times that for other seeds and BLAS summation orders.
const FWD_ATOL: f64 = 1e-6;
const FWD_RTOL: f64 = 1e-6;
const BWD_ATOL: f64 = 4e-6;
const BWD_RTOL: f64 = 1e-5;

#[test]
fn attention_cpu_matches_ref_fwd_and_bwd() {
    let mut rng = Rng::new(17);
    // Odd T, D 4/8/64, H/G 4/2, 3/3 and 9/3; T = 130 spans three query blocks, the last one 2 rows.
    for s in [
        shape(1, 1, 4, 2, 4),
        shape(2, 5, 3, 3, 8),
        shape(1, 13, 9, 3, 64),
        shape(2, 13, 4, 2, 8),
        shape(1, 5, 9, 3, 4),
        shape(1, 130, 4, 2, 16),
    ] {
        let (q, k, v) = inputs(s, &mut rng);
        let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
        let (out, lse) = fwd_cpu(&q, &k, &v, s);
        let mut want = vec![0.0; q.len()];
        attention_fwd_ref(&mut want, &q64, &k64, &v64, s);
        assert_close(
            &format!("attention fwd {s:?}"),
            &out,
            &want,
            FWD_ATOL,
            FWD_RTOL,
        );

        let r = rng.normal_vec(q.len(), 1.0);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_bwd_cpu(&mut dq, &mut dk, &mut dv, &r, &q, &k, &v, &out, &lse, s);
        let [wq, wk, wv] = bwd_ref(&to_f64(&r), &q64, &k64, &v64, s);
        assert_close(&format!("attention dq {s:?}"), &dq, &wq, BWD_ATOL, BWD_RTOL);
        assert_close(&format!("attention dk {s:?}"), &dk, &wk, BWD_ATOL, BWD_RTOL);
        assert_close(&format!("attention dv {s:?}"), &dv, &wv, BWD_ATOL, BWD_RTOL);
    }
}

#[test]
fn attention_bwd_ref_matches_finite_differences() {
    let mut rng = Rng::new(23);
    for s in [
        shape(1, 4, 4, 2, 3),
        shape(2, 3, 3, 3, 2),
        shape(1, 5, 6, 2, 4),
    ] {
        let (q, k, v) = inputs(s, &mut rng);
        let (q, k, v) = (to_f64(&q), to_f64(&k), to_f64(&v));
        let r = to_f64(&rng.normal_vec(q.len(), 1.0));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut out = vec![0.0; q.len()];
            attention_fwd_ref(&mut out, q, k, v, s);
            dot64(&out, &r)
        };
        let [dq, dk, dv] = bwd_ref(&r, &q, &k, &v, s);
        // Central differences in f64 with h = 1e-5: truncation ~h² and rounding ~eps/h, both under 1e-9.
        let h = 1e-5;
        let fd_q = finite_diff(&q, h, |x| loss(x, &k, &v));
        let fd_k = finite_diff(&k, h, |x| loss(&q, x, &v));
        let fd_v = finite_diff(&v, h, |x| loss(&q, &k, x));
        assert_close_f64(&format!("attention dq fd {s:?}"), &dq, &fd_q, 1e-8, 1e-6);
        assert_close_f64(&format!("attention dk fd {s:?}"), &dk, &fd_k, 1e-8, 1e-6);
        assert_close_f64(&format!("attention dv fd {s:?}"), &dv, &fd_v, 1e-8, 1e-6);
    }
}

#[test]
fn attention_tape_end_to_end_matches_cpu_and_ref() {
    let mut rng = Rng::new(29);
    let s = shape(2, 7, 6, 3, 8);
    let (q, k, v) = inputs(s, &mut rng);
    let r = rng.normal_vec(q.len(), 1.0);
    let [wq, wk, wv] = bwd_ref(&to_f64(&r), &to_f64(&q), &to_f64(&k), &to_f64(&v), s);
    // All three trainable, then k frozen: its gradient goes to scratch and the others must not change.
    for k_trains in [true, false] {
        let mut tape = Tape::new();
        let vq = tape.leaf(Tensor::from_vec(&[2, 7, 6, 8], q.clone()).unwrap(), true);
        let vk = tape.leaf(
            Tensor::from_vec(&[2, 7, 3, 8], k.clone()).unwrap(),
            k_trains,
        );
        let vv = tape.leaf(Tensor::from_vec(&[2, 7, 3, 8], v.clone()).unwrap(), true);
        let y = attention(&mut tape, vq, vk, vv).unwrap();
        assert_eq!(
            tape.value(y).f32s("t").unwrap(),
            fwd_cpu(&q, &k, &v, s).0.as_slice()
        );
        let rv = tape.input(Tensor::from_vec(&[2, 7, 6, 8], r.clone()).unwrap());
        let prod = mul(&mut tape, y, rv).unwrap();
        let loss = sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();
        let grad = |x| tape.grad(x).unwrap().f32s("t").unwrap();
        assert_close("attention tape dq", grad(vq), &wq, BWD_ATOL, BWD_RTOL);
        assert_close("attention tape dv", grad(vv), &wv, BWD_ATOL, BWD_RTOL);
        if k_trains {
            assert_close("attention tape dk", grad(vk), &wk, BWD_ATOL, BWD_RTOL);
        } else {
            assert!(tape.grad(vk).is_none());
        }
    }
}

#[test]
fn attention_output_at_t_ignores_later_keys_and_values() {
    let mut rng = Rng::new(31);
    // T = 70 puts the changed position inside the second query block's diagonal, where scores are computed.
    let s = shape(1, 70, 4, 2, 8);
    let (q, k, v) = inputs(s, &mut rng);
    let (out, _) = fwd_cpu(&q, &k, &v, s);
    let row = s.h * s.d;
    for changed in [0, 5, 66, 69] {
        let (mut k2, mut v2) = (k.clone(), v.clone());
        for x in &mut k2[changed * s.g * s.d..(changed + 1) * s.g * s.d] {
            *x += 3.0;
        }
        for x in &mut v2[changed * s.g * s.d..(changed + 1) * s.g * s.d] {
            *x -= 2.0;
        }
        let (out2, _) = fwd_cpu(&q, &k2, &v2, s);
        assert_eq!(
            out[..changed * row],
            out2[..changed * row],
            "position {changed} leaked backwards"
        );
        let at = changed * row..(changed + 1) * row;
        assert!(
            out[at.clone()].iter().zip(&out2[at]).any(|(a, b)| a != b),
            "position {changed} ignored"
        );
    }
}

#[test]
fn attention_propagates_nan_from_keys() {
    let mut rng = Rng::new(37);
    // T = 20: rows past 8 see the NaN inside an 8-lane chunk of the SIMD max, earlier rows in its scalar tail.
    let s = shape(1, 20, 2, 1, 4);
    let (q, mut k, v) = inputs(s, &mut rng);
    k[3 * s.d] = f32::NAN;
    let (out, _) = fwd_cpu(&q, &k, &v, s);
    let row = s.h * s.d;
    assert!(
        out[..3 * row].iter().all(|x| x.is_finite()),
        "rows before the NaN key stay finite"
    );
    assert!(
        out[3 * row..].iter().all(|x| x.is_nan()),
        "rows that attend to the NaN key are NaN"
    );
}

#[test]
fn attention_rejects_bad_shapes() {
    // (q shape, k shape, v shape, a phrase the error must contain)
    type Case = (
        &'static [usize],
        &'static [usize],
        &'static [usize],
        &'static str,
    );
    let cases: [Case; 5] = [
        (
            &[1, 4, 3, 8],
            &[1, 4, 2, 8],
            &[1, 4, 2, 8],
            "not a multiple",
        ),
        (
            &[1, 4, 4, 8],
            &[1, 4, 2, 4],
            &[1, 4, 2, 4],
            "share B, T and D",
        ),
        (
            &[1, 4, 4, 8],
            &[1, 5, 2, 8],
            &[1, 5, 2, 8],
            "share B, T and D",
        ),
        (
            &[1, 4, 4, 8],
            &[1, 4, 2, 8],
            &[1, 4, 1, 8],
            "k and v must be equal",
        ),
        (&[4, 4, 8], &[4, 2, 8], &[4, 2, 8], "4-D"),
    ];
    for (sq, sk, sv, why) in cases {
        let mut tape = Tape::new();
        let q = tape.input(Tensor::zeros(sq));
        let k = tape.input(Tensor::zeros(sk));
        let v = tape.input(Tensor::zeros(sv));
        let err = attention(&mut tape, q, k, v).unwrap_err().to_string();
        assert!(
            err.contains("attention") && err.contains(why) && err.contains(&format!("{sq:?}")),
            "{err}"
        );
    }
    let mut tape = Tape::new();
    let q = tape.input(Tensor::zeros(&[1, 0, 2, 4]));
    let k = tape.input(Tensor::zeros(&[1, 0, 2, 4]));
    let err = attention(&mut tape, q, k, k).unwrap_err().to_string();
    assert!(err.contains("positive"), "{err}");
}
