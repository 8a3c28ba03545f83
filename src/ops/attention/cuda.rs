//! The f32 GPU path: launches of `cuda/attention.cu` (FlashAttention-2's recipe on the CUDA cores; the tiling is
//! described in the kernel file's header). In the context's bf16 mode at D 64 and 128 the launchers hand over to
//! the tensor-core kernels of `cuda_bf16.rs` instead. Compiled head dims: 64 and 128; a smaller D runs in the smaller
//! kernel, zero-padded. dQ is accumulated with atomics by the key blocks, so its last bits may differ from run to
//! run; dK and dV are summed in a fixed order.
use super::cuda_bf16::{self, runs_bf16, Bf16Inputs};
use super::AttentionShape;
use crate::error::{Error, Result};
use crate::gpu::{Arg, GpuBuf, GpuContext, KernelSource};
use std::sync::Arc;
use std::time::Instant;

pub const CUDA: KernelSource = KernelSource {
    op: "attention",
    code: include_str!("../../../cuda/attention.cu"),
};

/// Query rows and keys per tile, and threads per block (fixed in cuda/attention.cu).
const TILE: usize = 64;
const THREADS: u32 = 256;
/// Largest head dim the kernels are compiled for.
pub const MAX_HEAD_DIM: usize = 128;

/// The compiled head dim a call runs in: 64 or 128.
fn dmax(s: AttentionShape) -> usize {
    if s.d <= 64 {
        64
    } else {
        128
    }
}

/// Checks what the kernels need beyond `AttentionShape::check`: D <= 128 and 32-bit block and row indices.
fn check_cuda(s: AttentionShape) -> Result<()> {
    if s.d > MAX_HEAD_DIM {
        return Err(Error::shape(
            "attention",
            format!("{s:?}: the CUDA kernels support head dims D <= {MAX_HEAD_DIM}"),
        ));
    }
    let blocks = s.t.div_ceil(TILE) * s.b * s.h;
    if blocks > i32::MAX as usize || s.b * s.t > i32::MAX as usize {
        return Err(Error::shape(
            "attention",
            format!("{s:?}: the CUDA kernels need B·T and the block count below 2^31"),
        ));
    }
    Ok(())
}

fn dims(s: AttentionShape) -> [Arg; 6] {
    [
        Arg::I32(s.b as i32),
        Arg::I32(s.t as i32),
        Arg::I32(s.h as i32),
        Arg::I32(s.g as i32),
        Arg::I32(s.d as i32),
        Arg::F32(s.scale() as f32),
    ]
}

fn grid(s: AttentionShape) -> (u32, u32, u32) {
    ((s.t.div_ceil(TILE) * s.b * s.h) as u32, 1, 1)
}

/// Forward: out [B, T, H, D] and lse [B, H, T] (the log-sum-exp of each scaled score row), as `attention_fwd_cpu`.
pub fn attention_fwd_cuda(
    out: &mut GpuBuf,
    lse: &mut GpuBuf,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    s: AttentionShape,
) -> Result<()> {
    attention_fwd_cuda_keep(out, lse, q, k, v, s).map(drop)
}

/// `attention_fwd_cuda`, returning the bf16 copies of q, k and v when it ran the bf16 kernels, for
/// `attention_bwd_cuda_with` to reuse.
pub(super) fn attention_fwd_cuda_keep(
    out: &mut GpuBuf,
    lse: &mut GpuBuf,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    s: AttentionShape,
) -> Result<Option<Bf16Inputs>> {
    check_cuda(s)?;
    if runs_bf16(out.ctx(), s) {
        let x = Bf16Inputs::cast(q, k, v)?;
        cuda_bf16::fwd(cuda_bf16::OutBuf::F32(out), lse, &x, s)?;
        return Ok(Some(x));
    }
    let dm = dmax(s);
    let kernel = if dm == 64 {
        "attention_fwd_f32_d64"
    } else {
        "attention_fwd_f32_d128"
    };
    // Q, K, V tiles [64][DMAX + 4] and the probabilities [64][64 + 4].
    let smem = 4 * (3 * TILE * (dm + 4) + TILE * (TILE + 4));
    let [b, t, h, g, d, scale] = dims(s);
    out.ctx().launch(
        &CUDA,
        kernel,
        grid(s),
        (THREADS, 1, 1),
        smem as u32,
        &[
            out.arg(),
            lse.arg(),
            q.arg(),
            k.arg(),
            v.arg(),
            b,
            t,
            h,
            g,
            d,
            scale,
        ],
    )?;
    Ok(None)
}

