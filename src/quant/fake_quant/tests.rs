use super::*;
use crate::ops::{mul::mul, sum::sum};
use crate::tensor::rng::Rng;
use crate::testing::*;

/// Forward values: q and zr are the same integers on both sides, so the f32 result differs from f64 only by the
/// final product's rounding (half an ulp, ~6e-8 relative).
const FWD_RTOL: f64 = 2e-7;
/// dscales sums up to 256 products of size ~|g|·qmax in f32 (8 lanes then a tail): ~1e-6 relative to the
/// largest term per add, a few e-5 absolute for unit-normal dout.
const DS_ATOL: f64 = 1e-4;
const DS_RTOL: f64 = 1e-5;

fn qmax64(cfg: QuantConfig) -> f64 {
    cfg.qmax() as f64
}

/// Random weights, scales and zeros for a [n, k] weight: min-max init, then scales scaled by 0.6..1.4 and zeros
/// shifted by ±2, so that some elements clamp (scale too small or zero pushed off-centre) and some zeros fall
/// outside [0, qmax] before their clamp. Weights whose f32 and f64 quotients w/s could round differently (within
/// 1e-3 of a .5 tie) are moved away from the tie, so that the f32 kernel and the f64 reference see the same integers.
fn random_case(
    rng: &mut Rng,
    n: usize,
    k: usize,
    cfg: QuantConfig,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = cfg.group_len(k).unwrap();
    let mut w = rng.normal_vec(n * k, 0.05);
    let (s0, z0) = init_minmax(&Tensor::from_vec(&[n, k], w.clone()).unwrap(), cfg).unwrap();
    let s: Vec<f32> = s0
        .f32s("t")
        .unwrap()
        .iter()
        .map(|&s| s * (0.6 + 0.8 * rng.uniform() as f32))
        .collect();
    let z: Vec<f32> = z0
        .f32s("t")
        .unwrap()
        .iter()
        .map(|&z| z + (4.0 * rng.uniform() - 2.0) as f32)
        .collect();
    for (i, w) in w.iter_mut().enumerate() {
        let x = *w as f64 / s[i / g] as f64;
        if ((x - x.floor()) - 0.5).abs() < 1e-3 {
            *w += 0.1 * s[i / g];
        }
    }
    (w, s, z)
}

#[test]
fn fake_quant_cpu_matches_ref_forward_and_backward() {
    let mut rng = Rng::new(21);
    let mut clamped = 0;
    // Odd K, groups not a multiple of 8 (SIMD tail), per-channel, and every bit width's edge.
    for (n, k, wbits, group) in [
        (1, 8, 2, 8),
        (3, 13, 3, PER_CHANNEL),
        (5, 86, 4, 43),
        (7, 128, 2, 32),
        (4, 256, 8, 128),
        (2, 33, 5, 11),
    ] {
        let cfg = QuantConfig::new(wbits, group).unwrap();
        let g = cfg.group_len(k).unwrap();
        let (w, s, z) = random_case(&mut rng, n, k, cfg);
        let dout = rng.normal_vec(n * k, 1.0);
        let (w64, s64, z64, d64) = (to_f64(&w), to_f64(&s), to_f64(&z), to_f64(&dout));
        let name = format!("n{n} k{k} w{wbits} g{g}");

        let mut out = vec![0.0; n * k];
        fake_quant_fwd_cpu(&mut out, &w, &s, &z, g, cfg.qmax());
        let mut want = vec![0.0; n * k];
        fake_quant_fwd_ref(&mut want, &w64, &s64, &z64, g, qmax64(cfg));
        assert_close(&format!("{name} fwd"), &out, &want, 0.0, FWD_RTOL);

        let (mut dw, mut ds, mut dz) = (vec![9.0; n * k], vec![9.0; s.len()], vec![9.0; s.len()]);
        fake_quant_bwd_cpu(
            Some(&mut dw),
            Some(&mut ds),
            Some(&mut dz),
            &dout,
            &w,
            &s,
            &z,
            g,
            cfg.qmax(),
        );
        let (mut rw, mut rs, mut rz) = (vec![0.0; n * k], vec![0.0; s.len()], vec![0.0; s.len()]);
        fake_quant_bwd_ref(
            &mut rw,
            &mut rs,
            &mut rz,
            &d64,
            &w64,
            &s64,
            &z64,
            g,
            qmax64(cfg),
        );
        // dW is dout or 0: exact.
        assert_close(&format!("{name} dw"), &dw, &rw, 0.0, 0.0);
        assert_close(&format!("{name} ds"), &ds, &rs, DS_ATOL, DS_RTOL);
        // dz = -s · (sum of dout over clamped elements): one f32 sum and one product.
        assert_close(&format!("{name} dz"), &dz, &rz, 1e-5, 1e-5);
        clamped += rw.iter().filter(|&&d| d == 0.0).count();
    }
    // The perturbed scales and zeros must make the clamp bite somewhere, or the masked paths went untested.
    assert!(clamped > 20, "only {clamped} clamped elements");
}

