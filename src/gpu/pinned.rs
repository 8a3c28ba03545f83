//! Page-locked host buffers: where E2E-QP keeps what the GPU does not need between two uses (block checkpoints,
//! the scales' AdamW moments), copied in and out on the context's stream.
//!
//! Ordering: `store` and `load` only queue a copy on the context's one stream, so they are ordered with every
//! kernel: a device buffer stored and then dropped (its memory handed to the next kernel) is read by the copy
//! before that kernel runs, and a buffer loaded is written before any later kernel reads it. Host access
//! (`to_vec`, `write`) waits for the stream first, and so does `Drop` before freeing the pages.
use super::{gpu_err, GpuBuf, GpuContext};
use crate::error::{Error, Result};
use std::sync::Arc;

/// `len` f32 values of page-locked host memory, tied to the context whose stream copies them.
pub struct PinnedBuf {
    ptr: *mut f32,
    len: usize,
    ctx: Arc<GpuContext>,
}

// SAFETY: the buffer owns its pages exclusively (like a Box<[f32]>); every access goes through &self / &mut self.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared references only read (`load`, `to_vec`), as for a slice.
unsafe impl Sync for PinnedBuf {}

impl std::fmt::Debug for PinnedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedBuf({} f32 for cuda:{})",
            self.len,
            self.ctx.ordinal()
        )
    }
}

impl GpuContext {
    /// Page-locked host memory for `n` f32, uninitialised (stored into before it is loaded or read).
    pub fn alloc_pinned(self: &Arc<Self>, n: usize) -> Result<PinnedBuf> {
        let ptr = match n {
            0 => std::ptr::NonNull::<f32>::dangling().as_ptr(),
            _ => {
                self.ctx
                    .bind_to_thread()
                    .map_err(|e| gpu_err("pinned alloc")(e.to_string()))?;
                // SAFETY: a plain page-locked allocation of n·4 bytes (flags 0: cached, host-readable); freed in
                // Drop. cuMemHostAlloc returns page-aligned memory, so the f32 pointer is aligned.
                unsafe { cudarc::driver::result::malloc_host(n * 4, 0) }.map_err(|e| {
                    Error::Gpu(format!(
                        "cuda:{}: cannot pin {} bytes of host memory: {e}",
                        self.ordinal(),
                        n * 4
                    ))
                })? as *mut f32
            }
        };
        Ok(PinnedBuf {
            ptr,
            len: n,
            ctx: self.clone(),
        })
    }
}

impl PinnedBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context whose stream copies this buffer.
    pub fn ctx(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    fn check(&self, what: &str, n: usize, ctx: &Arc<GpuContext>) -> Result<()> {
        if n > self.len || !Arc::ptr_eq(ctx, &self.ctx) {
            return Err(Error::invalid(
                "PinnedBuf",
                format!(
                    "{what} {n} values on cuda:{} with {} pinned for cuda:{}",
                    ctx.ordinal(),
                    self.len,
                    self.ctx.ordinal()
                ),
            ));
        }
        self.ctx
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("pinned copy")(e.to_string()))
    }

    /// Queues a copy of `src` into the first `src.len()` values.
    pub fn store(&mut self, src: &GpuBuf) -> Result<()> {
        self.check("store", src.len(), src.ctx())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: src.len() ≤ self.len values of our own pages; the copy runs on the stream that orders every use
        // of src, and host reads of these pages wait for the stream.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(self.ptr, src.len());
            cudarc::driver::result::memcpy_dtoh_async(dst, src.ptr(), self.ctx.stream().cu_stream())
        }
        .map_err(|e| gpu_err("pinned store")(e.to_string()))
    }

    /// Queues a copy of the first `dst.len()` values into `dst`.
    pub fn load(&self, dst: &mut GpuBuf) -> Result<()> {
        self.check("load", dst.len(), dst.ctx())?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: dst.len() ≤ self.len values of our own pages, read by a copy on the stream that orders every use
        // of dst; host writes to these pages (`write`) wait for the stream first.
        unsafe {
            let src = std::slice::from_raw_parts(self.ptr, dst.len());
            cudarc::driver::result::memcpy_htod_async(dst.ptr(), src, self.ctx.stream().cu_stream())
        }
        .map_err(|e| gpu_err("pinned load")(e.to_string()))
    }

    /// The first `n` values, after every queued copy finished.
    pub fn to_vec(&self, n: usize) -> Result<Vec<f32>> {
        self.check("read", n, &self.ctx)?;
        self.ctx.synchronize()?;
        // SAFETY: n ≤ len values of our pages; no copy into them is in flight after the synchronize.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, n) }.to_vec())
    }

    /// Overwrites the first `data.len()` values, after every queued copy finished.
    pub fn write(&mut self, data: &[f32]) -> Result<()> {
        self.check("write", data.len(), &self.ctx)?;
        self.ctx.synchronize()?;
        // SAFETY: as in `to_vec`; &mut self excludes other host access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, data.len()) }.copy_from_slice(data);
        Ok(())
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // A copy may still read or write these pages: wait for the stream before unpinning them. An error here
        // means the context is broken; the pages are freed regardless.
        let _ = self.ctx.synchronize();
        let _ = self.ctx.ctx.bind_to_thread();
        // SAFETY: ptr came from malloc_host in alloc_pinned and is freed once.
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}
