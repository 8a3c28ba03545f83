//! `BatchLoader`: a fixed sequence of batches from a `PinnedStore` onto the GPU, double buffered.
//!
//! Two device slots hold the f16 bytes of one batch each (every requested stream of it, one after the other).
//! Taking batch j (`next`): the compute stream waits for slot j%2's copy, converts it to f32 tensors, and
//! records that the slot is free; then the copy of batch j+1 into the other slot is queued on the copy stream
//! (after that slot's previous conversion), so it runs while batch j computes. Bytes in pinned RAM are copied
//! directly; bytes in the file are first read by a worker thread into a pinned host slot (two of them): the read
//! of batch j+2 starts once batch j's copy has left that host slot, i.e. during batch j's compute.
use super::layout::StoreLayout;
use super::store::PinnedStore;
use crate::error::{Error, Result};
use crate::gpu::{CopyStream, GpuBuf, GpuContext, GpuEvent, PinnedBuf};
use crate::tensor::Tensor;
use crate::train::store::Stream;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One host->device copy of a batch: its events on the copy stream and its bytes.
pub struct CopyTiming {
    pub start: GpuEvent,
    pub end: GpuEvent,
    pub bytes: usize,
}

/// File reads of one batch into a pinned host slot: (file offset, slot offset, length).
struct Job {
    batch: usize,
    slot: PinnedBuf,
    reads: Vec<(u64, usize, usize)>,
}