/// Hand-derived case, independent of the kernels: wbits 2 (qmax 3), one row of three groups of 8.
/// Group 0: s = 0.5, z_p = 1.2 -> zr = 1. Group 1: s_p = 1e-6 (clamped to 1e-4), z_p = 5.7 -> round 6 -> zr = 3.
/// Group 2: s = 1, z_p = 2.5 -> round half even -> zr = 2.
#[test]
fn fake_quant_grads_match_straight_through_formulas_where_clamps_bite() {
    let cfg = QuantConfig::new(2, 8).unwrap();
    let s_min = SCALE_MIN as f64;
    // (w, expected q = clamp(round(w/s) + zr, 0, 3), expected in-range flag m)
    #[rustfmt::skip]
    let table: [(f32, f64, bool); 24] = [
        // group 0: x = w / 0.5, p = round(x) + 1
        (0.0, 1.0, true), (0.3, 2.0, true), (0.6, 2.0, true), (-0.5, 0.0, true),
        (1.25, 3.0, true),    // x = 2.5 -> 2 (half even), p = 3 = qmax: the boundary is in range
        (5.0, 3.0, false),    // x = 10, p = 11: clamps high
        (-3.0, 0.0, false),   // x = -6, p = -5: clamps low
        (0.75, 3.0, true),    // x = 1.5 -> 2 (half even), p = 3
        // group 1: s = 1e-4, zr = 3, x = w·1e4
        (-2e-4, 1.0, true), (-3e-4, 0.0, true), (-5e-4, 0.0, false), (1e-4, 3.0, false),
        (0.0, 3.0, true), (-1e-4, 2.0, true), (2.0, 3.0, false), (-2.0, 0.0, false),
        // group 2: s = 1, zr = 2, x = w
        (0.5, 2.0, true), (1.5, 3.0, false), (-1.5, 0.0, true), (-2.5, 0.0, true),
        (-3.5, 0.0, false), (2.5, 3.0, false), (1.0, 3.0, true), (-0.4, 2.0, true),
    ];
    let (s_raw, z_raw) = ([0.5f32, 1e-6, 1.0], [1.2f32, 5.7, 2.5]);
    let (s_eff, zr) = ([0.5, s_min, 1.0], [1.0, 3.0, 2.0]);
    let w: Vec<f32> = table.iter().map(|t| t.0).collect();
    let dout = Rng::new(5).normal_vec(24, 1.0);

    let mut tape = Tape::new();
    let vw = tape
        .param(Tensor::from_vec(&[1, 24], w.clone()).unwrap())
        .unwrap();
    let vs = tape
        .param(Tensor::from_vec(&[1, 3], s_raw.to_vec()).unwrap())
        .unwrap();
    let vz = tape
        .param(Tensor::from_vec(&[1, 3], z_raw.to_vec()).unwrap())
        .unwrap();
    let y = fake_quant(&mut tape, vw, vs, vz, cfg).unwrap();
    let r = tape.input(Tensor::from_vec(&[1, 24], dout.clone()).unwrap());
    let prod = mul(&mut tape, y, r).unwrap();
    let loss = sum(&mut tape, prod).unwrap();
    tape.backward(loss).unwrap();

    let (mut want_y, mut want_dw) = (vec![0.0; 24], vec![0.0; 24]);
    let (mut want_ds, mut want_dz) = ([0.0f64; 3], [0.0f64; 3]);
    for (i, &(wi, q, m)) in table.iter().enumerate() {
        let (j, g) = (i / 8, dout[i] as f64);
        let (s, x) = (s_eff[j], wi as f64 / s_eff[j]);
        want_y[i] = (q - zr[j]) * s;
        want_dw[i] = if m { g } else { 0.0 };
        want_ds[j] += g * (q - zr[j] - if m { x } else { 0.0 });
        want_dz[j] += if m { 0.0 } else { -g * s };
    }
    assert_close(
        "table fwd",
        tape.value(y).f32s("t").unwrap(),
        &want_y,
        1e-9,
        1e-6,
    );
    assert_close(
        "table dw",
        tape.grad(vw).unwrap().f32s("t").unwrap(),
        &want_dw,
        0.0,
        0.0,
    );
    assert_close(
        "table ds",
        tape.grad(vs).unwrap().f32s("t").unwrap(),
        &want_ds,
        1e-5,
        1e-5,
    );
    assert_close(
        "table dz",
        tape.grad(vz).unwrap().f32s("t").unwrap(),
        &want_dz,
        1e-6,
        1e-5,
    );
    // Every group has clamped elements, so dz is non-zero in all three: the zero clamp passes the gradient.
    assert!(want_dz.iter().all(|&d| d != 0.0));
}

