//! The Block-AP activation streams in GPU memory: what `BlockInputStore` holds on the host, kept on the device
//! when Block-AP trains there and both streams fit, so that neither a training batch nor the propagation of a
//! stream crosses PCIe. Through the host store every batch costs a widening to f32 on one core and an upload,
//! and every propagated batch a download and a narrowing back: most of the time `engine train --device cuda`
//! spent at 1024 tokens, and hours at the full recipe (BENCHMARKS.md, issue 5).
//!
//! Values keep the host store's dtype and rounding (f16 by default: round to nearest even, overflow to
//! infinity, as `half::f16::from_f32`), so a run reads the same batches from either store and trains the same.
//! Layout per stream: [samples, seqlen, hidden], f16 values two to one f32 slot of the caching allocator.
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::gpu::{Arg, GpuBuf, GpuContext, KernelSource};
use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use crate::tensor::Tensor;
use crate::train::block_ap::BlockSamples;
use crate::train::device::Device;
use crate::train::store::{StoreDType, Stream};
use std::sync::Arc;

pub const CUDA: KernelSource = KernelSource {
    op: "store",
    code: include_str!("../../cuda/store.cu"),
};

/// Device memory left free beside the streams for the block's training and the propagation batches
/// (activations, gradients, AdamW state: 0.4 GiB for a SmolLM2 block at 2 × 2048 tokens, 6 GiB for Llama-2-7B).
pub const DEVICE_RESERVE: u64 = 8 << 30;

pub struct DeviceStore {
    samples: usize,
    seqlen: usize,
    hidden: usize,
    dtype: StoreDType,
    /// `Stream::Fp` then `Stream::Quant`.
    streams: [GpuBuf; 2],
}

fn dtype_bytes(dtype: StoreDType) -> usize {
    match dtype {
        StoreDType::F16 => 2,
        StoreDType::F32 => 4,
    }
}

/// Whether streams of `bytes` fit in the free memory of `ctx` with [`DEVICE_RESERVE`] to spare.
pub fn fits_on_device(ctx: &GpuContext, bytes: u64) -> Result<bool> {
    let (free, _) = ctx.memory_info()?;
    Ok(bytes.saturating_add(DEVICE_RESERVE) <= free as u64)
}

