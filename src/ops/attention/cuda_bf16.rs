//! The bf16 GPU path: launches of `cuda/attention_bf16.cu` (FlashAttention-2 on the tensor cores, mma.sync
//! m16n8k16 bf16 with f32 accumulation; the tiling is described in the kernel file's header). It runs when the
//! context is in the bf16 mode (`GpuContext::set_matmul_bf16`) and D is 64 or 128; the tensors keep their f32
//! storage and API: q, k, v (and dO in the backward) are rounded to bf16 copies right before the kernels, out,
//! lse and the gradients are f32. Every product takes bf16 operands (Q, K, V, dO, and P and dS rounded in
//! registers) with f32 accumulation, as under torch.autocast's SDPA; the softmax, lse and delta stay f32.
//! The tape keeps the forward's bf16 copies of q, k, v for the backward (half the bytes of the f32 inputs), so
//! the backward casts only dO.
use super::AttentionShape;
use crate::error::Result;
use crate::gpu::{Arg, Bf16Buf, GpuBuf, GpuContext, KernelSource};
use crate::ops::linear::cast_bf16_cuda;

pub const CUDA: KernelSource = KernelSource {
    op: "attention_bf16",
    code: include_str!("../../../cuda/attention_bf16.cu"),
};

/// Query rows and keys per tile, and threads per block (fixed in cuda/attention_bf16.cu).
const TILE: usize = 64;
const THREADS: u32 = 128;

/// Whether a call on `ctx` at shape `s` takes this path.
pub fn runs_bf16(ctx: &GpuContext, s: AttentionShape) -> bool {
    ctx.matmul_bf16() && (s.d == 64 || s.d == 128)
}

/// The bf16 copies of q, k and v that both kernels read.
#[derive(Debug)]
pub struct Bf16Inputs {
    q: Bf16Buf,
    k: Bf16Buf,
    v: Bf16Buf,
}

impl Bf16Inputs {
    pub fn cast(q: &GpuBuf, k: &GpuBuf, v: &GpuBuf) -> Result<Bf16Inputs> {
        Ok(Bf16Inputs {
            q: cast_bf16_cuda(q)?,
            k: cast_bf16_cuda(k)?,
            v: cast_bf16_cuda(v)?,
        })
    }
}

fn dims(s: AttentionShape) -> [Arg; 5] {
    [
        Arg::I32(s.b as i32),
        Arg::I32(s.t as i32),
        Arg::I32(s.h as i32),
        Arg::I32(s.g as i32),
        Arg::F32(s.scale() as f32),
    ]
}

/// Forward: out [B, T, H, D] and lse [B, H, T], as `attention_fwd_cuda` (shapes checked by the caller).
pub(super) fn fwd(
    out: &mut GpuBuf,
    lse: &mut GpuBuf,
    x: &Bf16Inputs,
    s: AttentionShape,
) -> Result<()> {
    let kernel = match s.d {
        64 => "attention_fwd_bf16_d64",
        _ => "attention_fwd_bf16_d128",
    };
    // Q, two K and two V tiles of [64][D + 8] bf16.
    let smem = 2 * 5 * TILE * (s.d + 8);
    let [b, t, h, g, scale] = dims(s);
    out.ctx().launch(
        &CUDA,
        kernel,
        ((s.t.div_ceil(TILE) * s.b * s.h) as u32, 1, 1),
        (THREADS, 1, 1),
        smem as u32,
        &[
            out.arg(),
            lse.arg(),
            x.q.arg(),
            x.k.arg(),
            x.v.arg(),
            b,
            t,
            h,
            g,
            scale,
        ],
    )
}

/// Backward: dq [B, T, H, D] (zeroed here, then accumulated), dk and dv [B, T, G, D] (written), each when present,
/// as `attention_bwd_cuda`.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    dq: Option<&mut GpuBuf>,
    dk: Option<&mut GpuBuf>,
    dv: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    x: &Bf16Inputs,
    out: &GpuBuf,
    lse: &GpuBuf,
    s: AttentionShape,
) -> Result<()> {
    let ctx = dout.ctx().clone();
    let rows = s.b * s.t * s.h;
    let (doutb, delta) = (ctx.alloc_bf16(dout.len())?, ctx.alloc(rows)?);
    ctx.launch_1d(
        &CUDA,
        "attention_prep_bwd_bf16",
        rows * 32,
        &[
            delta.arg(),
            doutb.arg(),
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
    let kernel = match s.d {
        64 => "attention_bwd_bf16_d64",
        _ => "attention_bwd_bf16_d128",
    };
    // K, V, Q, dO tiles [64][D + 8] and dSᵀ [64][72] in bf16, lse and delta of a query block in f32.
    let smem = 2 * (4 * TILE * (s.d + 8) + TILE * (TILE + 8)) + 4 * 2 * TILE;
    let opt = |x: &Option<&mut GpuBuf>| x.as_ref().map_or(Arg::NULL, |b| b.arg());
    let [b, t, h, g, scale] = dims(s);
    ctx.launch(
        &CUDA,
        kernel,
        ((s.t.div_ceil(TILE) * s.b * s.g) as u32, 1, 1),
        (THREADS, 1, 1),
        smem as u32,
        &[
            opt(&dq),
            opt(&dk),
            opt(&dv),
            doutb.arg(),
            x.q.arg(),
            x.k.arg(),
            x.v.arg(),
            lse.arg(),
            delta.arg(),
            b,
            t,
            h,
            g,
            scale,
        ],
    )
}
