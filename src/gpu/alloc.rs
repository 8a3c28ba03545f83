//! The caching device allocator: freed buffers go to a free list per size class and the next request of that
//! class takes one back, so a training loop stops calling cuMemAlloc after its first step.
//!
//! Size classes (bytes): up to 1 MiB the next power of two (at least 512); above, the next multiple of 1/16 of
//! the enclosing power of two (8 classes per octave), so a buffer wastes less than 1/8 of its size. Only an exact
//! class is reused.
//! When the driver is out of memory the cache is released and the request retried once.
use super::{gpu_err, Arg, GpuContext};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr};
use std::collections::HashMap;
use std::sync::Arc;

const SMALL_MAX: usize = 1 << 20;
const MIN_CLASS: usize = 512;

/// The bytes actually reserved for a request of `bytes` (see the module header); 0 for 0.
pub fn size_class(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else if bytes <= SMALL_MAX {
        bytes.next_power_of_two().max(MIN_CLASS)
    } else {
        let step = bytes.next_power_of_two() / 16;
        bytes.div_ceil(step) * step
    }
}

/// Allocator counters, in bytes of whole size classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by live buffers now, and the most ever held at once.
    pub in_use: usize,
    pub peak_in_use: usize,
    /// In use plus cached free buffers (what the driver has given us), and its peak.
    pub reserved: usize,
    pub peak_reserved: usize,
    /// Requests served by cuMemAlloc, and by a cached buffer.
    pub driver_allocs: u64,
    pub reuses: u64,
}

#[derive(Default)]
pub(crate) struct Pool {
    free: HashMap<usize, Vec<CudaSlice<f32>>>,
    stats: MemoryStats,
}

impl Pool {
    fn take(&mut self, class: usize) -> Option<CudaSlice<f32>> {
        let s = self.free.get_mut(&class)?.pop()?;
        self.stats.reuses += 1;
        self.stats.in_use += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Some(s)
    }

    fn record_new(&mut self, class: usize) {
        self.stats.driver_allocs += 1;
        self.stats.in_use += class;
        self.stats.reserved += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
    }

    fn give(&mut self, class: usize, s: CudaSlice<f32>) {
        self.stats.in_use -= class;
        self.free.entry(class).or_default().push(s);
    }

    /// Drops every cached buffer (cuMemFreeAsync on the stream) and returns the bytes released.
    fn release(&mut self) -> usize {
        let bytes: usize = self.free.iter().map(|(c, v)| c * v.len()).sum();
        self.free.clear();
        self.stats.reserved -= bytes;
        bytes
    }
}

/// A device buffer of `len` f32 values from the context's cache; dropping it hands the memory back to the cache.
pub struct GpuBuf {
    /// None only for a zero-length buffer (no device memory behind it).
    slice: Option<CudaSlice<f32>>,
    ptr: u64,
    len: usize,
    class: usize,
    ctx: Arc<GpuContext>,
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf({} f32 on cuda:{})", self.len, self.ctx.ordinal())
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.ctx.pool().give(self.class, s);
        }
    }
}

/// Clones on the device (allocate + copy). Like `Vec::clone`, it cannot report failure: it panics if the device
/// is out of memory or the context is broken. Use [`GpuBuf::try_clone`] to get the error.
impl Clone for GpuBuf {
    fn clone(&self) -> Self {
        self.try_clone()
            .unwrap_or_else(|e| panic!("cloning a device tensor: {e}"))
    }
}

impl GpuContext {
    /// An uninitialised buffer of `n` f32 (NaN-filled when poisoning is on).
    pub fn alloc(self: &Arc<Self>, n: usize) -> Result<GpuBuf> {
        let class = size_class(n * 4);
        // The pool's guard must be gone before alloc_from_driver locks it again (a temporary in an `if let`
        // scrutinee would live through the else branch).
        let cached = match class {
            0 => None,
            _ => self.pool().take(class),
        };
        let slice = match (class, cached) {
            (0, _) => None,
            (_, Some(s)) => Some(s),
            (_, None) => Some(self.alloc_from_driver(class)?),
        };
        let ptr = match &slice {
            Some(s) => s.device_ptr(self.stream()).0,
            None => 0,
        };
        let mut buf = GpuBuf {
            slice,
            ptr,
            len: n,
            class,
            ctx: self.clone(),
        };
        if self.poison() {
            buf.fill_bytes(0xFF)?; // 0xFFFFFFFF is a NaN
        }
        Ok(buf)
    }