/// The forward on bf16 q, k and v (the bf16 mode's values, shared): out [B, T, H, D] in bf16 and lse [B, H, T]
/// in f32. Needs the tensor-core kernels (the bf16 mode, D 64 or 128).
pub(super) fn attention_fwd_bf16_values(
    out: &mut crate::gpu::Bf16Buf,
    lse: &mut GpuBuf,
    x: &Bf16Inputs,
    s: AttentionShape,
) -> Result<()> {
    check_cuda(s)?;
    if !runs_bf16(lse.ctx(), s) {
        return Err(Error::invalid(
            "attention",
            format!(
                "{s:?}: bf16 q, k, v need the bf16 mode's tensor-core kernels (head dim 64 or 128)"
            ),
        ));
    }
    cuda_bf16::fwd(cuda_bf16::OutBuf::Bf16(out), lse, x, s)
}

/// Backward: dq [B, T, H, D], dk and dv [B, T, G, D] (each written when present) from dout, the inputs, the
/// forward's out and lse, as `attention_bwd_cpu`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_cuda(
    dq: Option<&mut GpuBuf>,
    dk: Option<&mut GpuBuf>,
    dv: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    out: &GpuBuf,
    lse: &GpuBuf,
    s: AttentionShape,
) -> Result<()> {
    attention_bwd_cuda_with(dq, dk, dv, dout, q, k, v, out, lse, None, s)
}

/// `attention_bwd_cuda` with the bf16 copies of q, k and v the forward kept (`attention_fwd_cuda_keep`), if any.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd_cuda_with(
    dq: Option<&mut GpuBuf>,
    dk: Option<&mut GpuBuf>,
    dv: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    out: &GpuBuf,
    lse: &GpuBuf,
    kept: Option<&Bf16Inputs>,
    s: AttentionShape,
) -> Result<()> {
    check_cuda(s)?;
    let ctx = dout.ctx().clone();
    if runs_bf16(&ctx, s) {
        let cast;
        let x = match kept {
            Some(x) => x,
            None => {
                cast = Bf16Inputs::cast(q, k, v)?;
                &cast
            }
        };
        let dout_out = cuda_bf16::DoutOut::F32 { dout, out };
        let grads = [
            dk.map(cuda_bf16::OutBuf::F32),
            dv.map(cuda_bf16::OutBuf::F32),
        ];
        return cuda_bf16::bwd(dq, grads, dout_out, x, lse, s);
    }
    let rows = s.b * s.t * s.h;
    let delta = ctx.alloc(rows)?;
    ctx.launch_1d(
        &CUDA,
        "attention_delta_f32",
        rows * 32,
        &[
            delta.arg(),
            dout.arg(),
            out.arg(),
            Arg::I64(rows as i64),
            Arg::I32(s.t as i32),
            Arg::I32(s.h as i32),
            Arg::I32(s.d as i32),
        ],
    )?;
    let mut dq = dq;
    if let Some(dq) = dq.as_deref_mut() {
        dq.zero()?; // the key blocks add into it
    }
    // With H > G the kernel writes per-query-head dK/dV, summed over each group below.
    let grouped = s.h != s.g;
    let per_head = |want: bool| -> Result<Option<GpuBuf>> {
        match grouped && want {
            true => Ok(Some(ctx.alloc(rows * s.d)?)),
            false => Ok(None),
        }
    };
    let (mut dk_heads, mut dv_heads) = (per_head(dk.is_some())?, per_head(dv.is_some())?);
    let target = |direct: &Option<&mut GpuBuf>, heads: &Option<GpuBuf>| match heads {
        Some(b) => b.arg(),
        None => direct.as_ref().map_or(Arg::NULL, |b| b.arg()),
    };
    let (dk_arg, dv_arg) = (target(&dk, &dk_heads), target(&dv, &dv_heads));
    let dm = dmax(s);
    let kernel = if dm == 64 {
        "attention_bwd_f32_d64"
    } else {
        "attention_bwd_f32_d128"
    };
    // K, V, Q, dO tiles [64][DMAX + 4] and the P and dS tiles [64][64 + 4].
    let smem = 4 * (4 * TILE * (dm + 4) + 2 * TILE * (TILE + 4));
    let [b, t, h, g, d, scale] = dims(s);
    ctx.launch(
        &CUDA,
        kernel,
        grid(s),
        (THREADS, 1, 1),
        smem as u32,
        &[
            dq.as_ref().map_or(Arg::NULL, |b| b.arg()),
            dk_arg,
            dv_arg,
            dout.arg(),
            q.arg(),
            k.arg(),
            v.arg(),
            lse.arg(),
            delta.arg(),
            b,
            t,
            h,
            g,
            d,
            scale,
        ],
    )?;
    for (dst, heads) in [(dk, dk_heads.as_mut()), (dv, dv_heads.as_mut())] {
        if let (Some(dst), Some(heads)) = (dst, heads) {
            ctx.launch_1d(
                &CUDA,
                "attention_sum_groups_f32",
                dst.len(),
                &[
                    dst.arg(),
                    heads.arg(),
                    Arg::I64(dst.len() as i64),
                    Arg::I32(s.h as i32),
                    Arg::I32(s.g as i32),
                    Arg::I32(s.d as i32),
                ],
            )?;
        }
    }
    Ok(())
}

