//! Row-major f32 GEMM used by every CPU op: C[m×n] = alpha · op(A) · op(B) + beta · C.
//!
//! `op(A)` is A (stored m×k) or Aᵀ (A stored k×m) when `transa`; likewise B (k×n, or n×k when `transb`).
//! All matrices are contiguous row-major. Our own blocked kernel (blocked.rs: packing, cache blocking, rayon;
//! kernel.rs: the 6×16 AVX2/FMA microkernel). benches/gemm.rs times it against the `gemm` crate (a
//! dev-dependency since it lost: BENCHMARKS.md has the numbers) at the SmolLM2 training shapes.
mod blocked;
mod kernel;

use blocked::BOperand;
pub use blocked::PackedB;

/// Checks the slice lengths (panics: callers check shapes and return errors first) and does the work when it
/// is trivial: nothing for an empty C, C = beta·C for k == 0. Returns true when C is done.
#[allow(clippy::too_many_arguments)]
fn check_and_handle_trivial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b_len: usize,
    beta: f32,
    c: &mut [f32],
) -> bool {
    assert!(
        a.len() >= m * k && b_len >= k * n && c.len() >= m * n,
        "sgemm: slice shorter than m×k, k×n or m×n"
    );
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if beta == 0.0 {
            c[..m * n].fill(0.0);
        } else {
            crate::ops::simd::scale_assign(&mut c[..m * n], beta);
        }
        return true;
    }
    false
}

/// The plain triple loop in f64: the reference every fast GEMM path is tested against.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_ref(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f64],
    b: &[f64],
    beta: f64,
    c: &mut [f64],
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for p in 0..k {
                let av = if transa { a[p * m + i] } else { a[i * k + p] };
                let bv = if transb { b[j * k + p] } else { b[p * n + j] };
                acc += av * bv;
            }
            c[i * n + j] = alpha * acc
                + if beta == 0.0 {
                    0.0
                } else {
                    beta * c[i * n + j]
                };
        }
    }
}

/// C = alpha · op(A) · op(B) + beta · C. With beta == 0, C is not read (may hold garbage or NaN).
/// Panics if a slice is shorter than its dimensions require (callers check shapes and return errors first).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    if !check_and_handle_trivial(m, n, k, a, b.len(), beta, c) {
        let b = BOperand::Raw { data: b, transb };
        blocked::run(kernel::best_kernel(), transa, m, n, k, alpha, a, b, beta, c);
    }
}

impl PackedB {
    /// B (k×n, or n×k when `transb`) packed for [`sgemm_packed`]. Panics if `b` is shorter than k·n.
    pub fn new(transb: bool, n: usize, k: usize, b: &[f32]) -> PackedB {
        assert!(b.len() >= k * n, "PackedB: slice shorter than k×n");
        PackedB::pack(transb, n, k, b)
    }
}

/// C[m×n] = alpha · op(A) · B + beta · C with B packed once ([`PackedB::new`], which fixes n and k and whether
/// B was transposed): the same values as [`sgemm`] bit for bit, without packing B on every call.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed(
    transa: bool,
    m: usize,
    alpha: f32,
    a: &[f32],
    b: &PackedB,
    beta: f32,
    c: &mut [f32],
) {
    let (n, k) = b.dims();
    if !check_and_handle_trivial(m, n, k, a, k * n, beta, c) {
        let b = BOperand::Packed(b);
        blocked::run(kernel::best_kernel(), transa, m, n, k, alpha, a, b, beta, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    #[test]
    fn sgemm_matches_ref_for_every_transpose_and_odd_sizes() {
        let mut rng = Rng::new(5);
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 65),
            (64, 9, 130),
            (5, 1, 300),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-1.0, 0.25)] {
                    let a = rng.normal_vec(m * k, 1.0);
                    let b = rng.normal_vec(k * n, 1.0);
                    let c0 = rng.normal_vec(m * n, 1.0);
                    let mut want = to_f64(&c0);
                    sgemm_ref(
                        ta,
                        tb,
                        m,
                        n,
                        k,
                        alpha as f64,
                        &to_f64(&a),
                        &to_f64(&b),
                        beta as f64,
                        &mut want,
                    );
                    let mut c = c0.clone();
                    sgemm(ta, tb, m, n, k, alpha, &a, &b, beta, &mut c);
                    // f32 accumulation over k unit-variance products: error grows like sqrt(k)·eps.
                    assert_close(
                        &format!("sgemm {m}x{n}x{k} ta={ta} tb={tb}"),
                        &c,
                        &want,
                        1e-4,
                        1e-4,
                    );
                }
            }
        }
    }

    /// A packed B runs the same arithmetic as a raw one: equal bit for bit, across NC blocks (n = 3100), several
    /// k slices (k = 577), partial tiles, one thread (small m·n·k) and several, both transposes, beta 0 and 1.
    #[test]
    fn sgemm_packed_equals_sgemm_bit_for_bit() {
        let mut rng = Rng::new(8);
        for &(m, n, k) in &[
            (1, 3100, 577),
            (7, 33, 65),
            (64, 576, 576),
            (13, 5, 1),
            (4, 0, 3),
            (3, 4, 0),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = rng.normal_vec(m * k, 1.0);
                let b = rng.normal_vec(k * n, 1.0);
                let packed = PackedB::new(tb, n, k, &b);
                for beta in [0.0, 1.0] {
                    let c0 = rng.normal_vec(m * n, 1.0);
                    let (mut want, mut got) = (c0.clone(), c0);
                    sgemm(ta, tb, m, n, k, 0.5, &a, &b, beta, &mut want);
                    sgemm_packed(ta, m, 0.5, &a, &packed, beta, &mut got);
                    assert!(got == want, "{m}x{n}x{k} ta={ta} tb={tb} beta={beta}");
                }
            }
        }
    }

    #[test]
    fn sgemm_with_beta_zero_ignores_nan_in_c_and_k_zero_scales_c() {
        let mut rng = Rng::new(6);
        let (m, n, k) = (13, 21, 40);
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let mut c = vec![f32::NAN; m * n];
        sgemm(false, false, m, n, k, 1.0, &a, &b, 0.0, &mut c);
        let mut want = vec![0.0; m * n];
        sgemm_ref(
            false,
            false,
            m,
            n,
            k,
            1.0,
            &to_f64(&a),
            &to_f64(&b),
            0.0,
            &mut want,
        );
        assert_close("sgemm beta=0 over NaN", &c, &want, 1e-4, 1e-4);
        let mut c = vec![2.0f32; m * n];
        sgemm(false, false, m, n, 0, 1.0, &[], &[], 0.5, &mut c);
        assert!(c.iter().all(|&v| v == 1.0), "k = 0 must leave beta·C");
    }
}
