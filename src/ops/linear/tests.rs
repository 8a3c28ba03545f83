use super::*;
use crate::tensor::rng::Rng;
use crate::testing::*;

/// (x shape, N); K is x's last dim. Odd sizes, a [1, 1] case, one that crosses sgemm's blocks, K = 0.
const SHAPES: &[(&[usize], usize)] = &[
    (&[1, 1], 1),
    (&[7], 3),
    (&[2, 3, 13], 5),
    (&[33, 17], 65),
    (&[2, 150, 40], 24),
    (&[2, 0], 3),
];

fn grad(tape: &Tape, v: Var) -> &[f32] {
    tape.grad(v).unwrap().f32s("t").unwrap()
}

fn rand(rng: &mut Rng, shape: &[usize]) -> Vec<f32> {
    rng.normal_vec(shape.iter().product(), 1.0)
}

#[test]
fn linear_cpu_matches_ref_forward_and_backward() {
    let mut rng = Rng::new(21);
    for &(sx, n) in SHAPES {
        let k = *sx.last().unwrap();
        let rows = sx[..sx.len() - 1].iter().product();
        let d = LinearDims { rows, k, n };
        for with_bias in [false, true] {
            let (x, w, dout) = (
                rand(&mut rng, sx),
                rand(&mut rng, &[n, k]),
                rand(&mut rng, &[rows, n]),
            );
            let b = with_bias.then(|| rand(&mut rng, &[n]));
            let (x64, w64, b64, dout64) = (
                to_f64(&x),
                to_f64(&w),
                b.as_deref().map(to_f64),
                to_f64(&dout),
            );
            let mut out = vec![f32::NAN; rows * n];
            linear_fwd_cpu(&mut out, &x, &w, b.as_deref(), d);
            let mut want = vec![0.0; rows * n];
            linear_fwd_ref(&mut want, &x64, &w64, b64.as_deref(), d);
            // f32 sums of up to 150 unit-variance products: rounding ~ sqrt(150)·6e-8·|terms|, far below 1e-4.
            const TOL: f64 = 1e-4;
            assert_close(&format!("linear fwd {sx:?} n={n}"), &out, &want, TOL, TOL);

            let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; n]);
            linear_bwd_cpu(
                Some(&mut dx),
                Some(&mut dw),
                Some(&mut db),
                &dout,
                &x,
                &w,
                d,
            );
            let (mut wx, mut ww, mut wb) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; n]);
            linear_bwd_ref(
                Some(&mut wx),
                Some(&mut ww),
                Some(&mut wb),
                &dout64,
                &x64,
                &w64,
                d,
            );
            assert_close("linear dx", &dx, &wx, TOL, TOL);
            assert_close("linear dw", &dw, &ww, TOL, TOL);
            assert_close("linear db", &db, &wb, TOL, TOL);
        }
    }
}

#[test]
fn linear_bwd_ref_matches_finite_differences() {
    let mut rng = Rng::new(22);
    let (sx, k, n, rows) = ([2, 3, 5], 5, 4, 6);
    let d = LinearDims { rows, k, n };
    let x = to_f64(&rand(&mut rng, &sx));
    let w = to_f64(&rand(&mut rng, &[n, k]));
    let b = to_f64(&rand(&mut rng, &[n]));
    let r = to_f64(&rand(&mut rng, &[rows, n]));
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut o = vec![0.0; rows * n];
        linear_fwd_ref(&mut o, x, w, Some(b), d);
        dot64(&o, &r)
    };
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; n]);
    linear_bwd_ref(Some(&mut dx), Some(&mut dw), Some(&mut db), &r, &x, &w, d);
    // The loss is bilinear in (x, w) and linear in b: central differences are exact up to f64 rounding.
    const TOL: f64 = 1e-8;
    assert_close_f64(
        "linear dx fd",
        &dx,
        &finite_diff(&x, 1e-4, |v| loss(v, &w, &b)),
        TOL,
        TOL,
    );
    assert_close_f64(
        "linear dw fd",
        &dw,
        &finite_diff(&w, 1e-4, |v| loss(&x, v, &b)),
        TOL,
        TOL,
    );
    assert_close_f64(
        "linear db fd",
        &db,
        &finite_diff(&b, 1e-4, |v| loss(&x, &w, v)),
        TOL,
        TOL,
    );
}