struct Worker {
    jobs: Option<Sender<Job>>,
    done: Receiver<Result<(usize, PinnedBuf)>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(file: Arc<File>, path: PathBuf) -> Worker {
        let (jobs, rx) = channel::<Job>();
        let (tx, done) = channel();
        let handle = std::thread::spawn(move || {
            for mut job in rx {
                let r = (|| -> Result<(usize, PinnedBuf)> {
                    // Waits for the slot's previous copy to the device before overwriting it.
                    let dst = job.slot.as_mut_slice()?;
                    for &(off, at, len) in &job.reads {
                        file.read_exact_at(&mut dst[at..at + len], off)
                            .map_err(|e| Error::io(&path, e))?;
                    }
                    Ok((job.batch, job.slot))
                })();
                if tx.send(r).is_err() {
                    return;
                }
            }
        });
        Worker {
            jobs: Some(jobs),
            done,
            handle: Some(handle),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take(); // ends the worker's loop
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub struct BatchLoader {
    ctx: Arc<GpuContext>,
    copy: Arc<CopyStream>,
    layout: StoreLayout,
    streams: Vec<Stream>,
    /// (first sample, count) of each batch, in the order they are taken.
    batches: Vec<(usize, usize)>,
    dev: [GpuBuf; 2],
    host: [Option<PinnedBuf>; 2],
    /// The copy into each device slot, as an index into `timings`.
    copied: [Option<usize>; 2],
    consumed: [Option<GpuEvent>; 2],
    worker: Option<Worker>,
    issued: usize,
    taken: usize,
    timings: Vec<CopyTiming>,
}

impl BatchLoader {
    /// A loader of `batches` ((first sample, count) each) of `streams` from `store`, copying on `copy`.
    pub fn new(
        ctx: &Arc<GpuContext>,
        copy: &Arc<CopyStream>,
        store: &PinnedStore,
        streams: &[Stream],
        batches: Vec<(usize, usize)>,
    ) -> Result<Self> {
        let layout = *store.layout();
        let max_count = batches.iter().map(|b| b.1).max().unwrap_or(0);
        let slot_bytes = streams.len() * max_count * layout.sample_bytes();
        let dev = [ctx.alloc(slot_bytes / 4)?, ctx.alloc(slot_bytes / 4)?];
        // The slots come from the compute stream's allocator: copies into them wait for its earlier uses.
        copy.wait(&ctx.record()?)?;
        let (host, worker) = match &store.file {
            Some((file, path)) => (
                [
                    Some(ctx.alloc_pinned(slot_bytes)?),
                    Some(ctx.alloc_pinned(slot_bytes)?),
                ],
                Some(Worker::spawn(file.clone(), path.clone())),
            ),
            None => ([None, None], None),
        };
        let mut l = BatchLoader {
            ctx: ctx.clone(),
            copy: copy.clone(),
            layout,
            streams: streams.to_vec(),
            batches,
            dev,
            host,
            copied: [None, None],
            consumed: [None, None],
            worker,
            issued: 0,
            taken: 0,
            timings: Vec::new(),
        };
        for j in 0..l.batches.len().min(2) {
            l.submit(j)?;
        }
        Ok(l)
    }

    /// Bytes of one stream of `count` samples.
    fn stream_bytes(&self, count: usize) -> usize {
        count * self.layout.sample_bytes()
    }

    /// The file reads of batch `j` into its slot, if any of it lies in the file.
    fn file_reads(&self, j: usize) -> Result<Vec<(u64, usize, usize)>> {
        let (start, count) = self.batches[j];
        let mut reads = Vec::new();
        for (k, &s) in self.streams.iter().enumerate() {
            let p = self.layout.pieces(s, start, count)?;
            if let Some((off, len)) = p.file {
                reads.push((off, k * self.stream_bytes(count) + p.file_at, len));
            }
        }
        Ok(reads)
    }

    /// Hands batch `j`'s file reads to the worker (its host slot is back from batch j−2's copy).
    fn submit(&mut self, j: usize) -> Result<()> {
        let reads = self.file_reads(j)?;
        if reads.is_empty() {
            return Ok(());
        }
        let slot = self.host[j % 2]
            .take()
            .ok_or_else(|| Error::invalid("BatchLoader", "host slot still with the worker"))?;
        let w = self.worker.as_ref().expect("a file piece implies a worker");
        w.jobs
            .as_ref()
            .expect("jobs open while the loader lives")
            .send(Job {
                batch: j,
                slot,
                reads,
            })
            .map_err(|_| Error::invalid("BatchLoader", "the file reader thread stopped"))
    }

    /// Queues the copy of batch `j` into device slot j%2.
    fn issue(&mut self, store: &mut PinnedStore, j: usize) -> Result<()> {
        let s = j % 2;
        let (start, count) = self.batches[j];
        if !self.file_reads(j)?.is_empty() {
            let w = self.worker.as_ref().expect("a file piece implies a worker");
            let (batch, slot) = w
                .done
                .recv()
                .map_err(|_| Error::invalid("BatchLoader", "the file reader thread stopped"))??;
            debug_assert_eq!(batch, j, "the worker answers in order");
            self.host[s] = Some(slot);
        }
        if let Some(e) = &self.consumed[s] {
            self.copy.wait(e)?;
        }
        let start_ev = self.copy.record()?;
        let mut bytes = 0;
        for (k, &st) in self.streams.iter().enumerate() {
            let p = self.layout.pieces(st, start, count)?;
            let at = k * self.stream_bytes(count);
            if let Some((off, len)) = p.ram {
                self.copy
                    .htod(&mut store.ram, off, &mut self.dev[s], at, len)?;
                bytes += len;
            }
            if let Some((_, len)) = p.file {
                let slot = self.host[s].as_mut().expect("filled by the worker");
                let o = at + p.file_at;
                self.copy.htod(slot, o, &mut self.dev[s], o, len)?;
                bytes += len;
            }
        }
        self.copied[s] = Some(self.timings.len());
        self.timings.push(CopyTiming {
            start: start_ev,
            end: self.copy.record()?,
            bytes,
        });
        self.issued = j + 1;
        Ok(())
    }

    /// The next batch as f32 device tensors [count, seqlen, hidden], one per requested stream; None after the
    /// last. The copy of the batch after it is queued before this returns.
    pub fn next(&mut self, store: &mut PinnedStore) -> Result<Option<Vec<Tensor>>> {
        let j = self.taken;
        if j >= self.batches.len() {
            return Ok(None);
        }
        if self.issued <= j {
            self.issue(store, j)?;
        }
        let s = j % 2;
        let (_, count) = self.batches[j];
        let copy = self.copied[s].expect("issued above");
        self.ctx.wait(&self.timings[copy].end)?;
        let shape = [count, self.layout.seqlen, self.layout.hidden];
        let mut out = Vec::with_capacity(self.streams.len());
        for k in 0..self.streams.len() {
            out.push(super::f16_to_f32(
                &self.ctx,
                &self.dev[s],
                k * self.stream_bytes(count),
                &shape,
            )?);
        }
        self.consumed[s] = Some(self.ctx.record()?);
        self.taken = j + 1;
        if j + 1 < self.batches.len() {
            self.issue(store, j + 1)?;
        }
        if j + 2 < self.batches.len() {
            self.submit(j + 2)?;
        }
        Ok(Some(out))
    }

    /// The copies queued so far (their events complete once the copies have run).
    pub fn timings(&self) -> &[CopyTiming] {
        &self.timings
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // The device slots go back to the compute stream's allocator: their copies must be done.
        let _ = self.copy.synchronize();
    }
}
