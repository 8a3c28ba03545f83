//! `PinnedStreams`: the Block-AP pipeline's two activation streams of one sample set in a `PinnedStore` (pinned
//! RAM up to the `--host-mem` budget, the rest in a spill file), for a run on a GPU whose memory cannot hold
//! them (`StreamsAt::Pinned`). Propagation goes through a `BatchLoader` and a `BatchWriter` (the copy of batch
//! i+1 in and of batch i−1 out overlap batch i's forward), training through `StreamedSamples` (each step's
//! batch copied during the previous step); validation reads the store on the host.
//!
//! Every value crosses as the f16 the host and device stores hold, converted by the device store's kernels
//! (`cuda/store.cu`): the embeddings go in through the same `store_write_f16` as `DeviceStore::write`, so a run
//! from here reads the same batches as one with its streams on the GPU and ends with the same blocks.
use super::{BatchLoader, BatchWriter, PinnedStore, StreamedSamples};
use crate::autograd::Tape;
use crate::error::Result;
use crate::gpu::{CopyStream, GpuContext};
use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use crate::tensor::Tensor;
use crate::train::block_ap::{train_block, BlockApOptions, BlockSamples, StepInfo, TrainedBlock};
use crate::train::device::Device;
use crate::train::pipeline::BlockSource;
use crate::train::store::{Offload, Stream};
use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

pub struct PinnedStreams {
    ctx: Arc<GpuContext>,
    copy: Arc<CopyStream>,
    /// Borrowed mutably by each propagation and training pass, and by each validation read (`pair`).
    store: RefCell<PinnedStore>,
}

impl PinnedStreams {
    /// Both streams of `windows` (each `seqlen` tokens) set to their embeddings, pinned as `offload` says
    /// (`Ram`: all of it; `Budget`: `ram_bytes`, the rest in its file; `Disk`: all in its file), embedded and
    /// stored `batch` windows at a time.
    pub fn new(
        ctx: &Arc<GpuContext>,
        src: &dyn BlockSource,
        windows: &[Vec<u32>],
        seqlen: usize,
        offload: &Offload,
        batch: usize,
    ) -> Result<Self> {
        let (ram_budget, spill) = match offload {
            Offload::Ram => (u64::MAX, Path::new("")),
            Offload::Budget { ram_bytes, path } => (*ram_bytes, path.as_path()),
            Offload::Disk(path) => (0, path.as_path()),
        };
        let hidden = src.config().hidden;
        let mut store = PinnedStore::new(ctx, windows.len(), seqlen, hidden, ram_budget, spill)?;
        let copy = Arc::new(ctx.copy_stream()?);
        let batch = batch.max(1);
        let mut writer = BatchWriter::new(ctx, &copy, &store, batch)?;
        for (i, chunk) in windows.chunks(batch).enumerate() {
            let x = src
                .embed(&chunk.concat(), chunk.len(), seqlen)?
                .to_device(ctx)?;
            writer.write(&mut store, Stream::Fp, i * batch, &x)?;
            writer.write(&mut store, Stream::Quant, i * batch, &x)?;
        }
        writer.finish(&mut store)?;
        drop(writer);
        Ok(PinnedStreams {
            ctx: ctx.clone(),
            copy,
            store: RefCell::new(store),
        })
    }

    /// Runs one (unquantized) block over every sample of `stream`, in place, `batch` samples at a time.
    pub fn propagate(
        &mut self,
        stream: Stream,
        cfg: &LlamaConfig,
        w: &BlockWeights,
        batch: usize,
    ) -> Result<()> {
        let store = self.store.get_mut();
        let n = store.layout().samples;
        let batch = batch.max(1);
        let batches: Vec<(usize, usize)> = (0..n)
            .step_by(batch)
            .map(|s| (s, batch.min(n - s)))
            .collect();
        let mut tape = Tape::new();
        let device = Device::Cuda(self.ctx.clone());
        let vars = BlockVars::register(&mut tape, &device.copy_block(w)?, None)?;
        let mut loader =
            BatchLoader::new(&self.ctx, &self.copy, store, &[stream], batches.clone())?;
        let mut writer = BatchWriter::new(&self.ctx, &self.copy, store, batch)?;
        for &(start, _) in &batches {
            let x = loader.next(store)?.and_then(|mut v| v.pop());
            let x = x.expect("the loader yields one tensor per batch it was given");
            tape.reset();
            tape.no_grad(|tape| -> Result<()> {
                let x = tape.input(x);
                let y = block_forward(tape, cfg, &vars, x)?;
                writer.write(store, stream, start, tape.value(y))
            })?;
        }
        writer.finish(store)
    }

    /// [`train_block`] on these streams (inputs: the quantized stream, targets: the FP stream), each step's
    /// batch copied while the step before it computes.
    pub fn train_block(
        &self,
        cfg: &LlamaConfig,
        w: &BlockWeights,
        val: Option<&dyn BlockSamples>,
        opts: &BlockApOptions,
        on_step: impl FnMut(StepInfo),
    ) -> Result<TrainedBlock> {
        let mut store = self.store.borrow_mut();
        let train = StreamedSamples::new(
            &self.ctx,
            &self.copy,
            &mut store,
            opts.batch_size,
            opts.epochs,
        )?;
        train_block(cfg, w, &train, val, opts, on_step)
    }
}

/// Validation pairs, read on the host (`train_step` uploads them).
impl BlockSamples for PinnedStreams {
    fn len(&self) -> usize {
        self.store.borrow().layout().samples
    }

    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        self.store.borrow_mut().host_pair(start, count)
    }
}
