//! Numeric checks shared by unit tests, integration tests and benches (style.md "Numerics, in layers").
//! Public so that tests/ and the CUDA equivalence runs use the same comparisons.

/// Compares `got` against a reference: |got - want| <= atol + rtol * |want| elementwise, NaN never passes.
/// On failure returns a message with the first mismatches and the largest difference.
pub fn compare(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{name}: length {} vs reference {}",
            got.len(),
            want.len()
        ));
    }
    let mut bad = Vec::new();
    let mut max_diff = 0.0f64;
    let mut max_at = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w).abs();
        let ok = d <= atol + rtol * w.abs() && g.is_finite() == w.is_finite();
        if d > max_diff || d.is_nan() {
            max_diff = d;
            max_at = i;
        }
        if !ok && bad.len() < 5 {
            bad.push(format!("[{i}] got {g} want {w}"));
        }
        if !ok && bad.len() >= 5 {
            break;
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{name}: mismatch (atol {atol:e}, rtol {rtol:e}); first: {}; max |diff| {max_diff:e} at [{max_at}]",
            bad.join(", ")
        ))
    }
}

/// Panicking form of [`compare`] for tests.
#[track_caller]
pub fn assert_close(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    if let Err(msg) = compare(name, got, want, atol, rtol) {
        panic!("{msg}");
    }
}

/// Same as [`assert_close`] with both sides f64 (reference gradients against finite differences).
#[track_caller]
pub fn assert_close_f64(name: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= atol + rtol * w.abs() && !d.is_nan(),
            "{name}: [{i}] got {g} want {w} (|diff| {d:e}, atol {atol:e}, rtol {rtol:e})"
        );
    }
}

/// Central finite differences of a scalar function of `x` (f64): d f / d x[i] = (f(x+h) - f(x-h)) / 2h.
pub fn finite_diff(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// sum_i a[i] * b[i] in f64: the scalar "loss" used to turn an op's output into a number for gradient checks.
pub fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
