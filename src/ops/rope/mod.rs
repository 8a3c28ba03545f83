//! rope: rotary position embedding of x [B, T, H, D] at positions pos = pos0 + t.
//!
//! Pair i (i < D/2) is rotated by theta_i = pos * base^(-2i/D). Two layouts say which dims form pair i:
//! - `HalfSplit`: dims (i, i + D/2), HF Llama's `rotate_half` (y = x*cos + rotate_half(x)*sin);
//! - `Interleaved`: dims (2i, 2i + 1), Meta's original code and llama.cpp on GGUF files.
//!
//! llama.cpp's HF -> GGUF converter permutes q/k rows per head (GGUF dim 2i <- HF dim i, 2i + 1 <- i + D/2),
//! so Interleaved rope on GGUF weights equals HalfSplit rope on HF weights (the test
//! `rope_layouts_agree_under_the_gguf_permutation` checks exactly this).
//!
//! Angles: the CPU path uses a cos/sin table [T, D/2] whose angles and cos/sin are computed in f64 and then
//! rounded to f32, so the rotation is exact to f32 rounding at every position. (HF computes pos * inv_freq in
//! f32, whose rounding reaches ~2e-4 rad by position 4096; ours are the f64 values.)
//!
//! Backward is the rotation by -theta (the transpose of a rotation). Activation gradients are written (`=`).
//! On the GPU (`cuda/rope.cu`) the same host-built table is uploaded, so both paths rotate by the same f32 cos/sin.
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (i, i + D/2): HF transformers' Llama (`rotate_half`).
    HalfSplit,
    /// Pairs (2i, 2i + 1): Meta's Llama and llama.cpp/GGUF.
    Interleaved,
}

impl RopeLayout {
    /// The two dims that form pair i of a head of `d` dims.
    #[inline]
    fn pair(self, i: usize, d: usize) -> (usize, usize) {
        match self {
            RopeLayout::HalfSplit => (i, i + d / 2),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}

/// theta_i at position `pos` in f64.
fn angle(pos: usize, i: usize, d: usize, base: f64) -> f64 {
    pos as f64 * base.powf(-2.0 * i as f64 / d as f64)
}

/// cos and sin of theta_i at positions pos0..pos0 + t, row-major [t, d/2].
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The last table built by `RopeTable::cached`, with its (T, D, pos0, base bits).
type LastTable = Option<((usize, usize, usize, u32), Arc<RopeTable>)>;
static LAST_TABLE: Mutex<LastTable> = Mutex::new(None);

impl RopeTable {
    /// `RopeTable::new`, reusing the previous call's table when the arguments repeat (every layer and every
    /// training step asks for the same one: 2·T·D/2 sines and cosines in f64 is host time the GPU waits for).
    pub fn cached(t: usize, d: usize, pos0: usize, base: f32) -> Arc<RopeTable> {
        let key = (t, d, pos0, base.to_bits());
        let mut last = LAST_TABLE.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((k, table)) if *k == key => table.clone(),
            _ => {
                let table = Arc::new(RopeTable::new(t, d, pos0, base));
                *last = Some((key, table.clone()));
                table
            }
        }
    }

    pub fn new(t: usize, d: usize, pos0: usize, base: f32) -> RopeTable {
        let half = d / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| angle(1, i, d, base as f64)).collect();
        let (cos, sin) = (0..t * half)
            .into_par_iter()
            .map(|k| {
                let (s, c) = ((pos0 + k / half) as f64 * inv_freq[k % half]).sin_cos();
                (c as f32, s as f32)
            })
            .unzip();
        RopeTable { cos, sin }
    }
}

/// y = R(sign * theta) x for one head. `sign` = 1 is the forward, -1 the backward.
#[inline]
fn rotate_ref(y: &mut [f64], x: &[f64], pos: usize, base: f64, layout: RopeLayout, sign: f64) {
    let d = x.len();
    for i in 0..d / 2 {
        let (s, c) = (sign * angle(pos, i, d, base)).sin_cos();
        let (a, b) = layout.pair(i, d);
        y[a] = x[a] * c - x[b] * s;
        y[b] = x[a] * s + x[b] * c;
    }
}

