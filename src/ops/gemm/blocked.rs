//! The blocked driver, BLIS-style: for each NC-wide column block and KC-deep slice, B is packed once into
//! NR-wide slivers (shared by all threads), then each task packs an MC-tall block of A into MR-tall slivers
//! (its own buffer, sized for L2) and runs the microkernel over its tiles. Rayon splits the row blocks (and,
//! when m is small, the column slivers) between threads; B is packed in parallel too.
use super::kernel::{Kernel, MR, NR};
use rayon::prelude::*;

/// Depth of one packed slice. The B sliver (KC×NR = 24 KiB) stays in the 32 KiB L1 while A slivers stream
/// from L2. Measured on the 2-core EPYC (Zen 4) against 192, 256 and 512: 384 was 3-5% faster at k = 1536
/// (fewer read-modify-write passes over C) and equal elsewhere.
const KC: usize = 384;
/// Rows of A packed per task (at most): MC×KC×4 = 216 KiB, well inside the 1 MiB L2 per core.
const MC: usize = 144;
/// Columns of B packed per block: KC×NC×4 = 3 MiB, inside the shared L3.
const NC: usize = 3072;

/// A logical matrix view: element (r, c) at data[r * rs + c * cs].
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// Packs rows r0..r0+rows, columns c0..c0+cols of `v` into slivers of `w` rows: sliver s holds, for each
/// column p, the w values of rows r0+s*w.. at out[s*w*cols + p*w..], zero-padded past `rows`. Used for A
/// (w = MR, rows = i, columns = p) and, through the transposed view, for B (w = NR, rows = j, columns = p).
fn pack(out: &mut [f32], v: View, r0: usize, rows: usize, c0: usize, cols: usize, w: usize) {
    for (s, sliver) in out.chunks_exact_mut(w * cols).enumerate() {
        let live = w.min(rows.saturating_sub(s * w));
        if live < w {
            sliver.fill(0.0);
        }
        let base = r0 + s * w;
        if v.cs == 1 {
            // Each row is contiguous in memory: read it in order, write with stride w.
            for i in 0..live {
                let src = &v.data[(base + i) * v.rs + c0..][..cols];
                for (p, &x) in src.iter().enumerate() {
                    sliver[p * w + i] = x;
                }
            }
        } else {
            // Each column is contiguous (rs == 1): copy runs of `live` values.
            for p in 0..cols {
                let src = &v.data[(c0 + p) * v.cs + base..][..live];
                sliver[p * w..p * w + live].copy_from_slice(src);
            }
        }
    }
}

/// Raw pointer to C shared by the tasks; each task writes a disjoint set of tiles.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: tasks write disjoint regions of C (distinct row blocks or distinct column slivers), so sharing the
// pointer between threads creates no data race.
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl CPtr {
    /// The element `offset` places in. A method, so closures capture the whole (Sync) `CPtr`.
    ///
    /// # Safety
    /// `offset` must lie inside C.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded contract.
        unsafe { self.0.add(offset) }
    }
}

/// The B operand of [`run`]: raw (packed again on every call) or packed once by [`PackedB::new`].
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    Raw { data: &'a [f32], transb: bool },
    Packed(&'a PackedB),
}

/// B (k×n, or n×k when `transb`) packed once in [`run`]'s order: per NC column block, per k slice, its NR-wide
/// slivers. Repeated products against the same B (a decoder's weights, step after step) then skip packing,
/// which dominates when A has few rows: from an [out, in] weight (transb) packing scatters every row across
/// NR strided slivers.
pub struct PackedB {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs B; `b` must hold k·n values (checked by the caller, `super::PackedB::new`).
    pub(super) fn pack(transb: bool, n: usize, k: usize, b: &[f32]) -> PackedB {
        let mut data = Vec::new();
        if n == 0 || k == 0 {
            return PackedB { n, k, data }; // sgemm_packed handles these products without B
        }
        let bv = b_view(b, transb, n, k);
        let kc = slice_depth(k);
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for p0 in (0..k).step_by(kc) {
                let kcur = kc.min(k - p0);
                let start = data.len();
                data.resize(start + nc.div_ceil(NR) * NR * kcur, 0.0);
                pack_b_slice(&mut data[start..], bv, j0, nc, p0, kcur, true);
            }
        }
        PackedB { n, k, data }
    }

    /// (n, k): B is k×n.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }
}

/// B transposed as (j, p), so that it packs through the same routine as A.
fn b_view(b: &[f32], transb: bool, n: usize, k: usize) -> View<'_> {
    let (rs, cs) = if transb { (k, 1) } else { (1, n) };
    View { data: b, rs, cs }
}

/// Depth of the k slices: equal slices, so that k = 576 runs as 2 × 288 rather than 384 + 192.
fn slice_depth(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC))
}

/// Packs columns j0..j0+nc, rows p0..p0+kcur of B into NR-wide slivers, one task per sliver when `parallel`.
fn pack_b_slice(
    out: &mut [f32],
    bv: View,
    j0: usize,
    nc: usize,
    p0: usize,
    kcur: usize,
    parallel: bool,
) {
    if parallel {
        out.par_chunks_mut(NR * kcur)
            .enumerate()
            .for_each(|(t, s)| pack(s, bv, j0 + t * NR, nc - t * NR, p0, kcur, NR));
    } else {
        pack(out, bv, j0, nc, p0, kcur, NR);
    }
}

