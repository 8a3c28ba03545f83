//! The f32 path: rayon over (batch, query head) pairs; each head is gathered into contiguous [T, D] buffers
//! and processed QUERY_BLOCK query rows at a time, so that a block of rows [i0, i1) only multiplies against
//! keys 0..i1. The masked upper triangle is skipped except inside the diagonal block, where the products are
//! computed (cheaper than splitting the GEMM) but no exp is, and those entries are set to zero. Scores of the
//! diagonal block cost T·QUERY_BLOCK/2 extra multiply-adds per head and D, T²/2 being the causal work.
use super::AttentionShape;
use crate::ops::gemm::sgemm;
use crate::ops::simd;
use rayon::prelude::*;
use wide::f32x8;

/// Query rows per block: large enough for efficient GEMMs, small enough that the wasted diagonal work
/// (QUERY_BLOCK / T of the causal total) stays small and a block's [QUERY_BLOCK, T] scores stay in cache.
pub const QUERY_BLOCK: usize = 64;

/// Copies head `head` of batch `b` out of a [B, T, heads, D] tensor into a contiguous [T, D] buffer.
fn gather_head(src: &[f32], s: AttentionShape, heads: usize, b: usize, head: usize) -> Vec<f32> {
    let mut dst = Vec::with_capacity(s.t * s.d);
    for t in 0..s.t {
        let i = ((b * s.t + t) * heads + head) * s.d;
        dst.extend_from_slice(&src[i..i + s.d]);
    }
    dst
}

/// Writes head-major [B, H, T, D] rows back into a [B, T, H, D] tensor.
fn scatter_heads(dst: &mut [f32], heads_major: &[f32], s: AttentionShape) {
    let (t, h, d) = (s.t, s.h, s.d);
    dst.par_chunks_mut(h * d).enumerate().for_each(|(bt, row)| {
        let (b, tt) = (bt / t, bt % t);
        for (hh, o) in row.chunks_exact_mut(d).enumerate() {
            o.copy_from_slice(&heads_major[((b * h + hh) * t + tt) * d..][..d]);
        }
    });
}

/// dst [B, T, G, D] = head-major per-query-head gradients [B, H, T, D] summed over each group of H/G heads.
fn sum_groups(dst: &mut [f32], heads_major: &[f32], s: AttentionShape) {
    let (t, h, d, group) = (s.t, s.h, s.d, s.group());
    dst.par_chunks_mut(s.g * d)
        .enumerate()
        .for_each(|(bt, row)| {
            let (b, tt) = (bt / t, bt % t);
            for (g, o) in row.chunks_exact_mut(d).enumerate() {
                o.fill(0.0);
                for hh in g * group..(g + 1) * group {
                    simd::add_assign(o, &heads_major[((b * h + hh) * t + tt) * d..][..d]);
                }
            }
        });
}

/// row[i] = exp(row[i] − c), returning the sum. wide's exp is a degree-7 polynomial after range reduction
/// (about 1 ulp); it returns 0 for arguments below −87.3, where f32 exp underflows anyway.
fn exp_shifted(row: &mut [f32], c: f32) -> f32 {
    let cv = f32x8::splat(c);
    let mut acc = f32x8::ZERO;
    let n = row.len() / 8 * 8;
    for chunk in row[..n].chunks_exact_mut(8) {
        let x = (lanes(chunk) - cv).exp();
        chunk.copy_from_slice(x.as_array_ref());
        acc += x;
    }
    let mut sum = acc.reduce_add();
    for x in &mut row[n..] {
        *x = (*x - c).exp();
        sum += *x;
    }
    sum
}

fn lanes(s: &[f32]) -> f32x8 {
    f32x8::from(<[f32; 8]>::try_from(s).expect("8 lanes"))
}

/// Row maximum that propagates NaN: wide's exp maps NaN to 0, so a NaN score must poison the row here
/// (its max, hence lse and the normalisation) or it would silently drop out of the softmax.
fn max_or_nan(row: &[f32]) -> f32 {
    let n = row.len() / 8 * 8;
    let (mut max, mut nan) = (f32x8::splat(f32::NEG_INFINITY), f32x8::ZERO);
    for chunk in row[..n].chunks_exact(8) {
        let x = lanes(chunk);
        max = max.fast_max(x);
        nan |= x.is_nan();
    }
    let tail = &row[n..];
    if nan.any() || tail.iter().any(|x| x.is_nan()) {
        return f32::NAN;
    }
    let max = max
        .as_array_ref()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    tail.iter().fold(max, |m, &x| m.max(x))
}