/// `shape` is [B, T, H, D].
pub fn rope_fwd_ref(
    out: &mut [f64],
    x: &[f64],
    shape: [usize; 4],
    pos0: usize,
    base: f64,
    layout: RopeLayout,
) {
    let [_, t, h, d] = shape;
    for (k, (y, x)) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
        rotate_ref(y, x, pos0 + (k / h) % t, base, layout, 1.0);
    }
}

pub fn rope_bwd_ref(
    dx: &mut [f64],
    dout: &[f64],
    shape: [usize; 4],
    pos0: usize,
    base: f64,
    layout: RopeLayout,
) {
    let [_, t, h, d] = shape;
    for (k, (dx, dy)) in dx.chunks_exact_mut(d).zip(dout.chunks_exact(d)).enumerate() {
        rotate_ref(dx, dy, pos0 + (k / h) % t, base, layout, -1.0);
    }
}

/// One head: y = R(theta) x with `sin` negated for the backward.
#[inline]
fn rotate_head(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], layout: RopeLayout, sign: f32) {
    let half = cos.len();
    match layout {
        RopeLayout::HalfSplit => {
            let (y1, y2) = y.split_at_mut(half);
            let (x1, x2) = x.split_at(half);
            for i in 0..half {
                let (c, s) = (cos[i], sign * sin[i]);
                y1[i] = x1[i] * c - x2[i] * s;
                y2[i] = x1[i] * s + x2[i] * c;
            }
        }
        RopeLayout::Interleaved => {
            for (i, (y, x)) in y.chunks_exact_mut(2).zip(x.chunks_exact(2)).enumerate() {
                let (c, s) = (cos[i], sign * sin[i]);
                y[0] = x[0] * c - x[1] * s;
                y[1] = x[0] * s + x[1] * c;
            }
        }
    }
}

/// Parallel over the B*T rows of H*D values; every head of a row shares that row's table entries.
fn rotate_cpu(
    y: &mut [f32],
    x: &[f32],
    dims: [usize; 4],
    table: &RopeTable,
    layout: RopeLayout,
    sign: f32,
) {
    let [_, t, h, d] = dims;
    if y.is_empty() {
        return; // also covers H = 0, whose rows of H * D = 0 values could not be chunked
    }
    let half = d / 2;
    y.par_chunks_mut(h * d)
        .zip(x.par_chunks(h * d))
        .enumerate()
        .for_each(|(row, (y, x))| {
            let tt = row % t;
            let (cos, sin) = (
                &table.cos[tt * half..][..half],
                &table.sin[tt * half..][..half],
            );
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                rotate_head(y, x, cos, sin, layout, sign);
            }
        });
}

pub fn rope_fwd_cpu(
    out: &mut [f32],
    x: &[f32],
    shape: [usize; 4],
    table: &RopeTable,
    layout: RopeLayout,
) {
    rotate_cpu(out, x, shape, table, layout, 1.0);
}

pub fn rope_bwd_cpu(
    dx: &mut [f32],
    dout: &[f32],
    shape: [usize; 4],
    table: &RopeTable,
    layout: RopeLayout,
) {
    rotate_cpu(dx, dout, shape, table, layout, -1.0);
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "rope",
    code: include_str!("../../../cuda/rope.cu"),
};

/// `RopeTable`'s cos and sin, uploaded.
#[cfg(feature = "cuda")]
pub struct RopeTableCuda {
    cos: GpuBuf,
    sin: GpuBuf,
}

#[cfg(feature = "cuda")]
impl RopeTable {
    pub fn to_device(&self, ctx: &std::sync::Arc<crate::gpu::GpuContext>) -> Result<RopeTableCuda> {
        Ok(RopeTableCuda {
            cos: ctx.upload(&self.cos)?,
            sin: ctx.upload(&self.sin)?,
        })
    }
}

