//! ggml tensor types: block layouts and dequantization to f32.
//!
//! Layouts follow ggml-org/llama.cpp `ggml/src/ggml-common.h` and the `dequantize_row_*` functions of
//! `ggml/src/ggml-quants.c`; the arithmetic is written in the same order as there, so results are
//! bit-exact against ggml and gguf-py (checked by tests/ggml_quants.rs on gguf-py fixtures).
//! All data is little-endian, as in every GGUF file in the wild.
use crate::error::{Error, Result};
use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;

/// Weights per super-block of the K-quants.
pub const QK_K: usize = 256;

/// A ggml tensor type id as stored in GGUF tensor infos.
///
/// Every type gguf-py knows is listed, so that a file holding types we cannot dequantize still opens
/// (its byte ranges can be checked); `dequantize` says which ones it handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    BF16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
    Nvfp4,
    Q1_0,
}

/// (type, id, ggml name, weights per block, bytes per block), from gguf-py `GGML_QUANT_SIZES`.
const TYPES: [(GgmlType, u32, &str, usize, usize); 34] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 40),
    (GgmlType::Q2K, 10, "Q2_K", QK_K, 84),
    (GgmlType::Q3K, 11, "Q3_K", QK_K, 110),
    (GgmlType::Q4K, 12, "Q4_K", QK_K, 144),
    (GgmlType::Q5K, 13, "Q5_K", QK_K, 176),
    (GgmlType::Q6K, 14, "Q6_K", QK_K, 210),
    (GgmlType::Q8K, 15, "Q8_K", QK_K, 292),
    (GgmlType::Iq2Xxs, 16, "IQ2_XXS", QK_K, 66),
    (GgmlType::Iq2Xs, 17, "IQ2_XS", QK_K, 74),
    (GgmlType::Iq3Xxs, 18, "IQ3_XXS", QK_K, 98),
    (GgmlType::Iq1S, 19, "IQ1_S", QK_K, 50),
    (GgmlType::Iq4Nl, 20, "IQ4_NL", 32, 18),
    (GgmlType::Iq3S, 21, "IQ3_S", QK_K, 110),
    (GgmlType::Iq2S, 22, "IQ2_S", QK_K, 82),
    (GgmlType::Iq4Xs, 23, "IQ4_XS", QK_K, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::Iq1M, 29, "IQ1_M", QK_K, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::Tq1_0, 34, "TQ1_0", QK_K, 54),
    (GgmlType::Tq2_0, 35, "TQ2_0", QK_K, 66),
    (GgmlType::Mxfp4, 39, "MXFP4", 32, 17),
    (GgmlType::Nvfp4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TYPES
            .iter()
            .find(|r| r.0 == self)
            .expect("every GgmlType variant has a row in TYPES")
    }
    /// The type with ggml id `id`; None for ids that ggml never had or has removed (4, 5, 31..33).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|r| r.1 == id).map(|r| r.0)
    }
    pub fn id(self) -> u32 {
        self.row().1
    }
    /// The ggml spelling ("Q4_K"), for messages.
    pub fn name(self) -> &'static str {
        self.row().2
    }
    /// Weights per block.
    pub fn block_size(self) -> usize {
        self.row().3
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }
    /// Whether `dequantize` handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K
        )
    }
}

/// `{f16 d; u8 qs[16]}`: y[j] = (lo(qs[j]) - 8)·d, y[j+16] = (hi(qs[j]) - 8)·d.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// `{f16 d; f16 m; u8 qs[16]}`: y[j] = lo(qs[j])·d + m, y[j+16] = hi(qs[j])·d + m.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// `{f16 d; u8 qh[4]; u8 qs[16]}`: bit j of the little-endian u32 qh is bit 4 of weight j.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// `{f16 d; f16 m; u8 qh[4]; u8 qs[16]}`: as Q5_0, unsigned, plus the min m.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// `{f16 d; i8 qs[32]}`: y[j] = qs[j]·d.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// 8 sub-blocks of 32 with 6-bit scales and mins packed in `scales` (see `scale_min_k4`).
/// Sub-block 2i takes the low nibbles of qs[32i..32i+32], sub-block 2i+1 the high nibbles.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// Q4_K plus a fifth bit: bit k of qh[l] is bit 4 of weight l of sub-block k.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// 16 sub-blocks of 16 with signed 8-bit scales; 6-bit weights as 4 low bits in ql, 2 high bits in qh.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

