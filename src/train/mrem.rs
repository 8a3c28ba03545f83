//! MREM-parallel Block-AP: the blocks split into K contiguous modules that train at the same time, one thread
//! each (module-wise reconstruction, Bai et al. 2022, "Towards Efficient Post-training Quantization of
//! Pre-trained Language Models"). Within a module, blocks train one after another exactly as in the sequential
//! pipeline (`train::pipeline`): each block has its own tape and optimizer and its MSE against the FP block's
//! output on FP inputs; gradients never cross modules.
//!
//! What a module trains on. The first module sees the sequential pipeline's inputs (the model's own quantized
//! stream from the embeddings), so K = 1 is exactly the sequential run. Module m > 0 cannot wait for module m−1
//! to finish, so at its training step t (counted over all of its blocks) its input batch is
//!     x_t = λ_t · FP_m + (1 − λ_t) · Q_t,    λ_t = max(1 − t / T0, 0)
//! pushed through the module's own already-frozen blocks, where FP_m is the full-precision model's activation
//! at the module's first block and Q_t is module m−1's quantized output of the same batch at its own step t: the
//! output of its block under training (fake-quantized, current parameters), pushed through its later blocks at
//! their min-max (RTN) quantization. Q_t travels through a bounded FIFO queue (`sync_channel`), one message per
//! step, in step order; every module has the same steps per block, so message t is for the consumer's step t.
//! T0 (`anneal_steps`) defaults to the module's own training steps (all of its blocks), so the FP share falls
//! over the whole module and its last block ends on quantized inputs alone: early on, the predecessor's output is
//! mostly its min-max blocks', further from what its trained blocks will give than the FP activation is (SmolLM2,
//! 2 modules, 2 epochs: the WikiText-2 perplexity 3.2% (w3g64) and 2.3% (w4g64) above the sequential order's in
//! the mean of two runs with T0 of one block, 0.8% and 1.1% in the mean of three with T0 of the module;
//! BENCHMARKS.md, issue 7, session 9). Once module m−1 has finished (its queue is closed), module
//! m keeps training on the last quantized output module m−1 sent for each batch. Validation losses of module
//! m > 0 use the FP module input pushed through the module's frozen blocks. Each module gets its own rayon pool
//! with 1/K of the threads (at least one). A module on a GPU keeps its streams in that GPU's memory when the
//! streams of every module there fit (as the sequential pipeline does), and mixes its inputs there; only the
//! outputs sent downstream go through host memory.
use crate::error::{Error, Result};
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::model::quantized::QuantizedBlock;
use crate::quant::fake_quant::{init_minmax, QuantConfig};
use crate::tensor::Tensor;
use crate::train::block_ap::{train_block_with, BlockApOptions, BlockSamples};
use crate::train::device::Device;
use crate::train::pipeline::{
    window_len, BlockRecord, BlockSink, BlockSource, Event, PipelineOptions, Streams, StreamsAt,
};
use crate::train::store::{BlockInputStore, Offload, Stream};
use std::cell::RefCell;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, SyncSender};

mod forward;
mod queue;
#[cfg(test)]
mod tests;

use forward::forward_blocks;
use queue::MixedInputs;
pub use queue::{QuantOutput, Upstream};

#[derive(Clone, Debug)]
pub struct MremOptions {
    /// K, the number of modules trained concurrently.
    pub modules: usize,
    /// T0 of the λ schedule in module training steps; None = the steps of one block.
    pub anneal_steps: Option<usize>,
    /// Messages module m−1 may run ahead of module m.
    pub queue_depth: usize,
    /// Where each module trains (`--gpus 0,1`: module m on the m-th entry, one GPU context each; an ordinal
    /// may repeat to run several modules on one GPU), in the GEMM mode (f32 or bf16) of the Block-AP options'
    /// device. Empty: every module on the Block-AP options' device.
    pub devices: Vec<Device>,
}

/// λ_t = max(1 − t/T0, 0): the FP share of a module's input at its training step t (T0 = 0: quantized at once).
pub fn lambda(t: usize, t0: usize) -> f32 {
    if t0 == 0 {
        return 0.0;
    }
    (1.0 - t as f64 / t0 as f64).max(0.0) as f32
}

/// The K contiguous block ranges (the first `n % K` modules take one block more).
pub fn module_ranges(n_layers: usize, modules: usize) -> Result<Vec<Range<usize>>> {
    if modules == 0 || modules > n_layers {
        return Err(Error::invalid(
            "mrem",
            format!("--modules {modules} with {n_layers} blocks: use 1..={n_layers}"),
        ));
    }
    Ok((0..modules)
        .map(|m| crate::dist::shard(n_layers, m, modules))
        .collect())
}

