//! pack: 2, 3, 4 and 8-bit integers in 32-bit words, in the two layouts found in the wild, and the zero-point
//! conventions of GPTQ checkpoints (formats.md §1.4, §5).
//!
//! A *stream* is a sequence of n values v0, v1, .. packed into words w0, w1, ..; the 2-D helpers pack a
//! row-major matrix along one dimension, each line of the other dimension being one stream:
//! - [`pack_rows`]: along dim 0. GPTQ `qweight`: ints [in, out] -> words [words(in), out].
//! - [`pack_cols`]: along dim 1. GPTQ `qzeros`: [groups, out] -> [groups, words(out)] (through
//!   [`pack_qzeros`], which applies the [`ZeroConvention`]); also our internal qweight, [out, in] -> [out, words(in)].
//!
//! Every value must fit in `bits` (an error names the tensor and the position otherwise), and every unpacker
//! returns exactly the values that were packed: `unpack(pack(v)) == v` whenever pack returns Ok.
use crate::error::{Error, Result};

#[cfg(test)]
mod tests;

/// The bit widths both layouts support.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

/// Where value i of a stream goes. See the module docs for the streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackLayout {
    /// GPTQ's (AutoGPTQ `pack()`, formats.md §5.2-5.3): a dense little-endian bit stream. Value i occupies stream
    /// bits b·i .. b·i+b−1, and stream bit t is bit t%32 of word t/32. At 2, 4 and 8 bits a word holds 32/b whole
    /// values, least significant first:
    /// ```text
    ///   4-bit word:  bit 31 [ v7 | v6 | v5 | v4 | v3 | v2 | v1 | v0 ] bit 0      (v_j at bits 4j..4j+3)
    ///   2-bit word:  [ v15 | .. | v1 | v0 ]   8-bit word: [ v3 | v2 | v1 | v0 ]
    /// ```
    /// At 3 bits, 32 values fill 3 words and values 10 and 21 straddle a word boundary:
    /// ```text
    ///   word 0: [ v10 bits 1..0 (31..30) | v9 .. v0 at bits 3j   (29..0) ]
    ///   word 1: [ v21 bit 0     (31)     | v20 .. v11 at 3j+1    (30..1) | v10 bit 2 (0) ]
    ///   word 2: [ v31 .. v22 at bits 3j+2                        (31..2) | v21 bits 2..1 (1..0) ]
    /// ```
    /// A stream must fill whole words: its length is a multiple of 32/b values (of 32 at 3 bits).
    Gptq,
    /// EfficientQAT's own packer (`quantize/int_linear_real.py`, formats.md §1.4): p = ⌊32/b⌋ values per word,
    /// value i in word i/p at bits b·(i%p) .., the last word possibly partial (⌈n/p⌉ words). At 3 bits that is 10
    /// values per word with the top 2 bits unused:
    /// ```text
    ///   word k: [ 0 0 (31..30) | v(10k+9) (29..27) | .. | v(10k+1) (5..3) | v(10k) (2..0) ]
    /// ```
    /// At 2, 4 and 8 bits the bit order is Gptq's; only the partial last word differs (any length is accepted).
    EqatTenPerWord,
}

/// How a checkpoint stores zero points z in `qzeros` (formats.md §5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroConvention {
    /// GPTQ v1 (`checkpoint_format: "gptq"`): stores z − 1, readers add 1 back. Cannot store z = 0.
    V1,
    /// `gptq_v2` and EfficientQAT's own checkpoints: stores z.
    V2,
}

impl ZeroConvention {
    /// What the packer subtracts from z (and the unpacker adds back).
    pub fn offset(self) -> u32 {
        match self {
            ZeroConvention::V1 => 1,
            ZeroConvention::V2 => 0,
        }
    }
}

/// Errors unless `bits` is one of [`SUPPORTED_BITS`].
pub fn check_bits(bits: u32, what: &str) -> Result<()> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(Error::invalid(
            "pack",
            format!("{what}: {bits}-bit packing is not supported (2, 3, 4 or 8)"),
        ))
    }
}

impl PackLayout {
    /// Values per word in the EQAT layout; in the GPTQ layout the values per whole-word unit (32 at 3 bits).
    fn unit(self, bits: u32) -> usize {
        match (self, bits) {
            (PackLayout::Gptq, 3) => 32,
            _ => (32 / bits) as usize,
        }
    }

    /// How many words a stream of `n` values takes; errors when `bits` is unsupported or when this layout cannot
    /// hold `n` values (GPTQ: n not a multiple of 32/b, or of 32 at 3 bits).
    pub fn words_for(self, bits: u32, n: usize, what: &str) -> Result<usize> {
        check_bits(bits, what)?;
        let unit = self.unit(bits);
        match self {
            PackLayout::Gptq if !n.is_multiple_of(unit) => Err(Error::shape(
                "pack",
                format!(
                    "{what}: {n} values along the packed dim; GPTQ {bits}-bit packing needs a multiple of {unit}"
                ),
            )),
            PackLayout::Gptq => Ok(n / 32 * bits as usize + n % 32 * bits as usize / 32),
            PackLayout::EqatTenPerWord => Ok(n.div_ceil(unit)),
        }
    }
}

