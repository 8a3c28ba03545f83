//! Block-AP over a whole model: walk the blocks in order, train each on the quantized predecessors' outputs
//! against the full-precision block's outputs, freeze it, and push both activation streams one block further.
//!
//! Per block i (streams live in a `BlockInputStore`, GPU memory or a streamed pinned store — [`StreamsAt`] —
//! updated in place sample batch by sample batch):
//!   1. Fp stream  <- FP block i (Fp stream)          — the targets, and the next block's FP inputs
//!   2. train block i on (Quant stream -> Fp stream)   — `train_block`
//!   3. Quant stream <- frozen quantized block i (Quant stream)
//!   4. hand the frozen block to the sink (the checkpoint writer), which makes it durable
//!
//! Resuming at block k replays steps 1 and 3 for blocks < k from the sink's saved blocks, which reproduces the
//! streams exactly (same ops, same order), so a resumed run ends byte-identical to an uninterrupted one.
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use crate::model::quantized::QuantizedBlock;
use crate::quant::fake_quant::QuantConfig;
use crate::tensor::Tensor;
use crate::train::block_ap::{train_block, BlockApOptions, BlockSamples, StepInfo, TrainedBlock};
use crate::train::device::Device;
use crate::train::store::{BlockInputStore, Offload, StoreDType, Stream};

/// A model whose weights are read one block at a time.
pub trait BlockSource {
    fn config(&self) -> &LlamaConfig;
    fn block(&self, i: usize) -> Result<BlockWeights>;
    /// Token embeddings of `ids` (n sequences of t tokens) as [n, t, C].
    fn embed(&self, ids: &[u32], n: usize, t: usize) -> Result<Tensor>;
}

/// A frozen block and the losses of its training.
#[derive(Clone, Debug)]
pub struct BlockRecord {
    pub block: QuantizedBlock,
    pub step_losses: Vec<f32>,
    pub val_losses: Vec<f32>,
    /// Epochs the block trained (fewer than the recipe's when early stop ended it).
    pub epochs_run: usize,
}

impl BlockRecord {
    /// Quantizes a trained block for good, keeping the losses of its training.
    pub(crate) fn freeze(t: TrainedBlock, quant: QuantConfig) -> Result<Self> {
        Ok(BlockRecord {
            block: QuantizedBlock::freeze(&t.weights, &t.scales, &t.zeros, quant)?,
            step_losses: t.step_losses,
            val_losses: t.val_losses,
            epochs_run: t.epochs_run,
        })
    }

    /// The `BlockDone` event that reports this record as block `block`.
    pub(crate) fn done_event(&self, block: usize) -> Event {
        Event::BlockDone {
            block,
            train_loss: self.step_losses.last().copied().unwrap_or(f32::NAN),
            val_loss: self.val_losses.last().copied(),
            epochs_run: self.epochs_run,
        }
    }
}

/// Where frozen blocks go (a checkpoint directory, or memory in tests).
pub trait BlockSink {
    /// Makes block `i` durable; called once per block, in order.
    fn save_block(&mut self, i: usize, record: &BlockRecord) -> Result<()>;
    /// A block saved earlier (for resuming).
    fn load_block(&self, i: usize) -> Result<BlockRecord>;
    /// How many leading blocks are already saved.
    fn blocks_done(&self) -> usize;
}

/// Progress events for the CLI (progress bars, JSONL log).
#[derive(Clone, Copy, Debug)]
pub enum Event {
    BlockStart {
        block: usize,
        blocks: usize,
    },
    Step {
        block: usize,
        info: StepInfo,
    },
    BlockDone {
        block: usize,
        train_loss: f32,
        val_loss: Option<f32>,
        epochs_run: usize,
    },
}

pub struct PipelineOptions {
    pub block_ap: BlockApOptions,
    pub offload: Offload,
    pub offload_val: Offload,
    pub store_dtype: StoreDType,
    /// Samples per forward batch when propagating the streams.
    pub forward_batch: usize,
}