#[test]
fn fake_quant_rounds_half_to_even_in_simd_lanes_and_tail() {
    // wbits 8, zr = 128, s = 1: every x is an exact .5 tie; 19 = two 8-lane chunks and a 3-element tail.
    let cfg = QuantConfig::new(8, PER_CHANNEL).unwrap();
    let w: Vec<f32> = (0..19).map(|i| i as f32 - 9.5).collect();
    let mut out = vec![0.0; 19];
    fake_quant_fwd_cpu(&mut out, &w, &[1.0], &[128.0], 19, cfg.qmax());
    let want: Vec<f64> = w.iter().map(|&x| (x as f64).round_ties_even()).collect();
    assert_close("ties", &out, &want, 0.0, 0.0);
    assert_eq!(&out[..4], &[-10.0, -8.0, -8.0, -6.0]);
    // f32::round would give -10, -9, -8, -7: the test would catch round-half-away-from-zero.
    let mut ds = [0.0f32];
    let dout = vec![1.0; 19];
    fake_quant_bwd_cpu(
        None,
        Some(&mut ds),
        None,
        &dout,
        &w,
        &[1.0],
        &[128.0],
        19,
        cfg.qmax(),
    );
    // Each tie contributes round(x) - x = ±0.5; the sum is exact in f32.
    let want_ds: f64 = want.iter().zip(&w).map(|(r, &x)| r - x as f64).sum();
    assert_eq!(ds[0] as f64, want_ds);
}