/// What one module thread needs.
struct Module<'a> {
    index: usize,
    range: Range<usize>,
    cfg: &'a LlamaConfig,
    blocks: &'a [BlockWeights],
    /// Training steps of each block (every module has the same).
    steps_per_block: usize,
    anneal: usize,
    upstream: Option<Receiver<QuantOutput>>,
    downstream: Option<SyncSender<QuantOutput>>,
    events: mpsc::Sender<Event>,
    /// The module's training and validation streams (both start as the token embeddings).
    store: Streams,
    val_store: Option<Streams>,
    /// The pipeline options with this module's device (`opts.block_ap.device`) and its share of a host budget.
    opts: PipelineOptions,
}

fn module_offload(o: &Offload, m: usize, k: usize) -> Offload {
    let file = |p: &std::path::Path| p.with_extension(format!("module{m}.bin"));
    match o {
        Offload::Ram => Offload::Ram,
        Offload::Disk(p) => Offload::Disk(file(p)),
        Offload::Budget { ram_bytes, path } => Offload::Budget {
            ram_bytes: ram_bytes / k as u64,
            path: file(path),
        },
    }
}

/// Where each module keeps its streams: in the memory of its GPU when the streams of every module on that GPU
/// (`bytes` each) fit there beside one `device_store::DEVICE_RESERVE` per module, else on the host.
#[cfg(feature = "cuda")]
fn module_streams_at(devices: &[Device], bytes: u64) -> Result<Vec<StreamsAt>> {
    use crate::train::device_store::{fits_on_device, DEVICE_RESERVE};
    devices
        .iter()
        .map(|d| match d {
            Device::Cuda(ctx) => {
                let sharing = devices
                    .iter()
                    .filter(|o| o.ordinal() == Some(ctx.ordinal()))
                    .count() as u64;
                let total = (bytes + DEVICE_RESERVE) * sharing - DEVICE_RESERVE;
                Ok(match fits_on_device(ctx, total)? {
                    true => StreamsAt::Device,
                    false => StreamsAt::Host,
                })
            }
            Device::Cpu => Ok(StreamsAt::Host),
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn module_streams_at(devices: &[Device], _bytes: u64) -> Result<Vec<StreamsAt>> {
    Ok(vec![StreamsAt::Host; devices.len()])
}

impl Module<'_> {
    fn run(mut self) -> Result<Vec<BlockRecord>> {
        let (cfg, opts) = (self.cfg, &self.opts);
        let device = opts.block_ap.device.clone();
        let (mut store, mut val_store) = (self.store, self.val_store);
        // The FP model up to the module's first block: both streams start at the FP activation there (pushed
        // through once, then copied). A later module never moves its training store's quantized stream again: it
        // stays the FP module input.
        for s in std::iter::once(&mut store).chain(val_store.as_mut()) {
            for w in &self.blocks[..self.range.start] {
                s.propagate(Stream::Fp, cfg, w, opts)?;
            }
            if self.range.start > 0 {
                s.copy_stream(Stream::Fp, Stream::Quant, opts.forward_batch)?;
            }
        }
        let upstream = self
            .upstream
            .take()
            .map(|rx| RefCell::new(Upstream::new(rx)));
        // The module's later blocks at min-max quantization, for the outputs sent downstream.
        let rtn: Vec<BlockWeights> = if self.downstream.is_some() {
            self.blocks[self.range.clone()]
                .iter()
                .map(|w| device.copy_block(&rtn_block(w, opts.block_ap.quant)?))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let mut frozen: Vec<BlockWeights> = Vec::new();
        let mut records = Vec::new();
        for (j, i) in self.range.clone().enumerate() {
            let fp = &self.blocks[i];
            for s in std::iter::once(&mut store).chain(val_store.as_mut()) {
                s.propagate(Stream::Fp, cfg, fp, opts)?;
            }
            let _ = self.events.send(Event::BlockStart {
                block: i,
                blocks: cfg.n_layers,
            });
            let step0 = j * self.steps_per_block;
            let mixed = upstream.as_ref().map(|up| MixedInputs {
                cfg,
                streams: &store,
                device: &device,
                frozen: &frozen,
                upstream: up,
                step0,
                anneal: self.anneal,
            });
            let train: &dyn BlockSamples = match &mixed {
                Some(m) => m,
                None => store.samples(),
            };
            let val_ref = val_store.as_ref().map(Streams::samples);
            let events = self.events.clone();
            let later = rtn.get(j + 1..).unwrap_or(&[]);
            let downstream = &mut self.downstream;
            let mut send = |step: usize, start: usize, out: &Tensor| -> Result<()> {
                if let Some(tx) = downstream.as_ref() {
                    // On the host: the next module may train on another GPU.
                    let output = forward_blocks(cfg, later, out.clone(), &device)?.to_host()?;
                    let msg = QuantOutput {
                        step: step0 + step,
                        start,
                        output,
                    };
                    // The next module hung up (it finished with fewer steps, or failed): stop sending.
                    if tx.send(msg).is_err() {
                        *downstream = None;
                    }
                }
                Ok(())
            };
            let t = train_block_with(
                cfg,
                fp,
                train,
                val_ref,
                &opts.block_ap,
                |info| {
                    let _ = events.send(Event::Step { block: i, info });
                },
                &mut send,
            )
            .map_err(|e| match e {
                Error::NonFinite { what } => Error::NonFinite {
                    what: format!("block {i} (module {}): {what}", self.index),
                },
                e => e,
            })?;
            let record = BlockRecord::freeze(t, opts.block_ap.quant)?;
            let _ = self.events.send(record.done_event(i));
            let deq = record.block.dequantized()?;
            // Module 0 trains on the store's quantized stream (the sequential pipeline); later modules rebuild
            // their inputs from the mix, so only their validation stream moves on.
            let train_store = if upstream.is_none() {
                Some(&mut store)
            } else {
                None
            };
            for s in train_store.into_iter().chain(val_store.as_mut()) {
                s.propagate(Stream::Quant, cfg, &deq, opts)?;
            }
            // Only a module fed by a predecessor pushes its inputs through its frozen blocks.
            if upstream.is_some() {
                frozen.push(device.copy_block(&deq)?);
            }
            records.push(record);
        }
        Ok(records)
    }
}

/// MREM's host memory beyond the modules' streams (which their stores budget themselves): every block's f32
/// weights, held for all modules at once, and each later module's latest predecessor output of every training
/// batch (f16, kept for the steps after its predecessor finished).
pub fn host_bytes(cfg: &LlamaConfig, samples: usize, seqlen: usize, modules: usize) -> u64 {
    let block: u64 = cfg
        .linear_shapes()
        .iter()
        .map(|&(_, n, k)| (n * k) as u64)
        .sum::<u64>()
        + 2 * cfg.hidden as u64;
    let weights = block * cfg.n_layers as u64 * 4;
    let outputs = (modules.saturating_sub(1) * samples * seqlen * cfg.hidden) as u64 * 2;
    weights + outputs
}

/// Refuses a run whose [`host_bytes`] exceed the host's available memory (when /proc/meminfo tells it), before
/// anything is loaded, instead of being killed for memory halfway.
fn check_host_memory(
    cfg: &LlamaConfig,
    samples: usize,
    seqlen: usize,
    modules: usize,
) -> Result<()> {
    let need = host_bytes(cfg, samples, seqlen, modules);
    match crate::plan::host::available_memory() {
        Some(avail) if need > avail => Err(Error::invalid(
            "mrem",
            format!(
                "--parallel modules holds every block's f32 weights and, for each of the {} later modules, the \
                 previous module's latest output of all {samples} training windows: {:.1} GiB of host memory, {:.1} GiB \
                 available; use fewer --train-size windows or modules, or --parallel off",
                modules.saturating_sub(1),
                need as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            ),
        )),
        _ => Ok(()),
    }
}

/// A block with every linear at its min-max (RTN) quantization, dequantized.
fn rtn_block(w: &BlockWeights, quant: QuantConfig) -> Result<BlockWeights> {
    let (mut scales, mut zeros) = (Vec::new(), Vec::new());
    for l in &w.linears {
        let (s, z) = init_minmax(l, quant)?;
        scales.push(s);
        zeros.push(z);
    }
    let arr = |v: Vec<Tensor>| -> [Tensor; 7] { v.try_into().expect("seven linears") };
    QuantizedBlock::freeze(w, &arr(scales), &arr(zeros), quant)?.dequantized()
}

/// Block-AP with the blocks split into `mrem.modules` modules trained concurrently (see the module doc). Blocks
/// reach `sink` in order once every module has finished; a partly saved run cannot be resumed in this mode.
pub fn run_block_ap_mrem(
    src: &dyn BlockSource,
    train: &[Vec<u32>],
    val: &[Vec<u32>],
    opts: &PipelineOptions,
    mrem: &MremOptions,
    sink: &mut dyn BlockSink,
    mut on_event: impl FnMut(Event),
) -> Result<()> {
    let cfg = src.config().clone();
    let done = sink.blocks_done();
    if done == cfg.n_layers {
        return Ok(());
    }
    if done > 0 {
        return Err(Error::invalid(
            "mrem",
            format!("{done} of {} blocks are saved: resuming a --parallel modules run is not supported; start a fresh --out, or resume with --parallel off", cfg.n_layers),
        ));
    }
    let ranges = module_ranges(cfg.n_layers, mrem.modules)?;
    if !mrem.devices.is_empty() && mrem.devices.len() != mrem.modules {
        return Err(Error::invalid(
            "mrem",
            format!(
                "{} devices for {} modules: give one device per module",
                mrem.devices.len(),
                mrem.modules
            ),
        ));
    }
    let n = train.len();
    if opts.block_ap.batch_size == 0 || n < opts.block_ap.batch_size {
        return Err(Error::invalid(
            "mrem",
            format!(
                "{n} training samples cannot fill one batch of {}",
                opts.block_ap.batch_size
            ),
        ));
    }
    let steps_per_block = (n / opts.block_ap.batch_size) * opts.block_ap.epochs;
    // Each module device is a context of its own: it trains in the GEMM mode of the Block-AP options' device
    // (`engine train --dtype bf16` sets that one).
    for d in &mrem.devices {
        d.set_matmul_bf16(opts.block_ap.device.matmul_bf16())?;
    }
    // A module's streams: the training and validation samples, both streams, in the store's format.
    let t = window_len(train)?;
    let stream_bytes =
        BlockInputStore::bytes_needed(n + val.len(), t, cfg.hidden, opts.store_dtype)?;
    check_host_memory(&cfg, n, t, ranges.len())?;
    let module_devices: Vec<Device> = match mrem.devices.is_empty() {
        true => vec![opts.block_ap.device.clone(); ranges.len()],
        false => mrem.devices.clone(),
    };
    let places = module_streams_at(&module_devices, stream_bytes)?;
    let blocks: Vec<BlockWeights> = (0..cfg.n_layers)
        .map(|i| src.block(i))
        .collect::<Result<_>>()?;
    // Each module runs its ops (gemm, rayon loops) in a pool of its own with an equal share of the threads:
    // through the one global pool, the modules' parallel loops would queue behind each other.
    let threads = (rayon::current_num_threads() / ranges.len()).max(1);
    let mut pools = (0..ranges.len())
        .map(|m| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("mrem-module{m}-{i}"))
                .build()
                .map_err(|e| Error::invalid("mrem", format!("thread pool of {threads}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    // Every module's options and streams, embedded here before any module starts (the block source stays on
    // this thread, and a module that cannot get its streams stops the run before any work is done).
    let mut setups = Vec::with_capacity(ranges.len());
    for (index, (device, at)) in module_devices.into_iter().zip(places).enumerate() {
        let mopts = PipelineOptions {
            block_ap: BlockApOptions {
                device,
                ..opts.block_ap.clone()
            },
            offload: module_offload(&opts.offload, index, ranges.len()),
            offload_val: module_offload(&opts.offload_val, index, ranges.len()),
            store_dtype: opts.store_dtype,
            forward_batch: opts.forward_batch,
        };
        let store = Streams::new(src, train, mopts.offload.clone(), &mopts, at)?;
        let val_store = match val.is_empty() {
            true => None,
            false => Some(Streams::new(
                src,
                val,
                mopts.offload_val.clone(),
                &mopts,
                at,
            )?),
        };
        setups.push((mopts, store, val_store));
    }
    let (events_tx, events_rx) = mpsc::channel();
    let results: Vec<Result<Vec<BlockRecord>>> = std::thread::scope(|s| {
        let mut upstream = None;
        let mut handles = Vec::new();
        for ((index, range), (mopts, store, val_store)) in ranges.iter().enumerate().zip(setups) {
            let (downstream, next_upstream) = if index + 1 < ranges.len() {
                let (tx, rx) = mpsc::sync_channel(mrem.queue_depth);
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let module = Module {
                index,
                range: range.clone(),
                cfg: &cfg,
                blocks: &blocks,
                steps_per_block,
                anneal: mrem.anneal_steps.unwrap_or(steps_per_block * range.len()),
                upstream: upstream.take(),
                downstream,
                events: events_tx.clone(),
                store,
                val_store,
                opts: mopts,
            };
            upstream = next_upstream;
            let pool = pools.next().expect("one pool per module");
            handles.push(s.spawn(move || pool.install(|| module.run())));
        }
        drop(events_tx);
        for e in events_rx {
            on_event(e);
        }
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::invalid(
                        "mrem",
                        "a module thread panicked".to_string(),
                    ))
                })
            })
            .collect()
    });
    let mut records = Vec::with_capacity(cfg.n_layers);
    for r in results {
        records.extend(r?);
    }
    for (i, r) in records.iter().enumerate() {
        sink.save_block(i, r)?;
    }
    Ok(())
}