pub fn dequant_block_q4_0(b: &BlockQ4_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for j in 0..16 {
        y[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

pub fn dequant_block_q4_1(b: &BlockQ4_1, y: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for j in 0..16 {
        y[j] = (b.qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block, before the offset.
fn q5_values(qh: [u8; 4], qs: &[u8; 16]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

pub fn dequant_block_q5_0(b: &BlockQ5_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (y, q) in y.iter_mut().zip(q5_values(b.qh, &b.qs)) {
        *y = (q as i32 - 16) as f32 * d;
    }
}

pub fn dequant_block_q5_1(b: &BlockQ5_1, y: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for (y, q) in y.iter_mut().zip(q5_values(b.qh, &b.qs)) {
        *y = q as f32 * d + m;
    }
}

pub fn dequant_block_q8_0(b: &BlockQ8_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (y, &q) in y.iter_mut().zip(&b.qs) {
        *y = q as f32 * d;
    }
}

/// Scale and min of sub-block j (0..8) from the 12 packed bytes (ggml `get_scale_min_k4`):
/// bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 mins 0..4; sub-blocks 4..8 take their
/// low 4 bits from the nibbles of bytes 8..12 and their high 2 bits from the top bits of bytes 0..8.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

pub fn dequant_block_q4_k(b: &BlockQ4K, y: &mut [f32]) {
    let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
    for (i, (y, q)) in y
        .chunks_exact_mut(64)
        .zip(b.qs.chunks_exact(32))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * i, &b.scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

pub fn dequant_block_q5_k(b: &BlockQ5K, y: &mut [f32]) {
    let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
    for (i, (y, ql)) in y
        .chunks_exact_mut(64)
        .zip(b.qs.chunks_exact(32))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * i, &b.scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        for l in 0..32 {
            let h1 = ((b.qh[l] >> (2 * i)) & 1) << 4;
            let h2 = ((b.qh[l] >> (2 * i + 1)) & 1) << 4;
            y[l] = d1 * ((ql[l] & 0x0F) | h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) | h2) as f32 - m2;
        }
    }
}

pub fn dequant_block_q6_k(b: &BlockQ6K, y: &mut [f32]) {
    let d = b.d.to_f32();
    // Two halves of 128 weights; in each, ql[l] and ql[l+32] hold 4 weights' low bits in their
    // nibbles and qh[l] their 2-bit high parts, for weights l, l+32, l+64, l+96.
    for n in 0..2 {
        let (ql, qh) = (&b.ql[64 * n..64 * n + 64], &b.qh[32 * n..32 * n + 32]);
        let (sc, y) = (&b.scales[8 * n..8 * n + 8], &mut y[128 * n..128 * n + 128]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
        }
    }
}

/// Weights per rayon task: large enough to amortise scheduling, small enough to balance.
const WEIGHTS_PER_TASK: usize = 1 << 15;

/// Views `src` as blocks of `B`; copies when `src` is not aligned for `B` (mmap data is, a byte
/// buffer handed in by a caller may not be).
fn as_blocks<B: Pod>(src: &[u8]) -> Cow<'_, [B]> {
    match bytemuck::try_cast_slice(src) {
        Ok(blocks) => Cow::Borrowed(blocks),
        Err(_) => {
            let mut blocks = vec![B::zeroed(); src.len() / size_of::<B>()];
            bytemuck::cast_slice_mut(&mut blocks).copy_from_slice(src);
            Cow::Owned(blocks)
        }
    }
}

/// Runs `f` over every block of `src`, writing `qk` outputs per block, in parallel.
fn dequant_blocks<B: Pod + Sync>(
    src: &[u8],
    y: &mut [f32],
    qk: usize,
    f: impl Fn(&B, &mut [f32]) + Sync,
) {
    let blocks = as_blocks::<B>(src);
    let per_task = WEIGHTS_PER_TASK / qk;
    y.par_chunks_mut(qk * per_task)
        .zip(blocks.par_chunks(per_task))
        .for_each(|(y, blocks)| {
            for (y, b) in y.chunks_exact_mut(qk).zip(blocks) {
                f(b, y);
            }
        });
}

/// Dequantizes `src`, the raw bytes of `y.len()` weights of type `ty`, into `y`.
/// Errors when the lengths disagree or the type has no dequantization here.
pub fn dequantize(ty: GgmlType, src: &[u8], y: &mut [f32]) -> Result<()> {
    let (qk, ts) = (ty.block_size(), ty.type_size());
    if !y.len().is_multiple_of(qk) || src.len() != y.len() / qk * ts {
        return Err(Error::invalid(
            "dequantize",
            format!(
                "{} weights of {} need {} bytes (whole blocks of {qk}), got {} bytes",
                y.len(),
                ty.name(),
                y.len() / qk * ts,
                src.len()
            ),
        ));
    }
    match ty {
        GgmlType::F32 => dequant_blocks(src, y, 1, |b: &f32, y| y[0] = *b),
        GgmlType::F16 => dequant_blocks(src, y, 1, |b: &f16, y| y[0] = b.to_f32()),
        GgmlType::BF16 => dequant_blocks(src, y, 1, |b: &bf16, y| y[0] = b.to_f32()),
        GgmlType::Q4_0 => dequant_blocks(src, y, qk, dequant_block_q4_0),
        GgmlType::Q4_1 => dequant_blocks(src, y, qk, dequant_block_q4_1),
        GgmlType::Q5_0 => dequant_blocks(src, y, qk, dequant_block_q5_0),
        GgmlType::Q5_1 => dequant_blocks(src, y, qk, dequant_block_q5_1),
        GgmlType::Q8_0 => dequant_blocks(src, y, qk, dequant_block_q8_0),
        GgmlType::Q4K => dequant_blocks(src, y, qk, dequant_block_q4_k),
        GgmlType::Q5K => dequant_blocks(src, y, qk, dequant_block_q5_k),
        GgmlType::Q6K => dequant_blocks(src, y, qk, dequant_block_q6_k),
        _ => {
            return Err(Error::invalid(
                "dequantize",
                format!("dequantization of {} is not implemented", ty.name()),
            ))
        }
    }
    Ok(())
}
