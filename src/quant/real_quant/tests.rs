use super::linear::*;
use super::*;
use crate::autograd::Tape;
use crate::ops::{mul::mul, sum::sum};
use crate::quant::fake_quant::{
    fake_quant_bwd_cpu, fake_quant_fwd_cpu, init_minmax, PER_CHANNEL, SCALE_MAX, SCALE_MIN,
};
use crate::tensor::rng::Rng;
use crate::testing::*;

/// (out N, in K, group, wbits): odd sizes, groups that split 3-bit words (10 per word), per-channel.
const CASES: &[(usize, usize, i64, u32)] = &[
    (1, 8, 8, 2),
    (3, 13, PER_CHANNEL, 3),
    (5, 86, 43, 4),
    (7, 64, 32, 8),
    (4, 130, 65, 3),
    (33, 96, 32, 2),
];

/// Block-AP-like fake-quant parameters for w [n, k]: min-max init, then scales ×0.6..1.4 (some weights clamp),
/// zeros shifted by ±2.5 (non-integers, some outside [0, qmax] before their clamp), one scale below SCALE_MIN.
fn fake_quant_case(
    rng: &mut Rng,
    n: usize,
    k: usize,
    cfg: QuantConfig,
) -> (Tensor, Tensor, Tensor) {
    let w = Tensor::from_vec(&[n, k], rng.normal_vec(n * k, 0.05)).unwrap();
    let (s0, z0) = init_minmax(&w, cfg).unwrap();
    let mut s: Vec<f32> = s0
        .f32s("t")
        .unwrap()
        .iter()
        .map(|&s| s * (0.6 + 0.8 * rng.uniform() as f32))
        .collect();
    s[0] = SCALE_MIN / 2.0;
    let z = z0
        .f32s("t")
        .unwrap()
        .iter()
        .map(|&z| z + (5.0 * rng.uniform() - 2.5) as f32)
        .collect();
    let shape = s0.shape().to_vec();
    (
        w,
        Tensor::from_vec(&shape, s).unwrap(),
        Tensor::from_vec(&shape, z).unwrap(),
    )
}

#[test]
fn dequantize_equals_the_fake_quant_forward_bit_for_bit() {
    let mut rng = Rng::new(41);
    for &(n, k, group, wbits) in CASES {
        let cfg = QuantConfig::new(wbits, group).unwrap();
        let (w, s, z) = fake_quant_case(&mut rng, n, k, cfg);
        let g = cfg.group_len(k).unwrap();
        let mut want = vec![0.0f32; n * k];
        let (sv, zv) = (s.f32s("t").unwrap(), z.f32s("t").unwrap());
        fake_quant_fwd_cpu(&mut want, w.f32s("t").unwrap(), sv, zv, g, cfg.qmax());
        let q = QuantizedLinear::from_fake_quant(&w, &s, &z, cfg).unwrap();
        let got = q.dequantize().unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(got.f32s("t").unwrap()),
            bits(&want),
            "w{wbits} [{n}, {k}] g{g}"
        );
        // The stored parameters are the forward's clamped ones.
        let zr: Vec<u8> = zv
            .iter()
            .map(|z| z.round_ties_even().clamp(0.0, cfg.qmax()) as u8)
            .collect();
        assert_eq!(q.zeros(), &zr[..]);
        assert_eq!(q.scales().f32s("t").unwrap()[0], SCALE_MIN);
        assert!(q
            .scales()
            .f32s("t")
            .unwrap()
            .iter()
            .all(|s| (SCALE_MIN..=SCALE_MAX).contains(s)));
        assert!(q.int_weights().unwrap().iter().all(|&v| v < 1 << wbits));
    }
}