impl DeviceStore {
    /// Both streams of `samples` sequences of `seqlen` × `hidden` values, uninitialised.
    pub fn new(
        ctx: &Arc<GpuContext>,
        samples: usize,
        seqlen: usize,
        hidden: usize,
        dtype: StoreDType,
    ) -> Result<DeviceStore> {
        let n = samples * seqlen * hidden;
        let slots = match dtype {
            StoreDType::F16 => n.div_ceil(2),
            StoreDType::F32 => n,
        };
        Ok(DeviceStore {
            samples,
            seqlen,
            hidden,
            dtype,
            streams: [ctx.alloc(slots)?, ctx.alloc(slots)?],
        })
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    fn check(&self, op: &'static str, start: usize, count: usize) -> Result<()> {
        if start + count > self.samples {
            return Err(Error::shape(
                op,
                format!(
                    "samples {start}..{} of {} (each {} × {})",
                    start + count,
                    self.samples,
                    self.seqlen,
                    self.hidden
                ),
            ));
        }
        Ok(())
    }

    /// The device address of sample `sample` of `stream`.
    fn at(&self, stream: Stream, sample: usize) -> Arg {
        let bytes = sample * self.seqlen * self.hidden * dtype_bytes(self.dtype);
        Arg::Ptr(self.streams[stream as usize].ptr() + bytes as u64)
    }

    /// Stores `x` [count, seqlen, hidden] (on this store's GPU) as samples `start..start + count`.
    pub fn write(&mut self, stream: Stream, start: usize, x: &Tensor) -> Result<()> {
        const OP: &str = "DeviceStore::write";
        let count = x.shape().first().copied().unwrap_or(0);
        if x.shape() != [count, self.seqlen, self.hidden] {
            return Err(Error::shape(
                OP,
                format!(
                    "{:?} into a store of [N, {}, {}]",
                    x.shape(),
                    self.seqlen,
                    self.hidden
                ),
            ));
        }
        self.check(OP, start, count)?;
        let src = x.gpu(OP)?;
        let ctx = self.streams[0].ctx().clone();
        if !Arc::ptr_eq(src.ctx(), &ctx) {
            return Err(Error::Storage {
                op: OP,
                msg: format!(
                    "values on {} for a store on cuda:{}",
                    x.device_name(),
                    ctx.ordinal()
                ),
            });
        }
        let kernel = match self.dtype {
            StoreDType::F16 => "store_write_f16",
            StoreDType::F32 => "store_copy_f32",
        };
        let n = x.numel();
        ctx.launch_1d(
            &CUDA,
            kernel,
            n,
            &[self.at(stream, start), src.arg(), Arg::I64(n as i64)],
        )
    }

    /// Samples `start..start + count` of `stream` as an f32 device tensor [count, seqlen, hidden].
    pub fn read(&self, stream: Stream, start: usize, count: usize) -> Result<Tensor> {
        self.check("DeviceStore::read", start, count)?;
        let n = count * self.seqlen * self.hidden;
        let ctx = self.streams[0].ctx().clone();
        let out = ctx.alloc(n)?;
        let kernel = match self.dtype {
            StoreDType::F16 => "store_read_f16",
            StoreDType::F32 => "store_copy_f32",
        };
        ctx.launch_1d(
            &CUDA,
            kernel,
            n,
            &[out.arg(), self.at(stream, start), Arg::I64(n as i64)],
        )?;
        Tensor::from_gpu(&[count, self.seqlen, self.hidden], out)
    }

    /// Runs one (unquantized) block over every sample of `stream`, in place, `batch` samples at a time.
    pub fn propagate(
        &mut self,
        stream: Stream,
        cfg: &LlamaConfig,
        w: &BlockWeights,
        batch: usize,
    ) -> Result<()> {
        let device = Device::Cuda(self.streams[0].ctx().clone());
        let mut tape = Tape::new();
        let vars = BlockVars::register(&mut tape, &device.copy_block(w)?, None)?;
        let mut start = 0;
        while start < self.samples {
            let count = batch.min(self.samples - start);
            tape.reset();
            let y = tape.no_grad(|tape| -> Result<Tensor> {
                let x = tape.input(self.read(stream, start, count)?);
                let y = block_forward(tape, cfg, &vars, x)?;
                Ok(std::mem::replace(tape.value_mut(y), Tensor::scalar(0.0)))
            })?;
            self.write(stream, start, &y)?;
            start += count;
        }
        Ok(())
    }
}

impl BlockSamples for DeviceStore {
    fn len(&self) -> usize {
        self.samples
    }
    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.read(Stream::Quant, start, count)?,
            self.read(Stream::Fp, start, count)?,
        ))
    }
}

/// Rows `start..start + count` of a device tensor [N, ..] as a new device tensor [count, ..].
pub fn take_rows_cuda(t: &Tensor, start: usize, count: usize) -> Result<Tensor> {
    const OP: &str = "take_rows_cuda";
    let s = t.shape();
    let n = s.first().copied().unwrap_or(0);
    if s.is_empty() || start + count > n {
        return Err(Error::shape(
            OP,
            format!("rows {start}..{} of {s:?}", start + count),
        ));
    }
    let row = s[1..].iter().product::<usize>();
    let src = t.gpu(OP)?;
    let ctx = src.ctx().clone();
    let out = ctx.alloc(count * row)?;
    let from = Arg::Ptr(src.ptr() + (start * row * 4) as u64);
    let len = count * row;
    ctx.launch_1d(
        &CUDA,
        "store_copy_f32",
        len,
        &[out.arg(), from, Arg::I64(len as i64)],
    )?;
    let mut shape = s.to_vec();
    shape[0] = count;
    Tensor::from_gpu(&shape, out)
}