#[test]
fn linear_on_the_tape_matches_cpu_value_and_ref_grads() {
    let mut rng = Rng::new(23);
    let (sx, k, n, rows) = ([3, 7, 9], 9, 11, 21);
    let d = LinearDims { rows, k, n };
    let (x, w, b, r) = (
        rand(&mut rng, &sx),
        rand(&mut rng, &[n, k]),
        rand(&mut rng, &[n]),
        rand(&mut rng, &[rows, n]),
    );
    let mut tape = Tape::new();
    let vw = tape
        .param(Tensor::from_vec(&[n, k], w.clone()).unwrap())
        .unwrap();
    let vb = tape
        .param(Tensor::from_vec(&[n], b.clone()).unwrap())
        .unwrap();
    let vx = tape.leaf(Tensor::from_vec(&sx, x.clone()).unwrap(), true);
    let y = linear(&mut tape, vx, vw, Some(vb)).unwrap();
    assert_eq!(tape.value(y).shape(), &[3, 7, n]);
    let mut want = vec![0.0; rows * n];
    linear_fwd_cpu(&mut want, &x, &w, Some(&b), d);
    assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);

    let rv = tape.input(Tensor::from_vec(&[3, 7, n], r.clone()).unwrap());
    let prod = crate::ops::mul::mul(&mut tape, y, rv).unwrap();
    let loss = crate::ops::sum::sum(&mut tape, prod).unwrap();
    tape.backward(loss).unwrap();
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; n]);
    let (x64, w64) = (to_f64(&x), to_f64(&w));
    linear_bwd_ref(
        Some(&mut dx),
        Some(&mut dw),
        Some(&mut db),
        &to_f64(&r),
        &x64,
        &w64,
        d,
    );
    // Sums of at most 21 unit-variance products in f32.
    const TOL: f64 = 1e-5;
    assert_close("tape linear dx", grad(&tape, vx), &dx, TOL, TOL);
    assert_close("tape linear dw", grad(&tape, vw), &dw, TOL, TOL);
    assert_close("tape linear db", grad(&tape, vb), &db, TOL, TOL);

    // Without a bias and with x a constant input: only dw flows.
    tape.reset();
    let vx = tape.input(Tensor::from_vec(&sx, x.clone()).unwrap());
    let y = linear(&mut tape, vx, vw, None).unwrap();
    let loss = crate::ops::sum::sum(&mut tape, y).unwrap();
    tape.zero_grad();
    tape.backward(loss).unwrap();
    let mut dw = vec![0.0; w.len()];
    linear_bwd_ref(
        None,
        Some(&mut dw),
        None,
        &vec![1.0; rows * n],
        &x64,
        &w64,
        d,
    );
    assert_close("tape linear dw (no bias)", grad(&tape, vw), &dw, TOL, TOL);
    assert!(tape.grad(vx).is_none());
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let mut tape = Tape::new();
    let x = tape.input(Tensor::zeros(&[2, 3]));
    let w = tape.input(Tensor::zeros(&[4, 5]));
    let w3 = tape.input(Tensor::zeros(&[4, 3, 1]));
    let wok = tape.input(Tensor::zeros(&[4, 3]));
    let bad_b = tape.input(Tensor::zeros(&[3]));
    let s = tape.input(Tensor::scalar(1.0));
    for (x, w, b, shapes) in [
        (x, w, None, ["[2, 3]", "[4, 5]"]),
        (x, w3, None, ["[2, 3]", "[4, 3, 1]"]),
        (x, wok, Some(bad_b), ["[4, 3]", "[3]"]),
        (s, wok, None, ["[]", "[4, 3]"]),
    ] {
        let err = linear(&mut tape, x, w, b).unwrap_err().to_string();
        assert!(
            err.contains("linear") && shapes.iter().all(|s| err.contains(s)),
            "{err}"
        );
    }
}
