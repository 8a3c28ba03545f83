//! `BlockInputStore`: the per-sample hidden states that Block-AP feeds each block — the full-precision model's
//! activations (`Stream::Fp`, which produce the targets) and the already-quantized blocks' outputs
//! (`Stream::Quant`, the trained block's inputs) — for every calibration sample, in RAM, in a file on disk, or
//! in RAM up to a byte budget with the rest in a file (`Offload::Budget`, `engine train --host-mem`).
//!
//! Like the official `BlockTrainDataset`, values are kept in f16 by default (half the memory of f32; hidden
//! states of Llama models stay far below f16's 65504). The disk variant writes with positioned writes rather than
//! through a writable mmap, so a full disk is an `io::Error` naming the file instead of a SIGBUS; the whole file is
//! allocated (written) up front so that a run that cannot fit fails before training starts.
//!
//! Layout: one logical byte array [stream][sample][token][hidden]; its first `ram_len` bytes live in RAM and
//! the rest in the file (at file offset logical − `ram_len`). `ram_len` is a whole number of samples, and a
//! read or write that crosses it is split in two, so where the bytes live never changes what is read back.
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use half::f16;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDType {
    F16,
    F32,
}

impl StoreDType {
    fn size(self) -> usize {
        match self {
            StoreDType::F16 => 2,
            StoreDType::F32 => 4,
        }
    }
}

/// Which of the two activation streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Fp = 0,
    Quant = 1,
}

#[derive(Clone, Debug)]
pub enum Offload {
    Ram,
    /// A file created (or truncated) at this path.
    Disk(PathBuf),
    /// In RAM up to `ram_bytes` (rounded down to whole samples), the rest in a file at `path`.
    Budget {
        ram_bytes: u64,
        path: PathBuf,
    },
}

pub struct BlockInputStore {
    samples: usize,
    seqlen: usize,
    hidden: usize,
    dtype: StoreDType,
    /// The first `ram.len()` logical bytes.
    ram: Vec<u8>,
    /// The rest, when any.
    disk: Option<(File, PathBuf)>,
}

impl BlockInputStore {
    /// Bytes needed for both streams of `samples` sequences of `seqlen` × `hidden` values.
    pub fn bytes_needed(
        samples: usize,
        seqlen: usize,
        hidden: usize,
        dtype: StoreDType,
    ) -> Result<u64> {
        [samples, seqlen, hidden, dtype.size(), 2]
            .iter()
            .try_fold(1u64, |acc, &x| acc.checked_mul(x as u64))
            .ok_or_else(|| Error::invalid("BlockInputStore", "size overflows u64"))
    }

    pub fn new(
        samples: usize,
        seqlen: usize,
        hidden: usize,
        dtype: StoreDType,
        offload: Offload,
    ) -> Result<Self> {
        let bytes = Self::bytes_needed(samples, seqlen, hidden, dtype)?;
        let sample_bytes = (seqlen * hidden * dtype.size()).max(1) as u64;
        let (ram_len, path) = match offload {
            Offload::Ram => (bytes, None),
            Offload::Disk(path) => (0, Some(path)),
            Offload::Budget { ram_bytes, path } => {
                let whole_samples = ram_bytes.min(bytes) / sample_bytes * sample_bytes;
                (whole_samples, (whole_samples < bytes).then_some(path))
            }
        };
        let n = usize::try_from(ram_len)
            .map_err(|_| Error::invalid("BlockInputStore", "too large for RAM"))?;
        let mut ram = Vec::new();
        ram.try_reserve_exact(n).map_err(|_| {
            Error::invalid(
                "BlockInputStore",
                format!(
                    "cannot allocate {} of host memory for block inputs; use --offload disk or a smaller \
                     --host-mem",
                    gib(ram_len)
                ),
            )
        })?;
        ram.resize(n, 0);
        let disk = match path {
            Some(path) => Some((allocate_file(&path, bytes - ram_len)?, path)),
            None => None,
        };
        Ok(BlockInputStore {
            samples,
            seqlen,
            hidden,
            dtype,
            ram,
            disk,
        })
    }

