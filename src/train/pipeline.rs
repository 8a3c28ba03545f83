//! Block-AP over a whole model: walk the blocks in order, train each on the quantized predecessors' outputs
//! against the full-precision block's outputs, freeze it, and push both activation streams one block further.
//!
//! Per block i (streams live in a `BlockInputStore`, updated in place sample batch by sample batch):
//!   1. Fp stream  <- FP block i (Fp stream)          — the targets, and the next block's FP inputs
//!   2. train block i on (Quant stream -> Fp stream)   — `train_block`
//!   3. Quant stream <- frozen quantized block i (Quant stream)
//!   4. hand the frozen block to the sink (the checkpoint writer), which makes it durable
//! Resuming at block k replays steps 1 and 3 for blocks < k from the sink's saved blocks, which reproduces the
//! streams exactly (same ops, same order), so a resumed run ends byte-identical to an uninterrupted one.
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use crate::model::quantized::QuantizedBlock;
use crate::quant::fake_quant::QuantConfig;
use crate::tensor::Tensor;
use crate::train::block_ap::{train_block, BlockApOptions, StepInfo, TrainedBlock};
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

fn fill_store(
    src: &dyn BlockSource,
    windows: &[Vec<u32>],
    offload: Offload,
    opts: &PipelineOptions,
) -> Result<BlockInputStore> {
    let cfg = src.config();
    let t = windows.first().map(|w| w.len()).unwrap_or(0);
    if let Some(w) = windows.iter().find(|w| w.len() != t) {
        return Err(Error::invalid(
            "block_ap",
            format!("calibration windows of {} and {} tokens", t, w.len()),
        ));
    }
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

/// Block-AP over every block of `src`, resuming after the blocks `sink` already holds.
pub fn run_block_ap(
    src: &dyn BlockSource,
    train: &[Vec<u32>],
    val: &[Vec<u32>],
    opts: &PipelineOptions,
    sink: &mut dyn BlockSink,
    mut on_event: impl FnMut(Event),
) -> Result<()> {
    let cfg = src.config().clone();
    let mut store = fill_store(src, train, opts.offload.clone(), opts)?;
    let mut val_store = if val.is_empty() {
        None
    } else {
        Some(fill_store(src, val, opts.offload_val.clone(), opts)?)
    };
    let fb = opts.forward_batch.max(1);
    for i in 0..cfg.n_layers {
        let fp = src.block(i)?;
        for s in std::iter::once(&mut store).chain(val_store.as_mut()) {
            propagate(s, Stream::Fp, &cfg, &fp, fb, &opts.block_ap.device)?;
        }
        let trained = if i < sink.blocks_done() {
            sink.load_block(i)?
        } else {
            on_event(Event::BlockStart {
                block: i,
                blocks: cfg.n_layers,
            });
            let val_ref = val_store
                .as_ref()
                .map(|v| v as &dyn crate::train::block_ap::BlockSamples);
            let t = train_block(&cfg, &fp, &store, val_ref, &opts.block_ap, |info| {
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
            propagate(s, Stream::Quant, &cfg, &frozen, fb, &opts.block_ap.device)?;
        }
    }
    Ok(())
}
