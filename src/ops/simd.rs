//! Small SIMD building blocks (wide::f32x8) shared by the CPU ops. Each has a plain-loop twin in its tests.
use wide::f32x8;

const LANES: usize = 8;

/// The first 8 values of `s` as one vector (`s` must hold at least 8).
#[inline]
pub fn load(s: &[f32]) -> f32x8 {
    f32x8::from(<[f32; LANES]>::try_from(&s[..LANES]).expect("8 lanes"))
}

/// dst[i] += src[i]
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: lengths differ");
    let n = dst.len() / LANES * LANES;
    for (d, s) in dst[..n]
        .chunks_exact_mut(LANES)
        .zip(src[..n].chunks_exact(LANES))
    {
        let r = load(d) + load(s);
        d.copy_from_slice(r.as_array_ref());
    }
    for i in n..dst.len() {
        dst[i] += src[i];
    }
}

/// dst[i] += a * src[i]
pub fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "axpy: lengths differ");
    let n = dst.len() / LANES * LANES;
    let av = f32x8::splat(a);
    for (d, s) in dst[..n]
        .chunks_exact_mut(LANES)
        .zip(src[..n].chunks_exact(LANES))
    {
        let r = load(s).mul_add(av, load(d));
        d.copy_from_slice(r.as_array_ref());
    }
    for i in n..dst.len() {
        dst[i] += a * src[i];
    }
}

/// sum_i a[i] * b[i], accumulated in 8 f32 lanes.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    let n = a.len() / LANES * LANES;
    let mut acc = f32x8::ZERO;
    for (x, y) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        acc = load(x).mul_add(load(y), acc);
    }
    let mut s = acc.reduce_add();
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// dst[i] *= a
pub fn scale_assign(dst: &mut [f32], a: f32) {
    let n = dst.len() / LANES * LANES;
    let av = f32x8::splat(a);
    for d in dst[..n].chunks_exact_mut(LANES) {
        let r = load(d) * av;
        d.copy_from_slice(r.as_array_ref());
    }
    for x in &mut dst[n..] {
        *x *= a;
    }
}

/// sum_i a[i]^2
pub fn sum_squares(a: &[f32]) -> f32 {
    dot(a, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;

    #[test]
    fn simd_helpers_match_plain_loops_on_odd_lengths() {
        let mut rng = Rng::new(1);
        for n in [0, 1, 7, 8, 9, 31, 100] {
            let a = rng.normal_vec(n, 1.0);
            let b = rng.normal_vec(n, 1.0);
            let want_dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!(
                (dot(&a, &b) as f64 - want_dot).abs() <= 1e-5 * (1.0 + want_dot.abs()),
                "dot n={n}"
            );
            let mut d = a.clone();
            axpy(&mut d, 0.5, &b);
            for i in 0..n {
                assert!(
                    (d[i] - (a[i] + 0.5 * b[i])).abs() <= 1e-6,
                    "axpy n={n} i={i}"
                );
            }
            let mut d = a.clone();
            add_assign(&mut d, &b);
            for i in 0..n {
                assert_eq!(d[i], a[i] + b[i], "add_assign n={n} i={i}");
            }
            let mut d = a.clone();
            scale_assign(&mut d, -3.0);
            for i in 0..n {
                assert_eq!(d[i], a[i] * -3.0, "scale_assign n={n} i={i}");
            }
        }
    }
}