    /// Bytes kept in RAM and in the file.
    pub fn placement(&self) -> (u64, u64) {
        let total = 2 * (self.samples * self.sample_bytes()) as u64;
        (self.ram.len() as u64, total - self.ram.len() as u64)
    }

    /// The file holding what does not fit in RAM: its path and the byte range of `logical..logical + len`
    /// that lies in it (as a file offset and the index where that part starts within the range).
    fn spilled(&self, logical: usize, len: usize) -> Option<(&File, &Path, u64, usize)> {
        let ram_len = self.ram.len();
        let (file, path) = self.disk.as_ref()?;
        let start = logical.max(ram_len);
        (start < logical + len).then(|| {
            (
                file,
                path.as_path(),
                (start - ram_len) as u64,
                start - logical,
            )
        })
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    fn sample_bytes(&self) -> usize {
        self.seqlen * self.hidden * self.dtype.size()
    }

    fn offset(&self, stream: Stream, sample: usize) -> u64 {
        ((stream as usize * self.samples + sample) * self.sample_bytes()) as u64
    }

    fn check(&self, op: &'static str, start: usize, count: usize, len: usize) -> Result<()> {
        if start + count > self.samples || len != count * self.seqlen * self.hidden {
            return Err(Error::shape(
                op,
                format!(
                    "samples {start}..{} of {} with {len} values (each sample is {} × {})",
                    start + count,
                    self.samples,
                    self.seqlen,
                    self.hidden
                ),
            ));
        }
        Ok(())
    }

    /// Stores `count` samples starting at `start` from `values` ([count, seqlen, hidden] flattened).
    pub fn write(&mut self, stream: Stream, start: usize, values: &[f32]) -> Result<()> {
        let count = values.len() / (self.seqlen * self.hidden).max(1);
        self.check("BlockInputStore::write", start, count, values.len())?;
        let bytes: Vec<u8> = match self.dtype {
            StoreDType::F16 => values
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            StoreDType::F32 => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        };
        let off = self.offset(stream, start) as usize;
        let ram_len = self.ram.len();
        let in_ram = ram_len.saturating_sub(off).min(bytes.len());
        self.ram[off.min(ram_len)..][..in_ram].copy_from_slice(&bytes[..in_ram]);
        if let Some((file, path, file_off, from)) = self.spilled(off, bytes.len()) {
            file.write_all_at(&bytes[from..], file_off)
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }

    /// Reads `count` samples from `start` as a [count, seqlen, hidden] tensor.
    pub fn read(&self, stream: Stream, start: usize, count: usize) -> Result<Tensor> {
        let n = count * self.seqlen * self.hidden;
        self.check("BlockInputStore::read", start, count, n)?;
        let off = self.offset(stream, start) as usize;
        let len = n * self.dtype.size();
        let mut buf;
        let bytes: &[u8] = match self.spilled(off, len) {
            None => &self.ram[off..off + len],
            Some((file, path, file_off, from)) => {
                buf = vec![0u8; len];
                buf[..from].copy_from_slice(&self.ram[off.min(self.ram.len())..][..from]);
                file.read_exact_at(&mut buf[from..], file_off)
                    .map_err(|e| Error::io(path, e))?;
                &buf
            }
        };
        let values: Vec<f32> = match self.dtype {
            StoreDType::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StoreDType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        Tensor::from_vec(&[count, self.seqlen, self.hidden], values)
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Creates the offload file and writes all of it, so that a disk too small fails here with a clear error.
pub(crate) fn allocate_file(path: &Path, bytes: u64) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let chunk = vec![0u8; 1 << 24];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], done).map_err(|e| {
            Error::io(
                path,
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "allocating {} for block inputs failed after {}: {e}",
                        gib(bytes),
                        gib(done)
                    ),
                ),
            )
        })?;
        done += n as u64;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;