/// C[m×n] = alpha · op(A) · op(B) + beta · C with the given microkernel; the shapes are checked and the
/// trivial cases done by the caller (`super::sgemm`, `super::sgemm_packed`). A packed B gives the same
/// products, bit for bit, as the raw one.
#[allow(clippy::too_many_arguments)]
pub fn run(
    kernel: Kernel,
    transa: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: BOperand,
    beta: f32,
    c: &mut [f32],
) {
    // A as (i, p); B transposed as (j, p), so both pack through the same routine.
    let (rs, cs) = if transa { (1, m) } else { (k, 1) };
    let av = View { data: a, rs, cs };
    let threads = if m * n * k < 64 * 64 * 64 {
        1
    } else {
        rayon::current_num_threads()
    };
    // Equal row blocks (a multiple of MR), their count a multiple of the thread count when m allows, so
    // that no thread idles at the end of a slice.
    let n_ic = m.div_ceil(MC).div_ceil(threads) * threads;
    let n_ic = n_ic.min(m.div_ceil(MR));
    let mc = m.div_ceil(n_ic).div_ceil(MR) * MR;
    let n_ic = m.div_ceil(mc);
    let kc = slice_depth(k);
    let cptr = CPtr(c.as_mut_ptr());
    let mut bp = match b {
        BOperand::Raw { .. } => vec![0.0f32; NC.min(n.div_ceil(NR) * NR) * kc],
        BOperand::Packed(_) => Vec::new(),
    };
    let mut packed_at = 0;
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        let n_jr = nc.div_ceil(NR);
        // Few row blocks (small m): also split the column slivers so that every thread has work.
        let n_split = (2 * threads).div_ceil(n_ic).clamp(1, n_jr);
        for p0 in (0..k).step_by(kc) {
            let kcur = kc.min(k - p0);
            let len = n_jr * NR * kcur;
            let beta = if p0 == 0 { beta } else { 1.0 };
            let bp: &[f32] = match b {
                BOperand::Raw { data, transb } => {
                    let bp = &mut bp[..len];
                    let bv = b_view(data, transb, n, k);
                    pack_b_slice(bp, bv, j0, nc, p0, kcur, threads > 1);
                    bp
                }
                BOperand::Packed(packed) => &packed.data[packed_at..][..len],
            };
            packed_at += len;
            let task = |ap: &mut Vec<f32>, idx: usize| {
                let (ic, part) = (idx / n_split, idx % n_split);
                let (i0, mcur) = (ic * mc, mc.min(m - ic * mc));
                let n_ir = mcur.div_ceil(MR);
                ap.resize(n_ir * MR * kcur, 0.0);
                pack(ap, av, i0, mcur, p0, kcur, MR);
                let (t0, t1) = (part * n_jr / n_split, (part + 1) * n_jr / n_split);
                for t in t0..t1 {
                    let nr = NR.min(nc - t * NR);
                    for s in 0..n_ir {
                        let mr = MR.min(mcur - s * MR);
                        // SAFETY: the slivers hold MR*kcur and NR*kcur floats; the mr×nr window at row
                        // i0+s*MR, column j0+t*NR lies inside C (m×n, checked by the caller) and no other task
                        // writes it (tasks own distinct (row block, sliver range) pairs).
                        unsafe {
                            kernel(
                                kcur,
                                ap.as_ptr().add(s * MR * kcur),
                                bp.as_ptr().add(t * NR * kcur),
                                cptr.at((i0 + s * MR) * n + j0 + t * NR),
                                n,
                                mr,
                                nr,
                                alpha,
                                beta,
                            )
                        };
                    }
                }
            };
            if threads > 1 {
                (0..n_ic * n_split)
                    .into_par_iter()
                    .for_each_init(Vec::new, task);
            } else {
                let mut ap = Vec::new();
                (0..n_ic * n_split).for_each(|i| task(&mut ap, i));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::{best_kernel, portable_kernel};
    use super::*;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    /// Both microkernels (the detected one and the portable wide one) against the f64 reference, on sizes that
    /// cross every block edge: partial MR/NR tiles, several KC slices, several NC blocks, row blocks < threads.
    #[test]
    fn blocked_kernels_match_ref_across_block_edges() {
        let mut rng = Rng::new(9);
        for &(m, n, k) in &[(7, 3100, 300), (150, 17, 577), (1, 40, 9), (200, 33, 1)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = rng.normal_vec(m * k, 1.0);
                let b = rng.normal_vec(k * n, 1.0);
                let c0 = rng.normal_vec(m * n, 1.0);
                let mut want = to_f64(&c0);
                let (a64, b64) = (to_f64(&a), to_f64(&b));
                super::super::sgemm_ref(ta, tb, m, n, k, 0.5, &a64, &b64, -1.5, &mut want);
                for (name, kernel) in [("best", best_kernel()), ("portable", portable_kernel())] {
                    let mut c = c0.clone();
                    let b = BOperand::Raw {
                        data: &b,
                        transb: tb,
                    };
                    run(kernel, ta, m, n, k, 0.5, &a, b, -1.5, &mut c);
                    // f32 sums of up to 577 unit-variance products: error ~ sqrt(k)·eps·|terms|, far below 1e-4.
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
