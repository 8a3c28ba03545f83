//! Row-major f32 GEMM used by every CPU op: C[m×n] = alpha · op(A) · op(B) + beta · C.
//!
//! `op(A)` is A (stored m×k) or Aᵀ (A stored k×m) when `transa`; likewise B (k×n, or n×k when `transb`).
//! All matrices are contiguous row-major. Backed by the `gemm` crate for now; the benchmark that chose it
//! lives in benches/gemm.rs and BENCHMARKS.md.
mod blocked;

pub use blocked::sgemm_blocked;
use gemm::Parallelism;

/// Checks the slice lengths (panics: callers check shapes and return errors first) and does the work when it
/// is trivial: nothing for an empty C, C = beta·C for k == 0. Returns true when C is done.
#[allow(clippy::too_many_arguments)]
fn check_and_handle_trivial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) -> bool {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
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
    sgemm_blocked(transa, transb, m, n, k, alpha, a, b, beta, c)
}

/// `sgemm` through the `gemm` crate (runtime-dispatched AVX2/FMA kernels on stable Rust).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_crate(
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
    if check_and_handle_trivial(m, n, k, a, b, beta, c) {
        return;
    }
    // Strides in elements: (column stride, row stride) for each operand as the logical matrix.
    let (a_cs, a_rs) = if transa {
        (m as isize, 1)
    } else {
        (1, k as isize)
    };
    let (b_cs, b_rs) = if transb {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    let threads = rayon::current_num_threads();
    let par = if (m * n * k) < 64 * 64 * 64 || threads <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    };
    // SAFETY: the assert above guarantees every index the strides reach is inside its slice; c does not alias a or b
    // (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    type Sgemm = fn(bool, bool, usize, usize, usize, f32, &[f32], &[f32], f32, &mut [f32]);

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
                    for (name, f) in [
                        ("sgemm_blocked", sgemm_blocked as Sgemm),
                        ("sgemm_crate", sgemm_crate),
                    ] {
                        let mut c = c0.clone();
                        f(ta, tb, m, n, k, alpha, &a, &b, beta, &mut c);
                        // f32 accumulation over k unit-variance products: error grows like sqrt(k)·eps.
                        assert_close(
                            &format!("{name} {m}x{n}x{k} ta={ta} tb={tb}"),
                            &c,
                            &want,
                            1e-4,
                            1e-4,
                        );
                    }
                }
            }
        }
    }
}