/// Median wall times of the GPU forward and forward+backward (all three gradients) at shape `s`, in ms.
#[derive(Clone, Copy, Debug)]
pub struct AttentionTiming {
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
}

impl AttentionTiming {
    /// Causal FLOPs: forward 2·B·H·T²·D (QKᵀ and PV over the lower triangle), backward 2.5× that.
    pub fn fwd_flop(s: AttentionShape) -> f64 {
        2.0 * (s.b * s.h) as f64 * (s.t as f64).powi(2) * s.d as f64
    }

    pub fn fwd_tflops(&self, s: AttentionShape) -> f64 {
        Self::fwd_flop(s) / (self.fwd_ms * 1e9)
    }

    pub fn fwd_bwd_tflops(&self, s: AttentionShape) -> f64 {
        3.5 * Self::fwd_flop(s) / (self.fwd_bwd_ms * 1e9)
    }
}

/// Times the kernels on random inputs (made on the host, uploaded once): `reps` synchronised runs of each after
/// two warm-ups (which also compile the kernels), median of the host clock around each run. The context's mode
/// picks the kernels (f32, or bf16 at D 64 and 128, the bf16 casts included in the times).
pub fn time_attention_cuda(
    ctx: &Arc<GpuContext>,
    s: AttentionShape,
    reps: usize,
) -> Result<AttentionTiming> {
    check_cuda(s)?;
    let mut rng = crate::Rng::new(7);
    let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
    let q = ctx.upload(&rng.normal_vec(nq, 1.0))?;
    let k = ctx.upload(&rng.normal_vec(nkv, 1.0))?;
    let v = ctx.upload(&rng.normal_vec(nkv, 1.0))?;
    let dout = ctx.upload(&rng.normal_vec(nq, 1.0))?;
    let (mut out, mut lse) = (ctx.alloc(nq)?, ctx.alloc(s.b * s.h * s.t)?);
    let (mut dq, mut dk, mut dv) = (ctx.alloc(nq)?, ctx.alloc(nkv)?, ctx.alloc(nkv)?);
    let mut median = |bwd: bool| -> Result<f64> {
        let mut ms = Vec::with_capacity(reps);
        for i in 0..reps.max(1) + 2 {
            ctx.synchronize()?;
            let start = Instant::now();
            // As the tape runs it: the backward reuses the forward's bf16 copies.
            let kept = attention_fwd_cuda_keep(&mut out, &mut lse, &q, &k, &v, s)?;
            if bwd {
                attention_bwd_cuda_with(
                    Some(&mut dq),
                    Some(&mut dk),
                    Some(&mut dv),
                    &dout,
                    &q,
                    &k,
                    &v,
                    &out,
                    &lse,
                    kept.as_ref(),
                    s,
                )?;
            }
            ctx.synchronize()?;
            if i >= 2 {
                ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    };
    Ok(AttentionTiming {
        fwd_ms: median(false)?,
        fwd_bwd_ms: median(true)?,
    })
}