#[test]
fn from_fake_quant_rejects_bad_input() {
    let cfg = QuantConfig::new(4, 4).unwrap();
    let w = Tensor::from_vec(&[2, 8], (0..16).map(|i| i as f32 / 16.0).collect()).unwrap();
    let (s, z) = init_minmax(&w, cfg).unwrap();
    let e =
        QuantizedLinear::from_fake_quant(&w, &s, &z, QuantConfig::new(5, 4).unwrap()).unwrap_err();
    assert!(e.to_string().contains("5-bit"), "{e}");
    let e = QuantizedLinear::from_fake_quant(&w, &Tensor::zeros(&[2, 3]), &z, cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("real_quant") && e.contains("[2, 3]") && e.contains("[2, 2]"),
        "{e}"
    );
    let mut bad = w.clone();
    bad.f32s_mut("t").unwrap()[13] = f32::NAN;
    let e = QuantizedLinear::from_fake_quant(&bad, &s, &z, cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1 group 1"), "{e}");
    let e = QuantizedLinear::from_ints(4, 3, 8, 1, &[0; 8], &[0; 2], Tensor::zeros(&[1, 2]))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("group_size 3 must divide in_features 8"),
        "{e}"
    );
    let e = QuantizedLinear::from_ints(2, 4, 8, 1, &[0; 8], &[0, 4], Tensor::zeros(&[1, 2]))
        .unwrap_err();
    assert!(e.to_string().contains("zero point 4 at [0, 1]"), "{e}");
    let e = QuantizedLinear::from_ints(
        2,
        4,
        8,
        1,
        &[0; 8],
        &[0, 1],
        Tensor::full(&[1, 2], f32::INFINITY),
    );
    assert!(e.unwrap_err().to_string().contains("scales [0, 0]"));
}

/// A random layer and its integers, zeros and scales (as f64 for the references).
fn random_layer(
    rng: &mut Rng,
    n: usize,
    k: usize,
    g: usize,
    bits: u32,
) -> (QuantizedLinear, Vec<u32>, Vec<u32>, Vec<f64>) {
    let ng = k / g;
    let ints: Vec<u32> = (0..n * k).map(|_| rng.below(1 << bits) as u32).collect();
    let zeros: Vec<u32> = (0..n * ng).map(|_| rng.below(1 << bits) as u32).collect();
    let scales = rng.uniform_vec(n * ng, 0.01, 0.1);
    let q = QuantizedLinear::from_ints(
        bits,
        g,
        k,
        n,
        &ints,
        &zeros,
        Tensor::from_vec(&[n, ng], scales.clone()).unwrap(),
    );
    (q.unwrap(), ints, zeros, to_f64(&scales))
}

#[test]
fn real_quant_linear_cpu_matches_ref_forward_and_backward() {
    let mut rng = Rng::new(42);
    // (rows, n, k, g, bits): a single row, odd sizes, 3-bit groups across words, one crossing sgemm's blocks.
    for (rows, n, k, g, bits) in [
        (1, 1, 8, 8, 2),
        (7, 5, 30, 10, 3),
        (13, 33, 64, 16, 4),
        (3, 9, 13, 13, 8),
        (150, 40, 96, 32, 3),
    ] {
        let d = RealQuantDims { rows, k, n, g };
        let (q, ints, zeros, s64) = random_layer(&mut rng, n, k, g, bits);
        let (x, dout) = (rng.normal_vec(rows * k, 1.0), rng.normal_vec(rows * n, 1.0));
        let (x64, dout64) = (to_f64(&x), to_f64(&dout));
        let s = q.scales().f32s("t").unwrap();
        let mut out = vec![f32::NAN; rows * n];
        real_quant_linear_fwd_cpu(&mut out, &x, &q, s, rows).unwrap();
        let mut want = vec![0.0; rows * n];
        real_quant_linear_fwd_ref(&mut want, &x64, &ints, &zeros, &s64, d);
        // Ŵ is exact in f32 up to one product rounding; sums of ≤ 96 terms of size ≤ 0.1·255·|x|: f32
        // accumulation error ~ sqrt(96)·6e-8·25 ≈ 2e-5 relative to the terms.
        const TOL: f64 = 2e-4;
        assert_close(
            &format!("rq fwd {rows}x{k}->{n} w{bits}"),
            &out,
            &want,
            TOL,
            TOL,
        );
        let (mut dx, mut ds) = (vec![f32::NAN; rows * k], vec![f32::NAN; n * k / g]);
        real_quant_linear_bwd_cpu(Some(&mut dx), Some(&mut ds), &dout, &x, &q, s, rows).unwrap();
        let (mut wdx, mut wds) = (vec![0.0; rows * k], vec![0.0; n * k / g]);
        real_quant_linear_bwd_ref(
            Some(&mut wdx),
            Some(&mut wds),
            &dout64,
            &x64,
            &ints,
            &zeros,
            &s64,
            d,
        );
        assert_close("rq dx", &dx, &wdx, TOL, TOL);
        // dscales sums rows·g products of size ≤ |dy·x|·255 (dW first, then the group dot): looser.
        assert_close("rq dscales", &ds, &wds, 2e-3, 1e-4);
    }
}