/// Forward: out [B, T, H, D] and lse [B, H, T], the log-sum-exp of each scaled score row (what backward needs).
pub fn attention_fwd_cpu(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) {
    let (t, d, scale) = (s.t, s.d, s.scale() as f32);
    let mut out_heads = vec![0.0f32; s.b * s.h * t * d];
    out_heads
        .par_chunks_mut(t * d)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each(|(bh, (o, lse))| {
            let (b, h) = (bh / s.h, bh % s.h);
            let qh = gather_head(q, s, s.h, b, h);
            let kh = gather_head(k, s, s.g, b, h / s.group());
            let vh = gather_head(v, s, s.g, b, h / s.group());
            let mut p = vec![0.0f32; QUERY_BLOCK.min(t) * t];
            for i0 in (0..t).step_by(QUERY_BLOCK) {
                let i1 = (i0 + QUERY_BLOCK).min(t);
                let (m, n) = (i1 - i0, i1);
                let p = &mut p[..m * n];
                // Keys and values 0..i1: the only ones a row of this block may attend to.
                let (q_blk, k_live, v_live) = (&qh[i0 * d..i1 * d], &kh[..n * d], &vh[..n * d]);
                sgemm(false, true, m, n, d, scale, q_blk, k_live, 0.0, p);
                for (r, row) in p.chunks_exact_mut(n).enumerate() {
                    let (live, masked) = row.split_at_mut(i0 + r + 1);
                    let max = max_or_nan(live);
                    let sum = exp_shifted(live, max);
                    simd::scale_assign(live, 1.0 / sum);
                    masked.fill(0.0);
                    lse[i0 + r] = max + sum.ln();
                }
                let o_blk = &mut o[i0 * d..i1 * d];
                sgemm(false, false, m, d, n, 1.0, p, v_live, 0.0, o_blk);
            }
        });
    scatter_heads(out, &out_heads, s);
}

/// Backward: writes dq [B, T, H, D], dk and dv [B, T, G, D] from dout, the inputs, the forward output and lse.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_cpu(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttentionShape,
) {
    let (t, d, scale) = (s.t, s.d, s.scale() as f32);
    let head = t * d;
    // Per query head, head-major [B, H, T, D]; dK and dV before the sum over each group of H/G query heads.
    let mut dq_heads = vec![0.0f32; s.b * s.h * head];
    let mut dk_heads = vec![0.0f32; s.b * s.h * head];
    let mut dv_heads = vec![0.0f32; s.b * s.h * head];
    dq_heads
        .par_chunks_mut(head)
        .zip(dk_heads.par_chunks_mut(head))
        .zip(dv_heads.par_chunks_mut(head))
        .zip(lse.par_chunks(t))
        .enumerate()
        .for_each(|(bh, (((dqh, dkh), dvh), lse))| {
            let (b, h) = (bh / s.h, bh % s.h);
            let qh = gather_head(q, s, s.h, b, h);
            let kh = gather_head(k, s, s.g, b, h / s.group());
            let vh = gather_head(v, s, s.g, b, h / s.group());
            let oh = gather_head(out, s, s.h, b, h);
            let doh = gather_head(dout, s, s.h, b, h);
            // rowsum(dO∘O) = Σ_j P_j dP_j: the softmax Jacobian's correction term, one per query row.
            let correction: Vec<f32> = doh
                .chunks_exact(d)
                .zip(oh.chunks_exact(d))
                .map(|(g, o)| simd::dot(g, o))
                .collect();
            let mut p = vec![0.0f32; QUERY_BLOCK.min(t) * t];
            let mut ds = vec![0.0f32; QUERY_BLOCK.min(t) * t];
            for i0 in (0..t).step_by(QUERY_BLOCK) {
                let i1 = (i0 + QUERY_BLOCK).min(t);
                let (m, n) = (i1 - i0, i1);
                let (p, ds) = (&mut p[..m * n], &mut ds[..m * n]);
                let (q_blk, do_blk) = (&qh[i0 * d..i1 * d], &doh[i0 * d..i1 * d]);
                let (k_live, v_live) = (&kh[..n * d], &vh[..n * d]);
                // Recompute P = exp(S − lse) for the live entries.
                sgemm(false, true, m, n, d, scale, q_blk, k_live, 0.0, p);
                for (r, row) in p.chunks_exact_mut(n).enumerate() {
                    let (live, masked) = row.split_at_mut(i0 + r + 1);
                    exp_shifted(live, lse[i0 + r]);
                    masked.fill(0.0);
                }
                // dV[..n] += Pᵀ·dO_blk
                sgemm(true, false, n, d, m, 1.0, p, do_blk, 1.0, &mut dvh[..n * d]);
                // dP = dO_blk·Vᵀ, then dS = P∘(dP − correction) in place (P is 0 on masked entries).
                sgemm(false, true, m, n, d, 1.0, do_blk, v_live, 0.0, ds);
                for (r, (ds, p)) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)).enumerate() {
                    let c = correction[i0 + r];
                    for (x, p) in ds.iter_mut().zip(p) {
                        *x = p * (*x - c);
                    }
                }
                // dQ_blk = scale·dS·K[..n]; dK[..n] += scale·dSᵀ·Q_blk
                let dq_blk = &mut dqh[i0 * d..i1 * d];
                sgemm(false, false, m, d, n, scale, ds, k_live, 0.0, dq_blk);
                let dk_live = &mut dkh[..n * d];
                sgemm(true, false, n, d, m, scale, ds, q_blk, 1.0, dk_live);
            }
        });
    scatter_heads(dq, &dq_heads, s);
    sum_groups(dk, &dk_heads, s);
    sum_groups(dv, &dv_heads, s);
}