/// Packs the stream `get(0..n)` (each value < 2^bits, checked by the caller), calling `put(word_index, word)`
/// once per word in order.
fn pack_seq(
    bits: u32,
    layout: PackLayout,
    n: usize,
    get: impl Fn(usize) -> u32,
    mut put: impl FnMut(usize, u32),
) {
    match layout {
        PackLayout::Gptq => {
            // A bit accumulator: whole words leave it from the bottom as values enter at the top.
            let (mut acc, mut have, mut w) = (0u64, 0u32, 0usize);
            for i in 0..n {
                acc |= (get(i) as u64) << have;
                have += bits;
                if have >= 32 {
                    put(w, acc as u32);
                    (acc, have, w) = (acc >> 32, have - 32, w + 1);
                }
            }
            if have > 0 {
                put(w, acc as u32);
            }
        }
        PackLayout::EqatTenPerWord => {
            let per = layout.unit(bits);
            for (w, start) in (0..n).step_by(per).enumerate() {
                let word = (start..n.min(start + per))
                    .fold(0u32, |word, i| word | get(i) << (bits * (i - start) as u32));
                put(w, word);
            }
        }
    }
}

/// Unpacks a stream of `n` values from `word(0..)`, calling `put(i, value)` for i = 0..n in order.
fn unpack_seq(
    bits: u32,
    layout: PackLayout,
    n: usize,
    word: impl Fn(usize) -> u32,
    mut put: impl FnMut(usize, u32),
) {
    let mask = (1u32 << bits) - 1;
    match layout {
        PackLayout::Gptq => {
            let (mut acc, mut have, mut w) = (0u64, 0u32, 0usize);
            for i in 0..n {
                if have < bits {
                    acc |= (word(w) as u64) << have;
                    (have, w) = (have + 32, w + 1);
                }
                put(i, acc as u32 & mask);
                (acc, have) = (acc >> bits, have - bits);
            }
        }
        PackLayout::EqatTenPerWord => {
            let per = layout.unit(bits);
            for (w, start) in (0..n).step_by(per).enumerate() {
                let mut bitsv = word(w);
                for i in start..n.min(start + per) {
                    put(i, bitsv & mask);
                    bitsv >>= bits;
                }
            }
        }
    }
}

/// rows · cols, or an error naming the tensor when it overflows or does not match `len`.
fn checked_numel(rows: usize, cols: usize, len: usize, what: &str) -> Result<usize> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(n),
        _ => Err(Error::shape(
            "pack",
            format!("{what}: {len} values for shape [{rows}, {cols}]"),
        )),
    }
}

/// Errors naming the first value of `ints` [rows, cols] that does not fit in `bits`.
fn check_range(bits: u32, ints: &[u32], cols: usize, what: &str) -> Result<()> {
    let qmax = (1u32 << bits) - 1;
    match ints.iter().position(|&v| v > qmax) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            "pack",
            format!(
                "{what}: value {} at [{}, {}] does not fit in {bits} bits (max {qmax})",
                ints[i],
                i / cols.max(1),
                i % cols.max(1)
            ),
        )),
    }
}