#[test]
fn real_quant_linear_bwd_ref_matches_finite_differences() {
    let mut rng = Rng::new(43);
    let (rows, n, k, g, bits) = (4, 6, 20, 10, 3);
    let d = RealQuantDims { rows, k, n, g };
    let (_, ints, zeros, s) = random_layer(&mut rng, n, k, g, bits);
    let x = to_f64(&rng.normal_vec(rows * k, 1.0));
    let r = to_f64(&rng.normal_vec(rows * n, 1.0));
    let loss = |x: &[f64], s: &[f64]| {
        let mut o = vec![0.0; rows * n];
        real_quant_linear_fwd_ref(&mut o, x, &ints, &zeros, s, d);
        dot64(&o, &r)
    };
    let (mut dx, mut ds) = (vec![0.0; x.len()], vec![0.0; s.len()]);
    real_quant_linear_bwd_ref(Some(&mut dx), Some(&mut ds), &r, &x, &ints, &zeros, &s, d);
    // The loss is linear in x and in s (no rounding in E2E-QP): central differences are exact up to f64 rounding.
    const TOL: f64 = 1e-7;
    assert_close_f64(
        "rq dx fd",
        &dx,
        &finite_diff(&x, 1e-3, |v| loss(v, &s)),
        TOL,
        TOL,
    );
    assert_close_f64(
        "rq dscales fd",
        &ds,
        &finite_diff(&s, 1e-3, |v| loss(&x, v)),
        TOL,
        TOL,
    );
}

#[test]
fn dscales_is_the_fake_quant_scale_gradient_without_its_rounding_term() {
    // fake_quant's ds = Σ g·(q − zr − m·w/s) (round STE); E2E-QP's = Σ g·(q − z): they differ by Σ g·m·w/s.
    let mut rng = Rng::new(44);
    for &(n, k, group, wbits) in CASES {
        let cfg = QuantConfig::new(wbits, group).unwrap();
        let (w, s, z) = fake_quant_case(&mut rng, n, k, cfg);
        let g = cfg.group_len(k).unwrap();
        let q = QuantizedLinear::from_fake_quant(&w, &s, &z, cfg).unwrap();
        let dw = rng.normal_vec(n * k, 1.0);
        let mut ds_fake = vec![0.0; n * k / g];
        let (wv, sv, zv) = (
            w.f32s("t").unwrap(),
            s.f32s("t").unwrap(),
            z.f32s("t").unwrap(),
        );
        fake_quant_bwd_cpu(
            None,
            Some(&mut ds_fake),
            None,
            &dw,
            wv,
            sv,
            zv,
            g,
            cfg.qmax(),
        );
        let mut want = to_f64(&ds_fake);
        let (seff, zr) = (q.scales().f32s("t").unwrap(), q.zeros());
        for i in 0..n * k {
            let j = i / g;
            // The mask exactly as the f32 kernel decides it.
            let x = wv[i] / seff[j];
            if (0.0..=cfg.qmax()).contains(&(x.round_ties_even() + zr[j] as f32)) {
                want[j] += dw[i] as f64 * x as f64;
            }
        }
        let mut ds = vec![f32::NAN; n * k / g];
        real_quant_dscales_cpu(&mut ds, &dw, &q).unwrap();
        // Group sums of ≤ 130 terms of size ≤ qmax·|g| = 255 in f32 on both sides.
        assert_close(
            &format!("dscales vs fake-quant w{wbits} [{n}, {k}]"),
            &ds,
            &want,
            1e-3,
            1e-4,
        );
    }
}

