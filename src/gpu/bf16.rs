//! bf16 device buffers: the GEMM operands of the bf16 mixed-precision mode (`GpuContext::set_matmul_bf16`).
//!
//! They are scratch, written by a cast or a fused kernel right before the GEMM that reads them; the allocator
//! only deals in f32 slots, so a buffer of n bf16 values takes ceil(n / 2) f32 slots of it.
use super::{Arg, GpuBuf, GpuContext};
use crate::error::Result;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// `len` bf16 values in device memory from the context's cache (a clone is a device copy).
#[derive(Clone, Debug)]
pub struct Bf16Buf {
    buf: GpuBuf,
    len: usize,
}

impl Bf16Buf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ctx(&self) -> &Arc<GpuContext> {
        self.buf.ctx()
    }

    /// Sets every value to +0.
    pub fn zero(&mut self) -> Result<()> {
        self.buf.zero()
    }

    /// The device address, as a kernel argument.
    pub fn arg(&self) -> Arg {
        self.buf.arg()
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// The values widened to f32, on the host (for tests; waits for the stream).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        // Each f32 slot holds two bf16 values, element 2i in the low half (little-endian).
        let slots = self.buf.to_vec()?;
        Ok(slots
            .iter()
            .flat_map(|s| [s.to_bits() << 16, s.to_bits() & 0xffff_0000])
            .map(f32::from_bits)
            .take(self.len)
            .collect())
    }
}

impl GpuContext {
    /// An uninitialised buffer of `n` bf16 values.
    pub fn alloc_bf16(self: &Arc<Self>, n: usize) -> Result<Bf16Buf> {
        Ok(Bf16Buf {
            buf: self.alloc(n.div_ceil(2))?,
            len: n,
        })
    }

    /// With `on`, the linears on this device multiply bf16-rounded operands (f32 accumulation and output)
    /// instead of running true f32 SGEMMs, and attention at head dims 64 and 128 runs its tensor-core kernels
    /// (bf16 operands, f32 accumulation): the bf16 mixed-precision mode. Off by default.
    pub fn set_matmul_bf16(&self, on: bool) {
        self.matmul_bf16.store(on, Ordering::Relaxed);
    }

    pub fn matmul_bf16(&self) -> bool {
        self.matmul_bf16.load(Ordering::Relaxed)
    }
}
