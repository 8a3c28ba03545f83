//! `engine bench block-ap --stream`: Block-AP over a synthetic model of a few blocks with its activations in a
//! host store and its weights arriving block by block, against the same steps with everything resident.
//!
//! 1. The PCIe ceiling: 256 MiB copies from and to pinned memory on the copy stream.
//! 2. The store (`train::stream::PinnedStore`): `samples` random sequences in both streams, pinned up to
//!    `host_mem`, the rest in a file under `spill`.
//! 3. Resident baseline: block 0 trains `warmup + steps` steps on one batch already on the GPU.
//! 4. Streamed, as `train::pipeline` orders it: per block, the FP stream is pushed through the FP block (in
//!    place, batch by batch; that tape is dropped before training), the block trains one epoch over the store
//!    (inputs from the quantized stream, targets from the FP stream, copied double-buffered while the previous
//!    step computes), and the quantized stream is pushed through the trained block (under fake quantization,
//!    which costs the frozen block's forward plus the fake-quant kernels). Meanwhile the next block's weights
//!    are generated on the host and copied, one tensor per step (`prefetch.rs`).
//!
//! Step times end with a synchronisation of the compute stream, so the streamed step includes any wait for its
//! batch; its median against the resident one is the overhead that overlap did not hide.
use super::prefetch::WeightPrefetch;
use super::random::randn_cuda;
use super::{median, peak_rss_bytes, BlockApBench, MatmulDType, StepFlops};
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::gpu::{CopyStream, GpuContext};
use crate::model::llama::{block_forward, BlockVars, LlamaConfig};
use crate::train::block_ap::{block_ap_optimizer, train_step, BlockApOptions};
use crate::train::device::Device;
use crate::train::store::Stream;
use crate::train::stream::{BatchLoader, BatchWriter, PinnedStore};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct StreamBench {
    /// Shape, quantization, batch, sequence length, device, dtype; `steps` and `warmup` are the resident
    /// baseline's.
    pub base: BlockApBench,
    pub blocks: usize,
    /// Calibration sequences in the store (one epoch per block: samples / batch steps).
    pub samples: usize,
    /// Pinned bytes of the store; the rest goes to the spill file.
    pub host_mem: u64,
    /// The spill file (created, and removed at the end).
    pub spill: PathBuf,
}

#[derive(Clone, Debug)]
pub struct StreamReport {
    pub device: String,
    pub flops: StepFlops,
    /// Pinned host->device and device->host bandwidth of 256 MiB copies, GB/s.
    pub h2d_gbps: f64,
    pub d2h_gbps: f64,
    pub resident_ms: Vec<f64>,
    /// Every streamed training step, all blocks, in order.
    pub streamed_ms: Vec<f64>,
    /// First and last loss of each block.
    pub block_losses: Vec<(f32, f32)>,
    /// Each training batch's host->device copy: milliseconds on the copy stream, and bytes.
    pub copy_ms: Vec<f64>,
    pub copy_bytes: Vec<usize>,
    /// Each propagation pass (FP then quantized stream, per block), wall milliseconds.
    pub propagate_ms: Vec<f64>,
    /// Host wait for the next block's weights at each block switch.
    pub weight_wait_ms: Vec<f64>,
    pub weight_bytes: usize,
    /// The store's bytes in pinned RAM and in the file.
    pub placement: (u64, u64),
    /// GPU allocator peaks over the streamed phase, the whole GPU's memory in use at its end (the pool still
    /// holds its peak reservation then), and the process's peak RSS.
    pub peak_gpu: usize,
    pub peak_reserved: usize,
    pub device_used: usize,
    pub peak_rss: usize,
}

impl StreamReport {
    pub fn resident_median(&self) -> f64 {
        median(&self.resident_ms)
    }

    pub fn streamed_median(&self) -> f64 {
        median(&self.streamed_ms)
    }

    /// Achieved bandwidth of the training batches' copies, GB/s (bytes over copy-stream time).
    pub fn copy_gbps(&self) -> f64 {
        let bytes: usize = self.copy_bytes.iter().sum();
        let ms: f64 = self.copy_ms.iter().sum();
        bytes as f64 / (ms * 1e-3) * 1e-9
    }
}

