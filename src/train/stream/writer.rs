//! `BatchWriter`: a block's outputs from the GPU back into a `PinnedStore`, double buffered.
//!
//! Writing batch n: the compute stream converts the f32 output to f16 in device slot n%2 (after that slot's
//! previous copy out has finished); the copy stream then copies it to the host, straight into the pinned part of
//! the store, or into a pinned host slot for the part that lies in the file. The file write of batch n happens
//! on the next call (or in `finish`), when its copy has long finished, so it overlaps the next batch's compute.
use super::layout::StoreLayout;
use super::store::PinnedStore;
use crate::error::{Error, Result};
use crate::gpu::{CopyStream, GpuBuf, GpuContext, GpuEvent, PinnedBuf};
use crate::tensor::Tensor;
use crate::train::store::Stream;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

pub struct BatchWriter {
    ctx: Arc<GpuContext>,
    copy: Arc<CopyStream>,
    layout: StoreLayout,
    dev: [GpuBuf; 2],
    host: [Option<PinnedBuf>; 2],
    /// The copy out of each device slot.
    copied: [Option<GpuEvent>; 2],
    /// File writes of each host slot once its copy is done: (file offset, slot offset, length).
    pending: [Vec<(u64, usize, usize)>; 2],
    n: usize,
}

impl BatchWriter {
    /// A writer of batches of up to `max_count` samples into `store`, copying on `copy`.
    pub fn new(
        ctx: &Arc<GpuContext>,
        copy: &Arc<CopyStream>,
        store: &PinnedStore,
        max_count: usize,
    ) -> Result<Self> {
        let layout = *store.layout();
        let slot_bytes = max_count * layout.sample_bytes();
        let host = match store.file {
            Some(_) => [
                Some(ctx.alloc_pinned(slot_bytes)?),
                Some(ctx.alloc_pinned(slot_bytes)?),
            ],
            None => [None, None],
        };
        Ok(BatchWriter {
            ctx: ctx.clone(),
            copy: copy.clone(),
            layout,
            dev: [ctx.alloc(slot_bytes / 4)?, ctx.alloc(slot_bytes / 4)?],
            host,
            copied: [None, None],
            pending: [Vec::new(), Vec::new()],
            n: 0,
        })
    }

    /// Queues `t` ([count, seqlen, hidden] on the device) as samples `start..start + count` of `stream`.
    pub fn write(
        &mut self,
        store: &mut PinnedStore,
        stream: Stream,
        start: usize,
        t: &Tensor,
    ) -> Result<()> {
        let (seqlen, hidden) = (self.layout.seqlen, self.layout.hidden);
        let count = t.shape().first().copied().unwrap_or(0);
        if t.shape() != [count, seqlen, hidden]
            || count * self.layout.sample_bytes() > 4 * self.dev[0].len()
        {
            return Err(Error::shape(
                "BatchWriter::write",
                format!(
                    "output {:?} for samples of {seqlen} × {hidden}, slots of {} bytes",
                    t.shape(),
                    4 * self.dev[0].len()
                ),
            ));
        }
        let p = self.layout.pieces(stream, start, count)?;
        let s = self.n % 2;
        self.flush(store, s)?;
        if let Some(e) = &self.copied[s] {
            self.ctx.wait(e)?;
        }
        super::f32_to_f16(t, &mut self.dev[s], 0)?;
        self.copy.wait(&self.ctx.record()?)?;
        if let Some((off, len)) = p.ram {
            self.copy.dtoh(&self.dev[s], 0, &mut store.ram, off, len)?;
        }
        if let Some((off, len)) = p.file {
            let slot = self.host[s]
                .as_mut()
                .expect("a file piece implies host slots");
            self.copy
                .dtoh(&self.dev[s], p.file_at, slot, p.file_at, len)?;
            self.pending[s].push((off, p.file_at, len));
        }
        self.copied[s] = Some(self.copy.record()?);
        self.n += 1;
        // The previous batch's copy was queued one call ago: write its file part while this batch computes.
        self.flush(store, 1 - s)
    }

    /// Writes slot `s`'s file part once its copy has finished.
    fn flush(&mut self, store: &PinnedStore, s: usize) -> Result<()> {
        if self.pending[s].is_empty() {
            return Ok(());
        }
        let (file, path) = store.file()?;
        let bytes = self.host[s]
            .as_mut()
            .expect("pending implies a slot")
            .as_slice()?;
        for (off, at, len) in self.pending[s].drain(..) {
            file.write_all_at(&bytes[at..at + len], off)
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }

    /// Finishes every queued write (the pinned part is complete once the copy stream has run; host reads of
    /// the store wait for it).
    pub fn finish(&mut self, store: &mut PinnedStore) -> Result<()> {
        self.flush(store, 0)?;
        self.flush(store, 1)
    }
}

impl Drop for BatchWriter {
    fn drop(&mut self) {
        // The device slots go back to the compute stream's allocator: the copies out of them must be done.
        let _ = self.copy.synchronize();
    }
}
