//! The bf16 GPU path: launches of `cuda/attention_bf16.cu` (FlashAttention-2 on the tensor cores, bf16 products
//! with f32 accumulation: wgmma on Hopper, `cuda/attention_bf16_sm90.cu`, mma.sync m16n8k16 elsewhere; the
//! tilings are described in the kernel file's header). It runs when the
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
use std::sync::Arc;

/// The helpers and forward kernels, the mma.sync backward, then the Hopper kernels (which compile to nothing on
/// other targets).
pub const CUDA: KernelSource = KernelSource {
    op: "attention_bf16",
    code: concat!(
        include_str!("../../../cuda/attention_bf16.cu"),
        include_str!("../../../cuda/attention_bf16_bwd.cu"),
        include_str!("../../../cuda/attention_bf16_sm90.cu")
    ),
};

/// Queries per backward Q/dO tile and keys per forward K/V tile (cuda/attention_bf16.cu).
const TILE: usize = 64;

/// Whether the wgmma kernels run (`compile::ptx` targets sm_90a on sm_90 devices).
fn hopper(ctx: &GpuContext) -> bool {
    ctx.arch() == "sm_90"
}

/// A forward launch: kernel, query rows per block, threads, dynamic shared memory bytes.
fn fwd_kernel(ctx: &GpuContext, s: AttentionShape) -> (&'static str, usize, u32, usize) {
    match (s.d, hopper(ctx)) {
        // Four warps of 16 rows: Q, two K and two V tiles [64][72] in bf16.
        (64, _) => ("attention_fwd_bf16_d64", 64, 128, 2 * 5 * TILE * (64 + 8)),
        // Two warpgroups of 64 rows: Q [128][128] and two stages of K and V [64][128] in 128-byte-swizzled bf16,
        // plus 1 KiB for the alignment.
        (_, true) => (
            "attention_fwd_bf16_d128_sm90",
            128,
            256,
            1024 + (128 + 4 * TILE) * 2 * 128,
        ),
        // Four warps of 32 rows: Q [128][136], two K and two V tiles [64][136] in bf16.
        (_, false) => (
            "attention_fwd_bf16_d128",
            128,
            128,
            2 * (128 + 4 * TILE) * (128 + 8),
        ),
    }
}

/// Whether the backward runs the wgmma kernel (else the mma.sync ones).
fn wgmma_bwd(ctx: &GpuContext, s: AttentionShape) -> bool {
    hopper(ctx) && s.d == 128
}

/// A backward launch: kernel, keys per block, threads, dynamic shared memory bytes.
fn bwd_kernel(ctx: &GpuContext, s: AttentionShape) -> (&'static str, usize, u32, usize) {
    if wgmma_bwd(ctx, s) {
        // K, V [128][128], two stages of Q and dO [64][128], dSᵀ [128][64] in swizzled bf16, two stages of the
        // lse and delta of a query block, each warp's 16 rows of dQ [16][72] in f32, 1 KiB for the alignment.
        return (
            "attention_bwd_bf16_d128_sm90",
            128,
            256,
            1024 + (2 * 128 + 4 * TILE) * 256 + 128 * 128 + 1024 + 8 * 16 * 72 * 4,
        );
    }
    // Warps of 16 keys: 8 when that still gives a block per SM, else 4 (more, shorter blocks). K and V
    // [16·warps][D + 8], two stages of Q and dO [64][D + 8] and dSᵀ [16·warps][72] in bf16, two stages of the lse
    // and delta of a query block in f32.
    let warps = if s.t.div_ceil(128) * s.b * s.g >= ctx.sm_count() as usize {
        8
    } else {
        4
    };
    let keys = 16 * warps;
    let smem = 2 * ((2 * keys + 4 * TILE) * (s.d + 8) + keys * (TILE + 8)) + 4 * 4 * TILE;
    let kernel = match (s.d, warps) {
        (64, 4) => "attention_bwd_bf16_d64_w4",
        (64, _) => "attention_bwd_bf16_d64_w8",
        (_, 4) => "attention_bwd_bf16_d128_w4",
        _ => "attention_bwd_bf16_d128_w8",
    };
    (kernel, keys, 32 * warps as u32, smem)
}

/// Whether a call on `ctx` at shape `s` takes this path.
pub fn runs_bf16(ctx: &GpuContext, s: AttentionShape) -> bool {
    ctx.matmul_bf16() && has_bf16_kernels(s.d)
}

/// Whether the tensor-core kernels exist for head dim `d` (so that q, k, v may be bf16 values).
pub fn has_bf16_kernels(d: usize) -> bool {
    d == 64 || d == 128
}

/// The bf16 q, k and v that both kernels read: copies of f32 inputs, or the bf16 values themselves.
#[derive(Debug)]
pub struct Bf16Inputs {
    q: Arc<Bf16Buf>,
    k: Arc<Bf16Buf>,
    v: Arc<Bf16Buf>,
}

impl Bf16Inputs {
    pub fn cast(q: &GpuBuf, k: &GpuBuf, v: &GpuBuf) -> Result<Bf16Inputs> {
        Ok(Bf16Inputs {
            q: Arc::new(cast_bf16_cuda(q)?),
            k: Arc::new(cast_bf16_cuda(k)?),
            v: Arc::new(cast_bf16_cuda(v)?),
        })
    }

