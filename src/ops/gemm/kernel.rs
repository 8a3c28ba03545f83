//! The register-tiled microkernel: a 6×16 tile of C = 12 accumulators of 8 lanes. Per k step it does 2 loads of
//! B, 6 broadcasts of A and 12 FMAs, so it is bound by the 2 FMA pipes, not by loads, and 12 independent
//! chains cover the FMA latency (4 cycles × 2 pipes). On x86-64 with AVX2+FMA (detected at run time) it runs
//! on `__m256`; elsewhere on `wide::f32x8`. wide picks its implementation at compile time and the crate is
//! built for baseline x86-64, so there `f32x8::mul_add` is two SSE multiplies and adds, not an FMA: hence the
//! separate AVX2 instance of the same generic kernel.

/// Microkernel tile: MR rows of A by NR columns of B (two 8-lane vectors).
pub const MR: usize = 6;
pub const NR: usize = 16;

/// Eight f32 lanes: the only vector operations the microkernel needs.
trait Lanes: Copy {
    fn zero() -> Self;
    fn splat(x: f32) -> Self;
    /// Reads 8 floats at `p` (any alignment).
    /// # Safety
    /// `p..p+8` must be readable.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p..p+8` must be writable.
    unsafe fn store(self, p: *mut f32);
    /// self * b + c
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn mul(self, b: Self) -> Self;
}

impl Lanes for wide::f32x8 {
    #[inline(always)]
    fn zero() -> Self {
        wide::f32x8::ZERO
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        wide::f32x8::splat(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable floats; read_unaligned has no alignment requirement.
        wide::f32x8::from(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable floats.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(self.to_array()) }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        wide::f32x8::mul_add(self, b, c)
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        self * b
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// `__m256` lanes. Only used inside `#[target_feature(enable = "avx2,fma")]` functions (the microkernel
    /// instance below), which are only called after run-time detection; these always-inlined methods then
    /// compile to single AVX instructions there.
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256);

    impl Lanes for Avx2 {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: reached only from code running after AVX2+FMA detection (see the type's doc).
            Avx2(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: as for zero.
            Avx2(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 8 readable floats; loadu has no alignment requirement.
            Avx2(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller guarantees 8 writable floats.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: as for zero (FMA detected).
            Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            // SAFETY: as for zero.
            Avx2(unsafe { _mm256_mul_ps(self.0, b.0) })
        }
    }

    /// The microkernel compiled with AVX2+FMA enabled.
    /// # Safety
    /// The CPU must support AVX2 and FMA; otherwise as for `super::microkernel`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn microkernel_avx2(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        alpha: f32,
        beta: f32,
    ) {
        // SAFETY: forwarded contract.
        unsafe { super::microkernel::<Avx2>(kc, ap, bp, c, ldc, mr, nr, alpha, beta) }
    }
}

/// C[0..mr, 0..nr] (row stride ldc) = alpha · Ap·Bp + beta · C, where Ap is one packed MR×kc sliver
/// (column p at ap[p*MR..]) and Bp one packed kc×NR sliver (row p at bp[p*NR..]). beta == 0: C is not read.
///
/// # Safety
/// ap must hold MR*kc floats, bp NR*kc, and the mr×nr window of C (mr <= MR, nr <= NR) must be writable and
/// not aliased by anything else during the call.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel<V: Lanes>(
    kc: usize,
    ap: *const f32,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    alpha: f32,
    beta: f32,
) {
    // C is touched once per tile per k slice and has usually left the caches since: fetch it while the
    // k loop runs.
    for i in 0..mr {
        prefetch(c.wrapping_add(i * ldc));
        prefetch(c.wrapping_add(i * ldc + nr - 1));
    }
    let mut acc = [[V::zero(); 2]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, so these reads stay inside the packed slivers (caller's contract).
        unsafe {
            let b0 = V::load(bp.add(p * NR));
            let b1 = V::load(bp.add(p * NR + 8));
            let a = ap.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = V::splat(*a.add(i));
                row[0] = ai.mul_add(b0, row[0]);
                row[1] = ai.mul_add(b1, row[1]);
            }
        }
    }
    let (va, vb) = (V::splat(alpha), V::splat(beta));
    if mr == MR && nr == NR {
        for (i, row) in acc.iter().enumerate() {
            for (h, &v) in row.iter().enumerate() {
                // SAFETY: a full tile: rows < MR and columns < NR are inside the caller's window.
                unsafe {
                    let p = c.add(i * ldc + h * 8);
                    let out = if beta == 0.0 {
                        v.mul(va)
                    } else {
                        V::load(p).mul_add(vb, v.mul(va))
                    };
                    out.store(p);
                }
            }
        }
    } else {
        // Edge tile: spill the full tile, then update only the mr×nr window that exists.
        let mut tile = [0.0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            for (h, &v) in row.iter().enumerate() {
                // SAFETY: tile has MR*NR floats; i*NR + h*8 + 8 <= MR*NR.
                unsafe { v.mul(va).store(tile.as_mut_ptr().add(i * NR + h * 8)) };
            }
        }
        for i in 0..mr {
            for j in 0..nr {
                // SAFETY: i < mr, j < nr: inside the caller's window.
                unsafe {
                    let p = c.add(i * ldc + j);
                    *p = if beta == 0.0 {
                        tile[i * NR + j]
                    } else {
                        tile[i * NR + j] + beta * *p
                    };
                }
            }
        }
    }
}

/// A hint to bring the cache line holding `p` into L1; a no-op off x86-64.
#[inline(always)]
fn prefetch(p: *const f32) {
    // SAFETY: prefetch never faults, whatever the address; SSE is part of baseline x86-64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

pub type Kernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, usize, usize, f32, f32);

/// The fastest microkernel this CPU runs.
pub fn best_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return avx2::microkernel_avx2;
    }
    portable_kernel()
}

pub fn portable_kernel() -> Kernel {
    microkernel::<wide::f32x8>
}
