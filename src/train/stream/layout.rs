//! Where a batch of the streamed activation store lies: the store is one logical byte array
//! [stream][sample][token][hidden] of f16 values (the `BlockInputStore` layout), whose first `ram_len` bytes are
//! pinned host memory and the rest a file (at file offset logical − `ram_len`). `ram_len` is a whole number of
//! samples, so a batch is at most one piece in RAM followed by one piece in the file.
use crate::error::{Error, Result};
use crate::train::store::Stream;

/// Bytes per stored value (f16).
pub const VALUE_BYTES: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLayout {
    pub samples: usize,
    pub seqlen: usize,
    pub hidden: usize,
    /// Logical bytes held in pinned RAM (a whole number of samples).
    pub ram_len: usize,
}

/// The two pieces of one contiguous range: `ram` = (offset in RAM, length) first, then `file` = (file offset,
/// length); `file_at` is where the file piece starts within the range (the RAM piece's length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pieces {
    pub ram: Option<(usize, usize)>,
    pub file: Option<(u64, usize)>,
    pub file_at: usize,
}

impl StoreLayout {
    /// Both streams of `samples` sequences in RAM up to `ram_budget` bytes (rounded down to whole samples).
    pub fn new(samples: usize, seqlen: usize, hidden: usize, ram_budget: u64) -> Result<Self> {
        let total = [2, samples, seqlen, hidden, VALUE_BYTES]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .ok_or_else(|| Error::invalid("StoreLayout", "size overflows usize"))?;
        let sample = (seqlen * hidden * VALUE_BYTES).max(1);
        let budget = usize::try_from(ram_budget).unwrap_or(usize::MAX);
        Ok(StoreLayout {
            samples,
            seqlen,
            hidden,
            ram_len: budget.min(total) / sample * sample,
        })
    }

    pub fn sample_bytes(&self) -> usize {
        self.seqlen * self.hidden * VALUE_BYTES
    }

    pub fn total_bytes(&self) -> usize {
        2 * self.samples * self.sample_bytes()
    }

    /// Bytes in the file.
    pub fn file_len(&self) -> usize {
        self.total_bytes() - self.ram_len
    }

    /// The pieces of samples `start..start + count` of `stream`.
    pub fn pieces(&self, stream: Stream, start: usize, count: usize) -> Result<Pieces> {
        if count == 0 || start + count > self.samples {
            return Err(Error::shape(
                "StoreLayout::pieces",
                format!("samples {start}..{} of {}", start + count, self.samples),
            ));
        }
        let off = (stream as usize * self.samples + start) * self.sample_bytes();
        let len = count * self.sample_bytes();
        let in_ram = self.ram_len.saturating_sub(off).min(len);
        Ok(Pieces {
            ram: (in_ram > 0).then_some((off, in_ram)),
            file: (in_ram < len).then(|| ((off + in_ram - self.ram_len) as u64, len - in_ram)),
            file_at: in_ram,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_the_ram_boundary_and_cover_the_range() {
        // 5 samples of 3 × 4 f16 (24 bytes each); 3.5 samples of budget keep 3 samples (72 bytes) in RAM.
        let l = StoreLayout::new(5, 3, 4, 84).unwrap();
        assert_eq!((l.sample_bytes(), l.ram_len, l.file_len()), (24, 72, 168));
        let p = l.pieces(Stream::Fp, 1, 2).unwrap();
        assert_eq!((p.ram, p.file, p.file_at), (Some((24, 48)), None, 48));
        let p = l.pieces(Stream::Fp, 2, 3).unwrap();
        assert_eq!(
            (p.ram, p.file, p.file_at),
            (Some((48, 24)), Some((0, 48)), 24)
        );
        // The quantized stream starts after the 5 FP samples: entirely in the file.
        let p = l.pieces(Stream::Quant, 0, 2).unwrap();
        assert_eq!((p.ram, p.file, p.file_at), (None, Some((48, 48)), 0));
        // Every byte of both streams lands exactly once, in order.
        let mut seen = vec![0u8; l.total_bytes()];
        for stream in [Stream::Fp, Stream::Quant] {
            for s in 0..5 {
                let p = l.pieces(stream, s, 1).unwrap();
                let logical = (stream as usize * 5 + s) * 24;
                if let Some((off, len)) = p.ram {
                    assert_eq!(off, logical);
                    seen[off..off + len].iter_mut().for_each(|b| *b += 1);
                }
                if let Some((off, len)) = p.file {
                    let at = l.ram_len + off as usize;
                    assert_eq!(at, logical + p.file_at);
                    seen[at..at + len].iter_mut().for_each(|b| *b += 1);
                }
            }
        }
        assert!(seen.iter().all(|&b| b == 1));
        // A budget above the size keeps everything in RAM; none keeps nothing.
        assert_eq!(StoreLayout::new(5, 3, 4, 1 << 20).unwrap().file_len(), 0);
        assert_eq!(StoreLayout::new(5, 3, 4, 0).unwrap().ram_len, 0);
        let e = l.pieces(Stream::Fp, 4, 2).unwrap_err().to_string();
        assert!(
            e.contains("StoreLayout::pieces") && e.contains("4..6 of 5"),
            "{e}"
        );
    }
}