/// One thread per (row, head, pair); `kernel` is rope_fwd_f32 or rope_bwd_f32 (rotation by -theta), or their bf16
/// twins, with y and x (`len` values each) at `y_x`.
#[cfg(feature = "cuda")]
fn rotate_cuda(
    kernel: &'static str,
    ctx: &std::sync::Arc<crate::gpu::GpuContext>,
    (y, x, len): (Arg, Arg, usize),
    dims: [usize; 4],
    table: &RopeTableCuda,
    layout: RopeLayout,
) -> Result<()> {
    let [_, t, h, d] = dims;
    let n_pairs = len / 2;
    let layout = match layout {
        RopeLayout::HalfSplit => 0,
        RopeLayout::Interleaved => 1,
    };
    ctx.launch_1d(
        &CUDA,
        kernel,
        n_pairs,
        &[
            y,
            x,
            table.cos.arg(),
            table.sin.arg(),
            Arg::I64(n_pairs as i64),
            Arg::I32(t as i32),
            Arg::I32(h as i32),
            Arg::I32(d as i32),
            Arg::I32(layout),
        ],
    )
}

/// The device buffers of a rotation (y, x): f32 or bf16 (the bf16 mode's q and k), both alike, or (backward only)
/// a bf16 gradient from an f32 one (`Backward::reads_f32_dout`).
#[cfg(feature = "cuda")]
pub enum RopeBufs<'a> {
    F32(&'a mut GpuBuf, &'a GpuBuf),
    Bf16(&'a mut crate::gpu::Bf16Buf, &'a crate::gpu::Bf16Buf),
    Bf16FromF32(&'a mut crate::gpu::Bf16Buf, &'a GpuBuf),
}

#[cfg(feature = "cuda")]
impl RopeBufs<'_> {
    /// (kernel, context, (y, x, len)) for the forward (`fwd`) or backward rotation; errors when the lengths differ.
    #[allow(clippy::type_complexity)]
    fn launch_args(
        &self,
        fwd: bool,
    ) -> Result<(
        &'static str,
        std::sync::Arc<crate::gpu::GpuContext>,
        (Arg, Arg, usize),
    )> {
        let kernel = match (self, fwd) {
            (RopeBufs::F32(..), true) => "rope_fwd_f32",
            (RopeBufs::F32(..), false) => "rope_bwd_f32",
            (RopeBufs::Bf16(..), true) => "rope_fwd_bf16",
            (RopeBufs::Bf16(..), false) => "rope_bwd_bf16",
            (RopeBufs::Bf16FromF32(..), false) => "rope_bwd_f32_bf16",
            (RopeBufs::Bf16FromF32(..), true) => {
                return Err(Error::invalid(
                    "rope",
                    "the forward takes and gives values of one dtype",
                ))
            }
        };
        let (ctx, lens, args) = match self {
            RopeBufs::F32(y, x) => (y.ctx().clone(), (y.len(), x.len()), (y.arg(), x.arg())),
            RopeBufs::Bf16(y, x) => (y.ctx().clone(), (y.len(), x.len()), (y.arg(), x.arg())),
            RopeBufs::Bf16FromF32(y, x) => {
                (y.ctx().clone(), (y.len(), x.len()), (y.arg(), x.arg()))
            }
        };
        if lens.0 != lens.1 {
            return Err(Error::shape(
                "rope",
                format!("output of {} values, input of {}", lens.0, lens.1),
            ));
        }
        Ok((kernel, ctx, (args.0, args.1, lens.0)))
    }
}

#[cfg(feature = "cuda")]
pub fn rope_fwd_cuda(
    bufs: RopeBufs,
    shape: [usize; 4],
    table: &RopeTableCuda,
    layout: RopeLayout,
) -> Result<()> {
    let (kernel, ctx, args) = bufs.launch_args(true)?;
    rotate_cuda(kernel, &ctx, args, shape, table, layout)
}

/// dx from dout: the rotation by -theta.
#[cfg(feature = "cuda")]
pub fn rope_bwd_cuda(
    bufs: RopeBufs,
    shape: [usize; 4],
    table: &RopeTableCuda,
    layout: RopeLayout,
) -> Result<()> {
    let (kernel, ctx, args) = bufs.launch_args(false)?;
    rotate_cuda(kernel, &ctx, args, shape, table, layout)
}