#[test]
fn fake_quant_tape_matches_cpu_kernels_and_skips_unneeded_grads() {
    let mut rng = Rng::new(8);
    let cfg = QuantConfig::new(3, 16).unwrap();
    let (w, s, z) = random_case(&mut rng, 6, 48, cfg);
    let dout = rng.normal_vec(6 * 48, 1.0);
    let mut want = vec![0.0; w.len()];
    fake_quant_fwd_cpu(&mut want, &w, &s, &z, 16, cfg.qmax());
    let (mut dw, mut ds, mut dz) = (vec![0.0; w.len()], vec![0.0; s.len()], vec![0.0; s.len()]);
    fake_quant_bwd_cpu(
        Some(&mut dw),
        Some(&mut ds),
        Some(&mut dz),
        &dout,
        &w,
        &s,
        &z,
        16,
        cfg.qmax(),
    );

    for w_trainable in [true, false] {
        let mut tape = Tape::new();
        let vs = tape
            .param(Tensor::from_vec(&[6, 3], s.clone()).unwrap())
            .unwrap();
        let vz = tape
            .param(Tensor::from_vec(&[6, 3], z.clone()).unwrap())
            .unwrap();
        let vw = tape.leaf(Tensor::from_vec(&[6, 48], w.clone()).unwrap(), w_trainable);
        let y = fake_quant(&mut tape, vw, vs, vz, cfg).unwrap();
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
        let r = tape.input(Tensor::from_vec(&[6, 48], dout.clone()).unwrap());
        let prod = mul(&mut tape, y, r).unwrap();
        let loss = sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();
        assert_eq!(tape.grad(vs).unwrap().f32s("t").unwrap(), &ds[..]);
        assert_eq!(tape.grad(vz).unwrap().f32s("t").unwrap(), &dz[..]);
        match tape.grad(vw) {
            Some(g) => assert!(w_trainable && g.f32s("t").unwrap() == &dw[..]),
            None => assert!(!w_trainable),
        }
    }
}

#[test]
fn init_minmax_matches_hand_computed_groups() {
    let cfg = QuantConfig::new(2, 4).unwrap();
    #[rustfmt::skip]
    let w = vec![
        -1.0, 0.0, 2.0, 0.5,   // min -1, max 2: s = 3/3 = 1, z = round(1) = 1
        1.0, 2.0, 3.0, 4.0,    // all positive: s = 1, z = round(-1) = -1 (not clamped at init)
        -2.5, 0.5, 0.0, -1.0,  // s = 1, z = round(2.5) = 2 (half to even)
        0.3, 0.3, 0.3, 0.3,    // zero range: s = 1e-4, z = round(-clamp(0.3/1e-4, ±1e4)) = -3000
        5.0, 5.0, 5.0, 5.0,    // s = 1e-4, 5/1e-4 = 5e4 clamps to 1e4: z = -1e4
        -6.0, 0.0, 0.0, 3.0,   // s = 9/3 = 3, z = round(2) = 2
    ];
    let (s, z) = init_minmax(&Tensor::from_vec(&[3, 8], w).unwrap(), cfg).unwrap();
    assert_eq!(s.shape(), &[3, 2]);
    assert_eq!(
        s.f32s("t").unwrap(),
        &[1.0, 1.0, 1.0, SCALE_MIN, SCALE_MIN, 3.0]
    );
    assert_eq!(z.f32s("t").unwrap(), &[1.0, -1.0, 2.0, -3000.0, -1e4, 2.0]);

    let bad = Tensor::from_vec(&[1, 4], vec![0.0, f32::NAN, 1.0, 2.0]).unwrap();
    let err = init_minmax(&bad, cfg).unwrap_err().to_string();
    assert!(err.contains("row 0 group 0"), "{err}");
}