    #[test]
    fn ram_and_disk_stores_hold_the_same_values() {
        let mut rng = Rng::new(4);
        let (n, t, c) = (5, 3, 7);
        let dir = std::env::temp_dir().join(format!("eqat-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [StoreDType::F16, StoreDType::F32] {
            let mut ram = BlockInputStore::new(n, t, c, dtype, Offload::Ram).unwrap();
            let mut disk =
                BlockInputStore::new(n, t, c, dtype, Offload::Disk(dir.join("inputs.bin")))
                    .unwrap();
            // 3.5 samples of budget: Fp samples 0..3 in RAM, Fp 3..5 and the Quant stream in the file.
            let sample = (t * c * dtype.size()) as u64;
            let split_budget = Offload::Budget {
                ram_bytes: 3 * sample + sample / 2,
                path: dir.join("split.bin"),
            };
            let mut split = BlockInputStore::new(n, t, c, dtype, split_budget).unwrap();
            assert_eq!(split.placement(), (3 * sample, 7 * sample));
            assert_eq!(disk.placement(), (0, 10 * sample));
            let fp = rng.normal_vec(n * t * c, 3.0);
            let q = rng.normal_vec(2 * t * c, 3.0);
            for s in [&mut ram, &mut disk, &mut split] {
                s.write(Stream::Fp, 0, &fp).unwrap();
                s.write(Stream::Quant, 3, &q).unwrap();
            }
            // Reads that cross the RAM/file boundary come back as from RAM alone.
            for (stream, start, count) in [
                (Stream::Fp, 2, 3),
                (Stream::Fp, 0, 5),
                (Stream::Quant, 0, 5),
            ] {
                assert_eq!(
                    split.read(stream, start, count).unwrap().f32s("t").unwrap(),
                    ram.read(stream, start, count).unwrap().f32s("t").unwrap(),
                    "{dtype:?} {stream:?} {start}+{count}"
                );
            }
            // A budget above the size keeps everything in RAM and creates no file.
            let roomy = Offload::Budget {
                ram_bytes: 100 * sample,
                path: dir.join("unused.bin"),
            };
            let all_ram = BlockInputStore::new(n, t, c, dtype, roomy).unwrap();
            assert_eq!(all_ram.placement(), (10 * sample, 0));
            assert!(!dir.join("unused.bin").exists());
            for s in [&ram, &disk, &split] {
                let got = s.read(Stream::Fp, 1, 2).unwrap();
                let want = &fp[t * c..3 * t * c];
                // f16 keeps 11 significant bits: relative error at most 2^-11.
                let tol = if dtype == StoreDType::F16 {
                    1.0 / 2048.0
                } else {
                    0.0
                };
                for (g, w) in got.f32s("t").unwrap().iter().zip(want) {
                    assert!((g - w).abs() <= tol * w.abs(), "{dtype:?}: {g} vs {w}");
                }
                let got_q = s.read(Stream::Quant, 4, 1).unwrap();
                assert_eq!(got_q.shape(), &[1, t, c]);
                assert_eq!(
                    s.read(Stream::Quant, 0, 1).unwrap().f32s("t").unwrap(),
                    &vec![0.0; t * c][..]
                );
            }
            assert_eq!(
                ram.read(Stream::Quant, 3, 2).unwrap().f32s("t").unwrap(),
                disk.read(Stream::Quant, 3, 2).unwrap().f32s("t").unwrap()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn out_of_range_samples_and_full_disks_are_clear_errors() {
        let mut s = BlockInputStore::new(2, 2, 2, StoreDType::F32, Offload::Ram).unwrap();
        let e = s.write(Stream::Fp, 1, &[0.0; 8]).unwrap_err().to_string();
        assert!(
            e.contains("BlockInputStore::write") && e.contains("1..3 of 2"),
            "{e}"
        );
        assert!(s.read(Stream::Fp, 2, 1).is_err());
        // /dev/full answers every write with ENOSPC: the store must refuse at creation, naming the file.
        if Path::new("/dev/full").exists() {
            let e =
                BlockInputStore::new(4, 8, 8, StoreDType::F16, Offload::Disk("/dev/full".into()))
                    .err()
                    .expect("allocation on /dev/full must fail")
                    .to_string();
            assert!(e.contains("/dev/full") && e.contains("allocating"), "{e}");
        } else {
            println!("skipped: /dev/full not present");
        }
        let e = BlockInputStore::new(1 << 40, 1 << 20, 1 << 20, StoreDType::F16, Offload::Ram)
            .err()
            .unwrap();
        assert!(e.to_string().contains("overflow"), "{e}");
    }
}