#[test]
fn real_quant_linear_on_the_tape_trains_only_the_scales() {
    let mut rng = Rng::new(45);
    let (sx, n, k, g, bits) = ([2, 5, 24], 10, 24, 8, 2);
    let rows = 10;
    let d = RealQuantDims { rows, k, n, g };
    let (q, ints, zeros, s64) = random_layer(&mut rng, n, k, g, bits);
    let (x, r) = (rng.normal_vec(rows * k, 1.0), rng.normal_vec(rows * n, 1.0));
    let mut tape = Tape::new();
    let vs = tape.param(q.scales().clone()).unwrap();
    let vx = tape.leaf(Tensor::from_vec(&sx, x.clone()).unwrap(), true);
    let y = real_quant_linear(&mut tape, vx, &q, vs).unwrap();
    assert_eq!(tape.value(y).shape(), &[2, 5, n]);
    let mut want = vec![0.0; rows * n];
    real_quant_linear_fwd_cpu(&mut want, &x, &q, q.scales().f32s("t").unwrap(), rows).unwrap();
    assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
    let rv = tape.input(Tensor::from_vec(&[2, 5, n], r.clone()).unwrap());
    let prod = mul(&mut tape, y, rv).unwrap();
    let loss = sum(&mut tape, prod).unwrap();
    tape.backward(loss).unwrap();
    let (mut dx, mut ds) = (vec![0.0; rows * k], vec![0.0; n * k / g]);
    real_quant_linear_bwd_ref(
        Some(&mut dx),
        Some(&mut ds),
        &to_f64(&r),
        &to_f64(&x),
        &ints,
        &zeros,
        &s64,
        d,
    );
    assert_close(
        "tape rq dx",
        tape.grad(vx).unwrap().f32s("t").unwrap(),
        &dx,
        1e-4,
        1e-4,
    );
    assert_close(
        "tape rq dscales",
        tape.grad(vs).unwrap().f32s("t").unwrap(),
        &ds,
        1e-3,
        1e-4,
    );
    assert_eq!(tape.params().collect::<Vec<_>>(), [vs]);

    // x as a plain input: only the scales get a gradient, and it is the same.
    tape.reset();
    tape.zero_grad();
    let vx = tape.input(Tensor::from_vec(&sx, x.clone()).unwrap());
    let y = real_quant_linear(&mut tape, vx, &q, vs).unwrap();
    let rv = tape.input(Tensor::from_vec(&[2, 5, n], r).unwrap());
    let prod = mul(&mut tape, y, rv).unwrap();
    let loss = sum(&mut tape, prod).unwrap();
    tape.backward(loss).unwrap();
    assert!(tape.grad(vx).is_none());
    assert_close(
        "tape rq dscales (x const)",
        tape.grad(vs).unwrap().f32s("t").unwrap(),
        &ds,
        1e-3,
        1e-4,
    );
}

#[test]
fn real_quant_linear_rejects_mismatched_shapes() {
    let mut rng = Rng::new(46);
    let (q, ..) = random_layer(&mut rng, 4, 16, 8, 4);
    let mut tape = Tape::new();
    let s = tape.input(q.scales().clone());
    let s_bad = tape.input(Tensor::zeros(&[2, 4]));
    let x = tape.input(Tensor::zeros(&[3, 16]));
    let x_bad = tape.input(Tensor::zeros(&[3, 15]));
    for (x, s, shapes) in [
        (x_bad, s, ["[3, 15]", "[4, 2]"]),
        (x, s_bad, ["[3, 16]", "[2, 4]"]),
    ] {
        let e = real_quant_linear(&mut tape, x, &q, s)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("real_quant_linear") && shapes.iter().all(|s| e.contains(s)),
            "{e}"
        );
    }
    let e = real_quant_dscales_cpu(&mut [0.0; 3], &[0.0; 64], &q)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dscales 3"), "{e}");
    let mut q2 = q.clone();
    assert!(q2
        .set_scales(Tensor::zeros(&[2, 4]))
        .unwrap_err()
        .to_string()
        .contains("[4, 2]"));
}