    fn alloc_from_driver(&self, class: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: uninitialised device memory is never read before a kernel or copy writes it (launchers write
        // every output element; `zeros` clears it).
        let first = unsafe { self.stream().alloc::<f32>(class / 4) };
        let s = match first {
            Ok(s) => s,
            Err(_) => {
                // Out of memory is the usual cause: give the cache back to the driver and try once more.
                self.pool().release();
                // SAFETY: as above.
                unsafe { self.stream().alloc::<f32>(class / 4) }.map_err(|e| {
                    Error::Gpu(format!(
                        "cuda:{}: cannot allocate {class} bytes ({:?}): {e}",
                        self.ordinal(),
                        self.memory_stats()
                    ))
                })?
            }
        };
        self.pool().record_new(class);
        Ok(s)
    }

    /// A zeroed buffer of `n` f32.
    pub fn zeros(self: &Arc<Self>, n: usize) -> Result<GpuBuf> {
        let mut b = self.alloc(n)?;
        b.fill_bytes(0)?;
        Ok(b)
    }

    /// A buffer holding a copy of `host`.
    pub fn upload(self: &Arc<Self>, host: &[f32]) -> Result<GpuBuf> {
        let mut b = self.alloc(host.len())?;
        if let Some(s) = b.slice.as_mut() {
            let mut dst = s.slice_mut(..host.len());
            self.stream()
                .memcpy_htod(host, &mut dst)
                .map_err(|e| gpu_err("upload")(e.to_string()))?;
        }
        Ok(b)
    }

    /// A buffer holding the bits of `words` (token ids, targets, packed integers): kernels read it as
    /// `unsigned int*` or `int*`. The bytes are copied unchanged, never converted.
    pub fn upload_bits(self: &Arc<Self>, words: &[u32]) -> Result<GpuBuf> {
        self.upload(bytemuck::cast_slice(words))
    }

    pub fn memory_stats(&self) -> MemoryStats {
        self.pool().stats
    }

    /// Starts the peak counters again from the current usage (to measure one phase's peak).
    pub fn reset_peak(&self) {
        let mut p = self.pool();
        p.stats.peak_in_use = p.stats.in_use;
        p.stats.peak_reserved = p.stats.reserved;
    }

    /// Frees every cached buffer; returns the bytes given back to the driver.
    pub fn empty_cache(&self) -> usize {
        self.pool().release()
    }
}

impl GpuBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ctx(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// The device address, as a kernel argument.
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Its `len` values as a cudarc view (None for a zero-length buffer), for libraries that take one (NCCL).
    pub(crate) fn view_mut(&mut self) -> Option<CudaViewMut<'_, f32>> {
        let len = self.len;
        self.slice.as_mut().map(|s| s.slice_mut(..len))
    }

    /// Copies the values to the host (waits for the stream).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        let Some(s) = &self.slice else {
            return Ok(Vec::new());
        };
        let mut out = vec![0.0f32; self.len];
        self.ctx
            .stream()
            .memcpy_dtoh(&s.slice(..self.len), &mut out)
            .map_err(|e| gpu_err("copy to host")(e.to_string()))?;
        Ok(out)
    }

    /// Overwrites self with `src` (same length).
    pub fn copy_from(&mut self, src: &GpuBuf) -> Result<()> {
        if src.len != self.len {
            return Err(Error::invalid(
                "GpuBuf::copy_from",
                format!("{} values into {}", src.len, self.len),
            ));
        }
        if let (Some(d), Some(s)) = (self.slice.as_mut(), src.slice.as_ref()) {
            self.ctx
                .stream()
                .memcpy_dtod(&s.slice(..src.len), &mut d.slice_mut(..src.len))
                .map_err(|e| gpu_err("device copy")(e.to_string()))?;
        }
        Ok(())
    }

    pub fn try_clone(&self) -> Result<GpuBuf> {
        let mut b = self.ctx.alloc(self.len)?;
        b.copy_from(self)?;
        Ok(b)
    }

    /// Sets every value to 0.
    pub fn zero(&mut self) -> Result<()> {
        self.fill_bytes(0)
    }

    fn fill_bytes(&mut self, byte: u8) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        self.ctx
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("memset")(e.to_string()))?;
        // SAFETY: ptr and len describe this buffer's own live allocation (len * 4 <= class bytes), and the memset
        // is queued on the stream that orders every other use of it.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                self.ptr,
                byte,
                self.len * 4,
                self.ctx.stream().cu_stream(),
            )
        }
        .map_err(|e| gpu_err("memset")(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_cover_the_request_with_bounded_waste() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(SMALL_MAX), SMALL_MAX);
        // 1 MiB + 1 lies in (1, 2] MiB, whose classes step by 2 MiB / 16 = 128 KiB.
        assert_eq!(size_class(SMALL_MAX + 1), SMALL_MAX + (128 << 10));
        let mut prev = 0;
        for bytes in (1..200).map(|i| i * 37_000 + i * i * 91_117) {
            let c = size_class(bytes);
            assert!(c >= bytes && c >= prev, "{bytes} -> {c}");
            if bytes > SMALL_MAX {
                assert!((c - bytes) * 8 <= bytes, "{bytes} -> {c} wastes over 1/8");
            }
            assert_eq!(size_class(c), c, "a class is its own class");
            prev = c;
        }
    }
}