/// ggml-style error limit on `w = 0.1 + 2·cos(i)` (values in [-1.9, 2.1], so 0 lies inside every group), g128.
/// Hard bound: after min-max init a group's grid spans [xmin, xmax] to within s/2 at each end (bottom = −zr·s is
/// within s/2 of xmin and top = bottom + qmax·s within s/2 of xmax), so every element is at most s/2 from its
/// dequantized value, and s ≤ 4/qmax: RMSE ≤ 2/qmax = 0.667 / 0.286 / 0.133 (2 / 3 / 4 bits).
/// Tight bound: i mod 2π is equidistributed, so the RMSE approaches that of the ideal grid (xmin = −1.9,
/// xmax = 2.1) averaged over a uniform phase, integrated below: 0.4238 / 0.1685 / 0.0743. A 128-sample group's
/// range is slightly inside [−1.9, 2.1]; 5% covers that. (ggml's own thresholds use sqrt(Σe²)/n, not RMSE.)
#[test]
fn fake_quant_rtn_error_on_cosine_data_is_within_bounds() {
    let (n, k) = (8, 1024);
    let w: Vec<f32> = (0..n * k).map(|i| 0.1 + 2.0 * (i as f32).cos()).collect();
    for wbits in [2, 3, 4] {
        let cfg = QuantConfig::new(wbits, 128).unwrap();
        let (s, z) = init_minmax(&Tensor::from_vec(&[n, k], w.clone()).unwrap(), cfg).unwrap();
        let s = s.f32s("t").unwrap();
        let mut out = vec![0.0; n * k];
        fake_quant_fwd_cpu(&mut out, &w, s, z.f32s("t").unwrap(), 128, cfg.qmax());
        let mut sq = 0.0f64;
        for (i, (&o, &x)) in out.iter().zip(&w).enumerate() {
            let e = (o as f64 - x as f64).abs();
            assert!(
                e <= s[i / 128] as f64 * (0.5 + 1e-5),
                "w{wbits} [{i}] error {e} > s/2"
            );
            sq += e * e;
        }
        let rmse = (sq / (n * k) as f64).sqrt();

        let qmax = cfg.qmax() as f64;
        let step = 4.0 / qmax;
        let zr = (1.9 / step).round_ties_even();
        let m = 20_000;
        let ideal_sq: f64 = (0..m)
            .map(|j| {
                let x =
                    0.1 + 2.0 * (2.0 * std::f64::consts::PI * (j as f64 + 0.5) / m as f64).cos();
                let q = ((x / step).round_ties_even() + zr).clamp(0.0, qmax);
                (x - (q - zr) * step).powi(2)
            })
            .sum();
        let ideal = (ideal_sq / m as f64).sqrt();
        eprintln!(
            "w{wbits}g128 RMSE {rmse:.5} (ideal grid {ideal:.5}, hard bound {:.5})",
            step / 2.0
        );
        assert!(
            rmse <= step / 2.0 && rmse <= 1.05 * ideal,
            "w{wbits} RMSE {rmse} vs ideal {ideal}"
        );
    }
}

#[test]
fn fake_quant_rejects_bad_configs_and_shapes() {
    for bits in [0, 1, 9, 16] {
        let err = QuantConfig::new(bits, 64).unwrap_err().to_string();
        assert!(
            err.contains("fake_quant") && err.contains(&format!("wbits {bits}")),
            "{err}"
        );
    }
    for g in [0, -2] {
        assert!(QuantConfig::new(4, g).is_err());
    }
    let cfg = QuantConfig::new(4, 64).unwrap();
    let err = cfg.group_len(100).unwrap_err().to_string();
    assert!(err.contains("64") && err.contains("100"), "{err}");
    assert!(init_minmax(&Tensor::zeros(&[2, 100]), cfg).is_err());
    assert!(init_minmax(&Tensor::zeros(&[128]), cfg).is_err());
    // A config built without `new` is still checked where it is used.
    let raw = QuantConfig {
        wbits: 1,
        group_size: 64,
    };
    assert!(init_minmax(&Tensor::zeros(&[2, 128]), raw).is_err());

    let mut tape = Tape::new();
    let w = tape.input(Tensor::zeros(&[2, 128]));
    let s_ok = tape.input(Tensor::full(&[2, 2], 0.1));
    let s_bad = tape.input(Tensor::zeros(&[2, 3]));
    let err = fake_quant(&mut tape, w, s_bad, s_ok, cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fake_quant") && err.contains("[2, 3]") && err.contains("[2, 128]"),
        "{err}"
    );
    let err = fake_quant(&mut tape, w, s_ok, s_bad, cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("zeros [2, 3]"), "{err}");
    let w100 = tape.input(Tensor::zeros(&[2, 100]));
    let err = fake_quant(&mut tape, w100, s_ok, s_ok, cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("group_size 64 does not divide in_features 100"),
        "{err}"
    );
    let w1d = tape.input(Tensor::zeros(&[128]));
    assert!(fake_quant(&mut tape, w1d, s_ok, s_ok, cfg).is_err());
}