/// Host<->device GB/s of `bytes` pinned copies on `copy` (5 of each after one warm-up).
fn bandwidth(ctx: &Arc<GpuContext>, copy: &CopyStream, bytes: usize) -> Result<(f64, f64)> {
    const REPS: usize = 5;
    let mut host = ctx.alloc_pinned(bytes)?;
    let mut dev = ctx.alloc(bytes / 4)?;
    copy.wait(&ctx.record()?)?;
    copy.htod(&mut host, 0, &mut dev, 0, bytes)?;
    let a = copy.record()?;
    for _ in 0..REPS {
        copy.htod(&mut host, 0, &mut dev, 0, bytes)?;
    }
    let b = copy.record()?;
    for _ in 0..REPS {
        copy.dtoh(&dev, 0, &mut host, 0, bytes)?;
    }
    let c = copy.record()?;
    let gbps = |ms: f32| (REPS * bytes) as f64 / (ms as f64 * 1e-3) * 1e-9;
    let r = (gbps(a.elapsed_ms(&b)?), gbps(b.elapsed_ms(&c)?));
    copy.synchronize()?;
    Ok(r)
}

/// Pushes `stream` of every sample through the block in `tape`/`vars`, in place; wall milliseconds.
#[allow(clippy::too_many_arguments)]
fn propagate(
    ctx: &Arc<GpuContext>,
    copy: &Arc<CopyStream>,
    store: &mut PinnedStore,
    stream: Stream,
    cfg: &LlamaConfig,
    tape: &mut Tape,
    vars: &BlockVars,
    batches: &[(usize, usize)],
) -> Result<f64> {
    let t0 = Instant::now();
    let max_count = batches.iter().map(|b| b.1).max().unwrap_or(0);
    let mut loader = BatchLoader::new(ctx, copy, store, &[stream], batches.to_vec())?;
    let mut writer = BatchWriter::new(ctx, copy, store, max_count)?;
    for &(start, _) in batches {
        let x = loader
            .next(store)?
            .and_then(|mut v| v.pop())
            .expect("one tensor per batch");
        tape.reset();
        tape.no_grad(|tape| -> Result<()> {
            let x = tape.input(x);
            let y = block_forward(tape, cfg, vars, x)?;
            writer.write(store, stream, start, tape.value(y))
        })?;
    }
    writer.finish(store)?;
    tape.reset();
    ctx.synchronize()?;
    copy.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

pub fn run_block_ap_stream(b: &StreamBench) -> Result<StreamReport> {
    let base = &b.base;
    let Device::Cuda(ctx) = &base.device else {
        return Err(Error::invalid(
            "bench",
            "--stream moves batches between host and GPU: use it with --device cuda",
        ));
    };
    if base.steps == 0 || base.batch == 0 || base.seqlen == 0 || b.blocks == 0 {
        return Err(Error::invalid(
            "bench",
            format!(
                "steps {}, batch {}, seqlen {} and blocks {} must be positive",
                base.steps, base.batch, base.seqlen, b.blocks
            ),
        ));
    }
    if b.samples < base.batch {
        return Err(Error::invalid(
            "bench",
            format!(
                "--samples {} cannot fill one batch of {}",
                b.samples, base.batch
            ),
        ));
    }
    let cfg = base.shape.config();
    ctx.set_matmul_bf16(base.dtype == MatmulDType::Bf16);
    let mut opts = BlockApOptions::recipe(base.quant);
    opts.device = base.device.clone();
    let copy = Arc::new(ctx.copy_stream()?);
    let (h2d_gbps, d2h_gbps) = bandwidth(ctx, &copy, 256 << 20)?;

    let (t, c, bs) = (base.seqlen, cfg.hidden, base.batch);
    let mut store = PinnedStore::new(ctx, b.samples, t, c, b.host_mem, &b.spill)?;
    let all: Vec<(usize, usize)> = (0..b.samples)
        .step_by(bs)
        .map(|s| (s, bs.min(b.samples - s)))
        .collect();
    let train_batches: Vec<(usize, usize)> = (0..b.samples / bs).map(|i| (i * bs, bs)).collect();
    {
        let mut writer = BatchWriter::new(ctx, &copy, &store, bs)?;
        for &(s, n) in &all {
            let x = randn_cuda(ctx, &[n, t, c], 0.0, 1.0, base.seed + 100 + s as u64)?;
            writer.write(&mut store, Stream::Fp, s, &x)?;
            writer.write(&mut store, Stream::Quant, s, &x)?;
        }
        writer.finish(&mut store)?;
    }
    let mut prefetch = WeightPrefetch::new(ctx, &copy, &cfg, base.seed)?;
    prefetch.start(0)?;
    let (mut w, _) = prefetch.take()?;

    let mut resident_ms = Vec::with_capacity(base.steps);
    {
        let mut tape = Tape::new();
        let vars = BlockVars::register(&mut tape, &w, Some(base.quant))?;
        let mut opt = block_ap_optimizer(&mut tape, &vars, &opts)?;
        let mut loader = BatchLoader::new(
            ctx,
            &copy,
            &store,
            &[Stream::Quant, Stream::Fp],
            vec![(0, bs)],
        )?;
        let xy = loader.next(&mut store)?.expect("one batch");
        for i in 0..base.warmup + base.steps {
            let t0 = Instant::now();
            train_step(
                &mut tape,
                &cfg,
                &vars,
                &mut opt,
                (xy[0].clone(), xy[1].clone()),
                1.0,
                &mut |_| Ok(()),
            )?;
            ctx.synchronize()?;
            if i >= base.warmup {
                resident_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    ctx.synchronize()?;
    // The streamed phase's peaks from an empty cache: what it reserves, not what the baseline left cached.
    ctx.empty_cache();
    ctx.reset_peak();

    let mut r = StreamReport {
        device: base.device.name(),
        flops: StepFlops::new(&cfg, bs, t),
        h2d_gbps,
        d2h_gbps,
        resident_ms,
        streamed_ms: Vec::new(),
        block_losses: Vec::new(),
        copy_ms: Vec::new(),
        copy_bytes: Vec::new(),
        propagate_ms: Vec::new(),
        weight_wait_ms: Vec::new(),
        weight_bytes: prefetch.block_bytes(),
        placement: store.placement(),
        peak_gpu: 0,
        peak_reserved: 0,
        device_used: 0,
        peak_rss: 0,
    };
    for blk in 0..b.blocks {
        if blk + 1 < b.blocks {
            prefetch.start(blk + 1)?;
        }
        {
            let mut fp_tape = Tape::new();
            let fp = BlockVars::register(&mut fp_tape, &w, None)?;
            r.propagate_ms.push(propagate(
                ctx,
                &copy,
                &mut store,
                Stream::Fp,
                &cfg,
                &mut fp_tape,
                &fp,
                &all,
            )?);
        }
        let mut tape = Tape::new();
        let vars = BlockVars::register(&mut tape, &w, Some(base.quant))?;
        drop(w);
        let mut opt = block_ap_optimizer(&mut tape, &vars, &opts)?;
        let mut loader = BatchLoader::new(
            ctx,
            &copy,
            &store,
            &[Stream::Quant, Stream::Fp],
            train_batches.clone(),
        )?;
        let mut losses = Vec::with_capacity(train_batches.len());
        for _ in 0..train_batches.len() {
            let t0 = Instant::now();
            let mut xy = loader.next(&mut store)?.expect("one per batch");
            prefetch.poll()?;
            let ys = xy.pop().expect("targets");
            let xs = xy.pop().expect("inputs");
            losses.push(train_step(
                &mut tape,
                &cfg,
                &vars,
                &mut opt,
                (xs, ys),
                1.0,
                &mut |_| Ok(()),
            )?);
            ctx.synchronize()?;
            r.streamed_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        for ct in loader.timings() {
            r.copy_ms.push(ct.start.elapsed_ms(&ct.end)? as f64);
            r.copy_bytes.push(ct.bytes);
        }
        drop(loader);
        r.block_losses
            .push((losses[0], *losses.last().expect("at least one step")));
        r.propagate_ms.push(propagate(
            ctx,
            &copy,
            &mut store,
            Stream::Quant,
            &cfg,
            &mut tape,
            &vars,
            &all,
        )?);
        drop((opt, vars, tape));
        w = match blk + 1 < b.blocks {
            true => {
                let (next, waited) = prefetch.take()?;
                r.weight_wait_ms.push(waited);
                next
            }
            // The last block has no successor: nothing left to train.
            false => break,
        };
    }
    ctx.synchronize()?;
    let m = ctx.memory_stats();
    r.peak_gpu = m.peak_in_use;
    r.peak_reserved = m.peak_reserved;
    r.device_used = ctx.device_memory_used()?;
    r.peak_rss = peak_rss_bytes();
    drop(store);
    if r.placement.1 > 0 {
        let _ = std::fs::remove_file(&b.spill);
    }
    Ok(r)
}