pub fn rope(tape: &mut Tape, x: Var, pos0: usize, base: f32, layout: RopeLayout) -> Result<Var> {
    let sx = tape.value(x).shape().to_vec();
    let shape: [usize; 4] = match sx[..] {
        [b, t, h, d] if d % 2 == 0 && d > 0 => [b, t, h, d],
        _ => {
            return Err(Error::shape(
                "rope",
                format!("x {sx:?} must be [B, T, H, D] with D even and > 0"),
            ))
        }
    };
    if !(base > 0.0 && base.is_finite()) {
        return Err(Error::invalid(
            "rope",
            format!("base must be finite and > 0, got {base}"),
        ));
    }
    let table = RopeTable::cached(shape[1], shape[3], pos0, base);
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("rope", &[tape.value(x)])? {
        if shape[1..].iter().any(|&v| v > i32::MAX as usize) {
            return Err(Error::shape(
                "rope",
                format!("x {sx:?}: the kernel needs T, H, D < 2^31"),
            ));
        }
        // Uploaded once per tape: an upload at every call would put two host-to-device copies on the compute
        // stream, between the kernels, at every rope of every step.
        // (The context's address is part of the key: the table holds the context, so no other takes its place.)
        let key = format!(
            "rope {t} {d} {pos0} {:08x} on {:p}",
            base.to_bits(),
            Arc::as_ptr(&ctx),
            t = shape[1],
            d = shape[3]
        );
        let table = tape.device_constant(&key, || table.to_device(&ctx).map(Arc::new))?;
        let n = tape.value(x).numel();
        // A bf16 x (the bf16 mode's q and k) gives a bf16 output, which attention reads as it is.
        let out = match tape.value(x).dtype() {
            crate::tensor::DType::BF16 => {
                let mut out = ctx.alloc_bf16(n)?;
                let bufs = RopeBufs::Bf16(&mut out, tape.value(x).gpu_bf16("rope")?);
                rope_fwd_cuda(bufs, shape, &table, layout)?;
                Tensor::from_gpu_bf16(&sx, out)?
            }
            _ => {
                let mut out = ctx.alloc(n)?;
                rope_fwd_cuda(
                    RopeBufs::F32(&mut out, tape.value(x).gpu("rope")?),
                    shape,
                    &table,
                    layout,
                )?;
                Tensor::from_gpu(&sx, out)?
            }
        };
        let backward = RopeBackward {
            table: SavedTable::Device(table),
            shape,
            layout,
        };
        return Ok(tape.push_op(out, &[x], Box::new(backward)));
    }
    let mut out = tape.alloc(&sx);
    rope_fwd_cpu(
        out.f32s_mut("rope")?,
        tape.value(x).f32s("rope")?,
        shape,
        &table,
        layout,
    );
    let backward = RopeBackward {
        table: SavedTable::Host(table),
        shape,
        layout,
    };
    Ok(tape.push_op(out, &[x], Box::new(backward)))
}

/// The cos/sin table, where the forward ran.
enum SavedTable {
    Host(Arc<RopeTable>),
    #[cfg(feature = "cuda")]
    Device(Arc<RopeTableCuda>),
}

struct RopeBackward {
    table: SavedTable,
    shape: [usize; 4],
    layout: RopeLayout,
}

impl Backward for RopeBackward {
    fn name(&self) -> &'static str {
        "rope"
    }
    /// Every kernel and GEMM of this backward writes each element of the gradients it is given.
    fn overwrites_dinputs(&self) -> bool {
        true
    }
    /// A bf16 output's gradient may come in f32 (attention's dq, dk): rotated, then rounded once.
    fn reads_f32_dout(&self) -> bool {
        true
    }
    fn backward(
        &self,
        _: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        let Some(dx) = &mut d[0] else {
            return Ok(());
        };
        let op = "rope_bwd";
        match &self.table {
            SavedTable::Host(table) => {
                let dx = dx.f32s_mut(op)?;
                rope_bwd_cpu(dx, dout.f32s(op)?, self.shape, table, self.layout);
            }
            #[cfg(feature = "cuda")]
            SavedTable::Device(table) => {
                use crate::tensor::DType::BF16;
                let bufs = match (dx.dtype(), dout.dtype()) {
                    (BF16, BF16) => RopeBufs::Bf16(dx.gpu_bf16_mut(op)?, dout.gpu_bf16(op)?),
                    (BF16, _) => RopeBufs::Bf16FromF32(dx.gpu_bf16_mut(op)?, dout.gpu(op)?),
                    _ => RopeBufs::F32(dx.gpu_mut(op)?, dout.gpu(op)?),
                };
                rope_bwd_cuda(bufs, self.shape, table, self.layout)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