/// Packs `ints` [rows, cols] along dim 0 (each column is a stream): returns words [words_for(rows), cols].
pub fn pack_rows(
    bits: u32,
    layout: PackLayout,
    ints: &[u32],
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<Vec<u32>> {
    let wrows = layout.words_for(bits, rows, what)?;
    checked_numel(rows, cols, ints.len(), what)?;
    check_range(bits, ints, cols, what)?;
    let mut out = vec![0u32; wrows * cols];
    for c in 0..cols {
        pack_seq(
            bits,
            layout,
            rows,
            |r| ints[r * cols + c],
            |w, v| out[w * cols + c] = v,
        );
    }
    Ok(out)
}

/// Inverse of [`pack_rows`]: `words` [words_for(rows), cols] -> ints [rows, cols].
pub fn unpack_rows(
    bits: u32,
    layout: PackLayout,
    words: &[u32],
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<Vec<u32>> {
    let wrows = layout.words_for(bits, rows, what)?;
    checked_numel(wrows, cols, words.len(), what)?;
    let mut out = vec![0u32; rows * cols];
    for c in 0..cols {
        unpack_seq(
            bits,
            layout,
            rows,
            |w| words[w * cols + c],
            |r, v| out[r * cols + c] = v,
        );
    }
    Ok(out)
}

/// Packs `ints` [rows, cols] along dim 1 (each row is a stream): returns words [rows, words_for(cols)].
pub fn pack_cols(
    bits: u32,
    layout: PackLayout,
    ints: &[u32],
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<Vec<u32>> {
    let wcols = layout.words_for(bits, cols, what)?;
    checked_numel(rows, cols, ints.len(), what)?;
    check_range(bits, ints, cols, what)?;
    let mut out = vec![0u32; rows * wcols];
    for (r, o) in out.chunks_exact_mut(wcols.max(1)).take(rows).enumerate() {
        pack_seq(bits, layout, cols, |c| ints[r * cols + c], |w, v| o[w] = v);
    }
    Ok(out)
}

/// Inverse of [`pack_cols`]: `words` [rows, words_for(cols)] -> ints [rows, cols].
pub fn unpack_cols(
    bits: u32,
    layout: PackLayout,
    words: &[u32],
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<Vec<u32>> {
    let wcols = layout.words_for(bits, cols, what)?;
    checked_numel(rows, wcols, words.len(), what)?;
    let mut out = vec![0u32; rows * cols];
    for (r, o) in out.chunks_exact_mut(cols.max(1)).take(rows).enumerate() {
        unpack_seq(
            bits,
            layout,
            cols,
            |w| words[r * wcols + w],
            |c, v| o[c] = v,
        );
    }
    Ok(out)
}

/// Unpacks one stream of `out.len()` values into f32 (the dequantization hot path). `words` must hold
/// `layout.words_for(bits, out.len())` words; errors otherwise.
pub fn unpack_stream_f32(
    bits: u32,
    layout: PackLayout,
    words: &[u32],
    out: &mut [f32],
) -> Result<()> {
    let need = layout.words_for(bits, out.len(), "stream")?;
    if words.len() < need {
        return Err(Error::shape(
            "unpack",
            format!(
                "{} values need {need} words, got {}",
                out.len(),
                words.len()
            ),
        ));
    }
    unpack_seq(
        bits,
        layout,
        out.len(),
        |w| words[w],
        |i, v| out[i] = v as f32,
    );
    Ok(())
}

/// Packs zero points `zeros` [groups, out] (each ≤ 2^bits − 1) along dim 1 with `conv`: V1 stores z − 1 and
/// refuses z = 0 (it would wrap to 2^bits − 1 and read back as 2^bits), naming the tensor and the position.
pub fn pack_qzeros(
    bits: u32,
    layout: PackLayout,
    conv: ZeroConvention,
    zeros: &[u32],
    groups: usize,
    out: usize,
    what: &str,
) -> Result<Vec<u32>> {
    check_bits(bits, what)?;
    checked_numel(groups, out, zeros.len(), what)?;
    // Before the offset: V1 must not turn an out-of-range z = 2^bits into a storable 2^bits − 1.
    check_range(bits, zeros, out, what)?;
    let off = conv.offset();
    if let Some(i) = zeros.iter().position(|&z| z < off) {
        return Err(Error::invalid(
            "pack",
            format!(
                "{what}: zero point 0 at [group {}, column {}] cannot be stored in the v1 (gptq) convention, \
                 which stores z - 1; export with gptq_v2",
                i / out,
                i % out
            ),
        ));
    }
    let stored: Vec<u32> = zeros.iter().map(|&z| z - off).collect();
    pack_cols(bits, layout, &stored, groups, out, what)
}

/// Inverse of [`pack_qzeros`]: the stored fields plus the convention's offset, so V1 can return up to 2^bits.
pub fn unpack_qzeros(
    bits: u32,
    layout: PackLayout,
    conv: ZeroConvention,
    words: &[u32],
    groups: usize,
    out: usize,
    what: &str,
) -> Result<Vec<u32>> {
    let mut z = unpack_cols(bits, layout, words, groups, out, what)?;
    z.iter_mut().for_each(|z| *z += conv.offset());
    Ok(z)
}

/// The constants that add 1 to every field of GPTQ-layout `qzeros` words, turning v1 into v2 (subtracting them
/// goes back), one per word column, cycling: 1 constant at 2/4/8 bits, 3 at 3 bits (word column % 3).
/// Derived by packing a stream of ones, so they follow [`PackLayout::Gptq`] exactly.
///
/// Two caveats at 3 bits (the tests pin both): (1) the add is exact only while no field carries across a word:
/// values 10 and 21 of each 32 straddle words, and a carry out of their low part is lost (e.g. v1 stores 3 in
/// value 10 for z = 4); re-packing with the other convention is always exact. (2) GPTQModel's
/// `convert_gptq_v1_to_v2_format_module` (as quoted in formats.md §5.4) gives word columns 0 and 2 each other's
/// constant (0x24924924 for column 0), which adds 4, not 1, to values 0..9.
pub fn v1_to_v2_offsets(bits: u32) -> Result<Vec<u32>> {
    check_bits(bits, "v1_to_v2_offsets")?;
    let mut words = Vec::new();
    pack_seq(bits, PackLayout::Gptq, 32, |_| 1, |_, w| words.push(w));
    words.truncate(if bits == 3 { 3 } else { 1 });
    Ok(words)
}