/// Runs one (unquantized) block over every sample of `stream`, in place, on `device` (batches uploaded and
/// their outputs downloaded on a GPU).
pub(crate) fn propagate(
    store: &mut BlockInputStore,
    stream: Stream,
    cfg: &LlamaConfig,
    w: &BlockWeights,
    batch: usize,
    device: &Device,
) -> Result<()> {
    let mut tape = Tape::new();
    let vars = match device.is_cpu() {
        true => BlockVars::register(&mut tape, w, None)?,
        false => BlockVars::register(&mut tape, &device.copy_block(w)?, None)?,
    };
    let mut start = 0;
    while start < store.samples() {
        let count = batch.min(store.samples() - start);
        tape.reset();
        let out = tape.no_grad(|tape| -> Result<Vec<f32>> {
            let x = tape.input(device.put(store.read(stream, start, count)?)?);
            let y = block_forward(tape, cfg, &vars, x)?;
            match device.is_cpu() {
                true => Ok(tape.value(y).f32s("propagate")?.to_vec()),
                // to_host always gives host f32 storage.
                false => Ok(tape.value(y).to_host()?.into_f32_vec().unwrap_or_default()),
            }
        })?;
        store.write(stream, start, &out)?;
        start += count;
    }
    Ok(())
}

/// The common length of the calibration windows (0 when there are none).
pub(crate) fn window_len(windows: &[Vec<u32>]) -> Result<usize> {
    let t = windows.first().map(|w| w.len()).unwrap_or(0);
    if let Some(w) = windows.iter().find(|w| w.len() != t) {
        return Err(Error::invalid(
            "block_ap",
            format!("calibration windows of {} and {} tokens", t, w.len()),
        ));
    }
    Ok(t)
}

fn fill_store(
    src: &dyn BlockSource,
    windows: &[Vec<u32>],
    offload: Offload,
    opts: &PipelineOptions,
) -> Result<BlockInputStore> {
    let cfg = src.config();
    let t = window_len(windows)?;
    let mut store = BlockInputStore::new(windows.len(), t, cfg.hidden, opts.store_dtype, offload)?;
    for (i, chunk) in windows.chunks(opts.forward_batch.max(1)).enumerate() {
        let ids: Vec<u32> = chunk.concat();
        let x = src.embed(&ids, chunk.len(), t)?;
        let start = i * opts.forward_batch.max(1);
        store.write(Stream::Fp, start, x.f32s("block_ap")?)?;
        store.write(Stream::Quant, start, x.f32s("block_ap")?)?;
    }
    Ok(store)
}

/// Where the pipeline keeps the two activation streams of the training and validation samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamsAt {
    /// A `BlockInputStore` in RAM and/or files (`PipelineOptions::offload`); batches go to the GPU and back.
    Host,
    /// GPU memory (`train::device_store`), when Block-AP trains on a GPU with room for them.
    Device,
    /// Pinned RAM up to the offload's budget and the rest in its file (`train::stream::PinnedStreams`), copied
    /// to and from the GPU on a copy stream while the previous batch computes: a GPU run without room for the
    /// streams (f16 streams only).
    Pinned,
}

/// Where [`run_block_ap`] keeps the streams of `samples` (training + validation) sequences of `seqlen` tokens:
/// on the GPU when the block trains there and they fit beside `device_store::DEVICE_RESERVE`, else in pinned
/// host memory streamed to the GPU (f16 streams), else (on the CPU) on the host.
pub fn streams_at(
    opts: &PipelineOptions,
    samples: usize,
    seqlen: usize,
    hidden: usize,
) -> Result<StreamsAt> {
    let bytes = BlockInputStore::bytes_needed(samples, seqlen, hidden, opts.store_dtype)?;
    Ok(match device_has_room(&opts.block_ap.device, bytes)? {
        true => StreamsAt::Device,
        false => host_streams(opts),
    })
}

/// Where streams that stay on the host live: pinned and streamed when Block-AP trains on a GPU (and the store
/// is f16, the pinned store's format), else a `BlockInputStore`.
pub fn host_streams(opts: &PipelineOptions) -> StreamsAt {
    match opts.block_ap.device.is_cpu() || opts.store_dtype != StoreDType::F16 {
        true => StreamsAt::Host,
        false => StreamsAt::Pinned,
    }
}

