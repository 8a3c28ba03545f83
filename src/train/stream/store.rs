//! `PinnedStore`: the FP and quantized block inputs of every calibration sample, f16, in page-locked host memory
//! up to a byte budget (`--host-mem`) and the rest in a file ([`StoreLayout`]). Batches go to the GPU with
//! asynchronous copies straight from the pinned part, or through a pinned staging slot for the file part
//! (`loader.rs`); outputs come back the same way (`writer.rs`).
//!
//! The file is read and written with positioned I/O (`pread`/`pwrite`), never mapped: mapped pages would count
//! towards the process's resident memory and the budget would not hold; the page cache does not count.
use super::layout::{StoreLayout, VALUE_BYTES};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PinnedBuf};
use crate::tensor::Tensor;
use crate::train::store::{allocate_file, Stream};
use half::f16;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct PinnedStore {
    layout: StoreLayout,
    pub(super) ram: PinnedBuf,
    pub(super) file: Option<(Arc<File>, PathBuf)>,
}

impl PinnedStore {
    /// A zeroed store of `samples` sequences of `seqlen` × `hidden`, pinned up to `ram_budget` bytes, the rest
    /// in a file created at `spill` (written in full now, so that a disk too small fails before training).
    pub fn new(
        ctx: &Arc<GpuContext>,
        samples: usize,
        seqlen: usize,
        hidden: usize,
        ram_budget: u64,
        spill: &Path,
    ) -> Result<Self> {
        let layout = StoreLayout::new(samples, seqlen, hidden, ram_budget)?;
        let ram = ctx.alloc_pinned(layout.ram_len)?;
        let file = match layout.file_len() {
            0 => None,
            n => Some((
                Arc::new(allocate_file(spill, n as u64)?),
                spill.to_path_buf(),
            )),
        };
        Ok(PinnedStore { layout, ram, file })
    }

    pub fn layout(&self) -> &StoreLayout {
        &self.layout
    }

    /// Bytes in pinned RAM and in the file.
    pub fn placement(&self) -> (u64, u64) {
        (self.layout.ram_len as u64, self.layout.file_len() as u64)
    }

    pub(super) fn file(&self) -> Result<(&Arc<File>, &Path)> {
        self.file
            .as_ref()
            .map(|(f, p)| (f, p.as_path()))
            .ok_or_else(|| Error::invalid("PinnedStore", "a file piece without a spill file"))
    }

    /// Stores `values` ([count, seqlen, hidden] flattened) as f16 from the host, at samples `start..`.
    pub fn write_host(&mut self, stream: Stream, start: usize, values: &[f32]) -> Result<()> {
        let count = values.len() / (self.layout.seqlen * self.layout.hidden).max(1);
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        if count * self.layout.sample_bytes() != bytes.len() {
            return Err(Error::shape(
                "PinnedStore::write_host",
                format!("{} values are not whole samples", values.len()),
            ));
        }
        let p = self.layout.pieces(stream, start, count)?;
        if let Some((off, len)) = p.ram {
            self.ram.as_mut_slice()?[off..off + len].copy_from_slice(&bytes[..len]);
        }
        if let Some((off, len)) = p.file {
            let (file, path) = self.file()?;
            file.write_all_at(&bytes[p.file_at..p.file_at + len], off)
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }

    /// A (quantized input, FP target) pair of samples `start..start + count` as host tensors [count, T, C]: what
    /// `BlockSamples::pair` gives for validation (`train_step` uploads them).
    pub fn host_pair(&mut self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        let shape = [count, self.layout.seqlen, self.layout.hidden];
        Ok((
            Tensor::from_vec(&shape, self.read_host(Stream::Quant, start, count)?)?,
            Tensor::from_vec(&shape, self.read_host(Stream::Fp, start, count)?)?,
        ))
    }

    /// Samples `start..start + count` of `stream` as f32 on the host (waits for copies in flight).
    pub fn read_host(&mut self, stream: Stream, start: usize, count: usize) -> Result<Vec<f32>> {
        let p = self.layout.pieces(stream, start, count)?;
        let mut bytes = vec![0u8; count * self.layout.sample_bytes()];
        if let Some((off, len)) = p.ram {
            bytes[..len].copy_from_slice(&self.ram.as_slice()?[off..off + len]);
        }
        if let Some((off, len)) = p.file {
            let (file, path) = self.file()?;
            file.read_exact_at(&mut bytes[p.file_at..p.file_at + len], off)
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(bytes
            .chunks_exact(VALUE_BYTES)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    }
}
