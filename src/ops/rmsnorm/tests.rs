use super::*;
use crate::ops::{mul::mul, sum::sum};
use crate::tensor::rng::Rng;
use crate::testing::*;

// f32 sum of squares over up to 576 values in 8 lanes (~1e-6 relative) then two products.
const FWD_ATOL: f64 = 1e-6;
const FWD_RTOL: f64 = 1e-5;
// dx subtracts two terms of order |w * dy| * rstd; dw sums up to 100 rows: absolute error ~1e-5.
const BWD_ATOL: f64 = 2e-5;
const BWD_RTOL: f64 = 1e-4;

/// Rows with a per-row scale so that rstd varies from row to row (as activations' norms do).
fn rows_of(rng: &mut Rng, rows: usize, c: usize) -> Vec<f32> {
    let mut x = rng.normal_vec(rows * c, 1.0);
    for row in x.chunks_mut(c) {
        let s = 0.1 + 3.0 * rng.uniform() as f32;
        row.iter_mut().for_each(|v| *v *= s);
    }
    x
}

#[test]
fn rmsnorm_cpu_matches_ref_forward_and_backward() {
    let mut rng = Rng::new(51);
    // 100 rows cross the 32-row backward blocks with a partial last block; C 1/7/13/33 hit the scalar tails.
    for (rows, c) in [(1, 1), (3, 7), (5, 13), (100, 33), (4, 576)] {
        let eps = 1e-5;
        let x = rows_of(&mut rng, rows, c);
        let w = rng.normal_vec(c, 1.0);
        let dout = rng.normal_vec(rows * c, 1.0);
        let (mut y, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        rmsnorm_fwd_cpu(&mut y, &mut rstd, &x, &w, eps);
        let (mut want, mut want_rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        let (x64, w64) = (to_f64(&x), to_f64(&w));
        rmsnorm_fwd_ref(&mut want, &mut want_rstd, &x64, &w64, eps as f64);
        let name = format!("rmsnorm [{rows}, {c}]");
        assert_close(&format!("{name} fwd"), &y, &want, FWD_ATOL, FWD_RTOL);
        assert_close(&format!("{name} rstd"), &rstd, &want_rstd, 0.0, 1e-5);

        let (mut dx, mut dw) = (vec![0.0; rows * c], vec![0.0; c]);
        rmsnorm_bwd_cpu(Some(&mut dx), Some(&mut dw), &dout, &x, &w, &rstd);
        let (mut want_dx, mut want_dw) = (vec![0.0; rows * c], vec![0.0; c]);
        let dy64 = to_f64(&dout);
        rmsnorm_bwd_ref(&mut want_dx, &mut want_dw, &dy64, &x64, &w64, &want_rstd);
        assert_close(&format!("{name} dx"), &dx, &want_dx, BWD_ATOL, BWD_RTOL);
        assert_close(&format!("{name} dw"), &dw, &want_dw, BWD_ATOL, BWD_RTOL);

        // Each gradient alone equals the one from the joint pass.
        let mut dx_only = vec![0.0; rows * c];
        rmsnorm_bwd_cpu(Some(&mut dx_only), None, &dout, &x, &w, &rstd);
        assert_eq!(dx_only, dx, "{name} dx alone");
        let mut dw_only = vec![0.0; c];
        rmsnorm_bwd_cpu(None, Some(&mut dw_only), &dout, &x, &w, &rstd);
        assert_eq!(dw_only, dw, "{name} dw alone");
    }
}

#[test]
fn rmsnorm_bwd_ref_matches_finite_differences() {
    let mut rng = Rng::new(52);
    let (rows, c, eps) = (4, 9, 1e-5);
    let x = to_f64(&rows_of(&mut rng, rows, c));
    let w = to_f64(&rng.normal_vec(c, 1.0));
    let r = to_f64(&rng.normal_vec(rows * c, 1.0));
    let loss = |x: &[f64], w: &[f64]| {
        let (mut y, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        rmsnorm_fwd_ref(&mut y, &mut rstd, x, w, eps);
        dot64(&y, &r)
    };
    let (mut y, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
    rmsnorm_fwd_ref(&mut y, &mut rstd, &x, &w, eps);
    let (mut dx, mut dw) = (vec![0.0; rows * c], vec![0.0; c]);
    rmsnorm_bwd_ref(&mut dx, &mut dw, &r, &x, &w, &rstd);
    let fd_x = finite_diff(&x, 1e-5, |x| loss(x, &w));
    let fd_w = finite_diff(&w, 1e-5, |w| loss(&x, w));
    // Central differences: O(h^2) truncation with rstd up to ~10 (rows scaled by 0.1) stays below 1e-8.
    assert_close_f64("rmsnorm dx vs fd", &dx, &fd_x, 1e-7, 1e-6);
    assert_close_f64("rmsnorm dw vs fd", &dw, &fd_w, 1e-7, 1e-6);
}

#[test]
fn rmsnorm_on_tape_matches_cpu_kernels() {
    let mut rng = Rng::new(53);
    let (shape, c) = ([2, 3, 21], 21);
    let n = 126;
    let x = rows_of(&mut rng, 6, c);
    let w = rng.normal_vec(c, 1.0);
    let r = rng.normal_vec(n, 1.0);
    let mut tape = Tape::new();
    let vw = tape
        .param(Tensor::from_vec(&[c], w.clone()).unwrap())
        .unwrap();
    let vx = tape.leaf(Tensor::from_vec(&shape, x.clone()).unwrap(), true);
    let y = rmsnorm(&mut tape, vx, vw, 1e-6).unwrap();
    let (mut want, mut rstd) = (vec![0.0; n], vec![0.0; 6]);
    rmsnorm_fwd_cpu(&mut want, &mut rstd, &x, &w, 1e-6);
    assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
    let vr = tape.input(Tensor::from_vec(&shape, r.clone()).unwrap());
    let p = mul(&mut tape, y, vr).unwrap();
    let loss = sum(&mut tape, p).unwrap();
    tape.backward(loss).unwrap();
    let (mut dx, mut dw) = (vec![0.0; n], vec![0.0; c]);
    rmsnorm_bwd_cpu(Some(&mut dx), Some(&mut dw), &r, &x, &w, &rstd);
    assert_eq!(tape.grad(vx).unwrap().f32s("t").unwrap(), &dx[..]);
    assert_eq!(tape.grad(vw).unwrap().f32s("t").unwrap(), &dw[..]);
}

#[test]
fn rmsnorm_rejects_bad_shapes_and_eps() {
    let mut tape = Tape::new();
    let x = tape.input(Tensor::zeros(&[2, 8]));
    for sw in [vec![7], vec![1, 8], vec![]] {
        let w = tape.input(Tensor::zeros(&sw));
        let err = rmsnorm(&mut tape, x, w, 1e-5).unwrap_err().to_string();
        assert!(
            err.contains("rmsnorm") && err.contains("[2, 8]") && err.contains(&format!("{sw:?}")),
            "{err}"
        );
    }
    let w = tape.input(Tensor::zeros(&[8]));
    for eps in [-1e-5, f32::NAN] {
        let err = rmsnorm(&mut tape, x, w, eps).unwrap_err().to_string();
        assert!(err.contains("rmsnorm") && err.contains("eps"), "{err}");
    }
}