/// Whether `device` is a GPU with room for `bytes` of streams.
#[cfg(feature = "cuda")]
fn device_has_room(device: &Device, bytes: u64) -> Result<bool> {
    match device {
        Device::Cuda(ctx) => crate::train::device_store::fits_on_device(ctx, bytes),
        Device::Cpu => Ok(false),
    }
}

#[cfg(not(feature = "cuda"))]
fn device_has_room(_: &Device, _: u64) -> Result<bool> {
    Ok(false)
}

/// Samples embedded on the host and uploaded at once when the streams start on a GPU (fewer, larger copies).
#[cfg(feature = "cuda")]
const DEVICE_FILL_BATCH: usize = 64;

/// The activation streams of one sample set, wherever they are kept.
pub(crate) enum Streams {
    Host(BlockInputStore),
    #[cfg(feature = "cuda")]
    Device(crate::train::device_store::DeviceStore),
    #[cfg(feature = "cuda")]
    Pinned(crate::train::stream::PinnedStreams),
}

impl Streams {
    /// Both streams set to the token embeddings of `windows`, kept `at` the given place.
    pub(crate) fn new(
        src: &dyn BlockSource,
        windows: &[Vec<u32>],
        offload: Offload,
        opts: &PipelineOptions,
        at: StreamsAt,
    ) -> Result<Streams> {
        match (at, &opts.block_ap.device) {
            #[cfg(feature = "cuda")]
            (StreamsAt::Device, Device::Cuda(ctx)) => {
                let t = window_len(windows)?;
                let hidden = src.config().hidden;
                let mut store = crate::train::device_store::DeviceStore::new(
                    ctx,
                    windows.len(),
                    t,
                    hidden,
                    opts.store_dtype,
                )?;
                for (i, chunk) in windows.chunks(DEVICE_FILL_BATCH).enumerate() {
                    let x = src.embed(&chunk.concat(), chunk.len(), t)?.to_device(ctx)?;
                    store.write(Stream::Fp, i * DEVICE_FILL_BATCH, &x)?;
                    store.write(Stream::Quant, i * DEVICE_FILL_BATCH, &x)?;
                }
                Ok(Streams::Device(store))
            }
            #[cfg(feature = "cuda")]
            (StreamsAt::Pinned, Device::Cuda(ctx)) if opts.store_dtype == StoreDType::F16 => {
                Ok(Streams::Pinned(crate::train::stream::PinnedStreams::new(
                    ctx,
                    src,
                    windows,
                    window_len(windows)?,
                    &offload,
                    opts.forward_batch,
                )?))
            }
            _ => Ok(Streams::Host(fill_store(src, windows, offload, opts)?)),
        }
    }

    /// Samples `start..start + count` of `stream`, [count, T, C] f32, where the streams are (host or device).
    pub(crate) fn read(&self, stream: Stream, start: usize, count: usize) -> Result<Tensor> {
        match self {
            Streams::Host(s) => s.read(stream, start, count),
            #[cfg(feature = "cuda")]
            Streams::Device(s) => s.read(stream, start, count),
            #[cfg(feature = "cuda")]
            Streams::Pinned(_) => Err(Error::invalid(
                "streams",
                "pinned streams are read batch by batch in training only",
            )),
        }
    }

    /// Copies stream `from` over stream `to`, `batch` samples at a time (the values as stored: an f16 store
    /// reads to f32 and writes back the same bits).
    pub(crate) fn copy_stream(&mut self, from: Stream, to: Stream, batch: usize) -> Result<()> {
        let n = self.samples().len();
        let mut start = 0;
        while start < n {
            let count = batch.max(1).min(n - start);
            let x = self.read(from, start, count)?;
            match self {
                Streams::Host(s) => s.write(to, start, x.f32s("copy_stream")?)?,
                #[cfg(feature = "cuda")]
                Streams::Device(s) => s.write(to, start, &x)?,
                #[cfg(feature = "cuda")]
                Streams::Pinned(_) => unreachable!("read refused pinned streams"),
            }
            start += count;
        }
        Ok(())
    }

    pub(crate) fn samples(&self) -> &dyn BlockSamples {
        match self {
            Streams::Host(s) => s,
            #[cfg(feature = "cuda")]
            Streams::Device(s) => s,
            #[cfg(feature = "cuda")]
            Streams::Pinned(s) => s,
        }
    }