    /// bf16 values (the bf16 mode's q, k and v), shared rather than copied.
    pub fn shared(q: Arc<Bf16Buf>, k: Arc<Bf16Buf>, v: Arc<Bf16Buf>) -> Bf16Inputs {
        Bf16Inputs { q, k, v }
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

/// Where a kernel writes an output (O in the forward, dK or dV in the backward): f32 (the f32 tensors' path) or
/// bf16 (bf16 q, k, v values, whose output and gradients are bf16 too).
pub(super) enum OutBuf<'a> {
    F32(&'a mut GpuBuf),
    Bf16(&'a mut Bf16Buf),
}

impl OutBuf<'_> {
    /// The kernel's (f32, bf16) pointer pair: one of them null (both for an output not wanted).
    fn args(o: Option<&OutBuf>) -> [Arg; 2] {
        match o {
            Some(OutBuf::F32(b)) => [b.arg(), Arg::NULL],
            Some(OutBuf::Bf16(b)) => [Arg::NULL, b.arg()],
            None => [Arg::NULL, Arg::NULL],
        }
    }
}

/// Forward: out [B, T, H, D] (f32, or bf16 for bf16 q, k, v values) and lse [B, H, T], as `attention_fwd_cuda`
/// (shapes checked by the caller).
pub(super) fn fwd(out: OutBuf, lse: &mut GpuBuf, x: &Bf16Inputs, s: AttentionShape) -> Result<()> {
    let (kernel, rows, threads, smem) = fwd_kernel(lse.ctx(), s);
    let [b, t, h, g, scale] = dims(s);
    let [out, out_b] = OutBuf::args(Some(&out));
    lse.ctx().launch(
        &CUDA,
        kernel,
        ((s.t.div_ceil(rows) * s.b * s.h) as u32, 1, 1),
        (threads, 1, 1),
        smem as u32,
        &[
            out,
            out_b,
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

/// dO and the forward's output O, both f32 or both bf16 (`OutBuf`).
pub(super) enum DoutOut<'a> {
    F32 { dout: &'a GpuBuf, out: &'a GpuBuf },
    Bf16 { dout: &'a Bf16Buf, out: &'a Bf16Buf },
}

/// Backward: dq [B, T, H, D] (zeroed here, then accumulated), dk and dv [B, T, G, D] (written), each when present,
/// as `attention_bwd_cuda`. An f32 dO is rounded to bf16 by the prep kernel, which also computes delta; a bf16 dO
/// is read as it is.
pub(super) fn bwd(
    dq: Option<&mut GpuBuf>,
    [mut dk, mut dv]: [Option<OutBuf>; 2],
    dout_out: DoutOut,
    x: &Bf16Inputs,
    lse: &GpuBuf,
    s: AttentionShape,
) -> Result<()> {
    let ctx = lse.ctx().clone();
    let rows = s.b * s.t * s.h;
    let delta = ctx.alloc(rows)?;
    let dims_args = [
        Arg::I64(rows as i64),
        Arg::I32(s.t as i32),
        Arg::I32(s.h as i32),
        Arg::I32(s.d as i32),
    ];
    let cast;
    let doutb = match dout_out {
        DoutOut::F32 { dout, out } => {
            cast = ctx.alloc_bf16(dout.len())?;
            let args = [delta.arg(), cast.arg(), dout.arg(), out.arg()];
            let args: Vec<Arg> = args.into_iter().chain(dims_args).collect();
            ctx.launch_1d(&CUDA, "attention_prep_bwd_bf16", rows * 32, &args)?;
            &cast
        }
        DoutOut::Bf16 { dout, out } => {
            let args = [delta.arg(), dout.arg(), out.arg()];
            let args: Vec<Arg> = args.into_iter().chain(dims_args).collect();
            ctx.launch_1d(&CUDA, "attention_delta_bf16", rows * 32, &args)?;
            dout
        }
    };
    let mut dq = dq;
    if let Some(dq) = dq.as_deref_mut() {
        dq.zero()?; // the key blocks add into it
    }
    let (kernel, keys, threads, smem) = bwd_kernel(&ctx, s);
    let [b, t, h, g, scale] = dims(s);
    let blocks = s.t.div_ceil(keys) * s.b * s.g;
    // Too few key blocks to give every SM two: the mma.sync kernels share a key block's query blocks between 2
    // blocks, which add dK and dV into zeroed f32 buffers (cast to bf16 after, for bf16 k and v). Two partials
    // added onto 0 give the same bits in either order, so dK and dV stay deterministic (more would not).
    let splits = match wgmma_bwd(&ctx, s) {
        true => 1,
        false => (2 * ctx.sm_count() as usize).div_ceil(blocks).clamp(1, 2),
    };
    let mut sums = [None, None];
    if splits > 1 {
        for (out, sum) in [&mut dk, &mut dv].into_iter().zip(&mut sums) {
            match out {
                Some(OutBuf::F32(b)) => b.zero()?,
                Some(OutBuf::Bf16(b)) => *sum = Some(ctx.zeros(b.len())?),
                None => {}
            }
        }
    }
    let pointers = |o: &Option<OutBuf>, sum: &Option<GpuBuf>| match sum {
        Some(sum) => [sum.arg(), Arg::NULL],
        None => OutBuf::args(o.as_ref()),
    };
    let ([dk_arg, dk_b], [dv_arg, dv_b]) = (pointers(&dk, &sums[0]), pointers(&dv, &sums[1]));
    ctx.launch(
        &CUDA,
        kernel,
        ((blocks * splits) as u32, 1, 1),
        (threads, 1, 1),
        smem as u32,
        &[
            dq.as_ref().map_or(Arg::NULL, |b| b.arg()),
            dk_arg,
            dv_arg,
            dk_b,
            dv_b,
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
            Arg::I32(splits as i32),
        ],
    )?;
    for (out, sum) in [dk, dv].into_iter().zip(sums) {
        if let (Some(OutBuf::Bf16(b)), Some(sum)) = (out, sum) {
            crate::ops::linear::cast_bf16_into_cuda(b, &sum)?;
        }
    }
    Ok(())
}