    /// Trains block `w` on these streams (`train_block`; streamed from a pinned store step by step).
    fn train_block(
        &self,
        cfg: &LlamaConfig,
        w: &BlockWeights,
        val: Option<&Streams>,
        opts: &BlockApOptions,
        on_step: impl FnMut(StepInfo),
    ) -> Result<TrainedBlock> {
        let val = val.map(Streams::samples);
        #[cfg(feature = "cuda")]
        if let Streams::Pinned(s) = self {
            return s.train_block(cfg, w, val, opts, on_step);
        }
        train_block(cfg, w, self.samples(), val, opts, on_step)
    }

    pub(crate) fn propagate(
        &mut self,
        stream: Stream,
        cfg: &LlamaConfig,
        w: &BlockWeights,
        opts: &PipelineOptions,
    ) -> Result<()> {
        let fb = opts.forward_batch.max(1);
        match self {
            Streams::Host(s) => propagate(s, stream, cfg, w, fb, &opts.block_ap.device),
            #[cfg(feature = "cuda")]
            Streams::Device(s) => s.propagate(stream, cfg, w, fb),
            #[cfg(feature = "cuda")]
            Streams::Pinned(s) => s.propagate(stream, cfg, w, fb),
        }
    }
}

/// Block-AP over every block of `src`, resuming after the blocks `sink` already holds; the activation streams
/// are kept where [`streams_at`] says.
pub fn run_block_ap(
    src: &dyn BlockSource,
    train: &[Vec<u32>],
    val: &[Vec<u32>],
    opts: &PipelineOptions,
    sink: &mut dyn BlockSink,
    on_event: impl FnMut(Event),
) -> Result<()> {
    let seqlen = window_len(train)?;
    let at = streams_at(opts, train.len() + val.len(), seqlen, src.config().hidden)?;
    run_block_ap_at(src, train, val, opts, at, sink, on_event)
}

/// [`run_block_ap`] with the streams kept `at` the given place (`StreamsAt::Device` and `StreamsAt::Pinned`
/// need a GPU device; on the CPU they fall back to `Host`).
pub fn run_block_ap_at(
    src: &dyn BlockSource,
    train: &[Vec<u32>],
    val: &[Vec<u32>],
    opts: &PipelineOptions,
    at: StreamsAt,
    sink: &mut dyn BlockSink,
    mut on_event: impl FnMut(Event),
) -> Result<()> {
    let cfg = src.config().clone();
    // A resumed run with every block saved has nothing to train, so no stream needs replaying.
    if sink.blocks_done() >= cfg.n_layers {
        return Ok(());
    }
    let mut store = Streams::new(src, train, opts.offload.clone(), opts, at)?;
    let mut val_store = if val.is_empty() {
        None
    } else {
        Some(Streams::new(src, val, opts.offload_val.clone(), opts, at)?)
    };
    for i in 0..cfg.n_layers {
        let fp = src.block(i)?;
        for s in std::iter::once(&mut store).chain(val_store.as_mut()) {
            s.propagate(Stream::Fp, &cfg, &fp, opts)?;
        }
        let trained = if i < sink.blocks_done() {
            sink.load_block(i)?
        } else {
            on_event(Event::BlockStart {
                block: i,
                blocks: cfg.n_layers,
            });
            let t = store
                .train_block(&cfg, &fp, val_store.as_ref(), &opts.block_ap, |info| {
                    on_event(Event::Step { block: i, info })
                })
                .map_err(|e| match e {
                    Error::NonFinite { what } => Error::NonFinite {
                        what: format!("block {i}: {what} (the {i} blocks before it are saved)"),
                    },
                    e => e,
                })?;
            let record = BlockRecord::freeze(t, opts.block_ap.quant)?;
            sink.save_block(i, &record)?;
            on_event(record.done_event(i));
            record
        };
        let frozen = trained.block.dequantized()?;
        for s in std::iter::once(&mut store).chain(val_store.as_mut()) {
            s.propagate(Stream::Quant, &cfg, &frozen, opts)?;
        }
    }
    Ok(())
}
