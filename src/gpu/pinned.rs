//! Page-locked host buffers, a second stream for transfers, and events between streams: what copies between
//! host and device need in order to run while the compute stream works (`train::stream`).
//!
//! Ordering rules (the context's module header says the compute stream orders everything else):
//! - A copy on a [`CopyStream`] runs concurrently with the compute stream. Whoever hands a device buffer to a
//!   copy makes the copy stream wait for the compute stream's last use of it ([`CopyStream::wait`] on an event
//!   of [`GpuContext::record`]), and the compute stream wait for the copy before reading what it wrote.
//! - A [`PinnedBuf`] remembers the last copy queued on each stream that touches it; host access to it
//!   ([`PinnedBuf::as_slice`], [`PinnedBuf::as_mut_slice`]) first waits for those copies, so the host never reads
//!   a buffer a copy is still writing nor writes one a copy is still reading.
//!
//! Pinned memory is allocated without the write-combined flag: the host reads it back (the store's outputs).
use super::{gpu_err, GpuBuf, GpuContext};
use crate::error::{Error, Result};
use cudarc::driver::{result, sys, CudaEvent, CudaStream};
use std::sync::Arc;

/// A point in a stream's work, for another stream or the host to wait on; timed (see [`GpuEvent::elapsed_ms`]).
pub struct GpuEvent(CudaEvent);

impl GpuEvent {
    fn on(stream: &CudaStream) -> Result<GpuEvent> {
        // Timing enabled: copies are measured with these events (the cost is a timestamp per record).
        stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map(GpuEvent)
            .map_err(|e| gpu_err("recording an event")(e.to_string()))
    }

    /// Blocks the calling thread until the work before the event has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.0
            .synchronize()
            .map_err(|e| gpu_err("waiting for an event")(e.to_string()))
    }

    /// Milliseconds from `self` to `end` (waits for both).
    pub fn elapsed_ms(&self, end: &GpuEvent) -> Result<f32> {
        self.0
            .elapsed_ms(&end.0)
            .map_err(|e| gpu_err("timing events")(e.to_string()))
    }
}

impl GpuContext {
    /// An event after everything queued so far on the compute stream.
    pub fn record(&self) -> Result<GpuEvent> {
        GpuEvent::on(self.stream())
    }

    /// Makes the compute stream wait (on the device) for the work before `e`.
    pub fn wait(&self, e: &GpuEvent) -> Result<()> {
        self.stream()
            .wait(&e.0)
            .map_err(|e| gpu_err("compute stream waiting for an event")(e.to_string()))
    }

    /// Device memory in use on the whole GPU (the driver's total − free: this process's pool, context,
    /// modules and library workspaces, and any other process's), in bytes.
    pub fn device_memory_used(&self) -> Result<usize> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(|e| gpu_err("cuMemGetInfo")(e.to_string()))?;
        Ok(total - free)
    }

    /// `bytes` of page-locked host memory (uninitialised until written; zeroed here, so that it is).
    pub fn alloc_pinned(self: &Arc<Self>, bytes: usize) -> Result<PinnedBuf> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("pinned allocation")(e.to_string()))?;
        let ptr = match bytes {
            0 => std::ptr::NonNull::dangling().as_ptr(),
            // SAFETY: cuMemHostAlloc with no flags returns `bytes` of page-locked memory owned by this buffer
            // until Drop frees it.
            _ => unsafe { result::malloc_host(bytes, 0) }.map_err(|e| {
                Error::Gpu(format!(
                    "cuda:{}: cannot pin {bytes} bytes of host memory: {e}",
                    self.ordinal()
                ))
            })? as *mut u8,
        };
        let mut b = PinnedBuf {
            ptr,
            bytes,
            pending: Vec::new(),
            _ctx: self.clone(),
        };
        b.as_mut_slice()?.fill(0);
        Ok(b)
    }

    /// A new stream for transfers (non-blocking: it never waits for the compute stream unless told to).
    pub fn copy_stream(self: &Arc<Self>) -> Result<CopyStream> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| gpu_err("creating a copy stream")(e.to_string()))?;
        Ok(CopyStream {
            stream,
            ctx: self.clone(),
        })
    }
}

/// Page-locked host memory, freed on drop (after the copies that use it have finished).
pub struct PinnedBuf {
    ptr: *mut u8,
    bytes: usize,
    /// The last copy touching this buffer on each stream (by stream handle).
    pending: Vec<(usize, GpuEvent)>,
    /// Keeps the CUDA context alive until Drop has freed the memory.
    _ctx: Arc<GpuContext>,
}

// SAFETY: the buffer owns its allocation; host access goes through &self / &mut self (after waiting for the
// device's copies), so moving it to another thread moves the only access path.
unsafe impl Send for PinnedBuf {}

impl std::fmt::Debug for PinnedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedBuf({} bytes)", self.bytes)
    }
}

impl PinnedBuf {
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn wait_copies(&mut self) -> Result<()> {
        for (_, e) in self.pending.drain(..) {
            e.synchronize()?;
        }
        Ok(())
    }

    /// The bytes, once every copy queued on them has finished.
    pub fn as_slice(&mut self) -> Result<&[u8]> {
        self.wait_copies()?;
        // SAFETY: ptr holds `bytes` initialised bytes (zeroed at allocation) that no copy is using any more.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) })
    }

    /// The bytes for writing, once every copy queued on them has finished.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        self.wait_copies()?;
        // SAFETY: as in as_slice; &mut self makes this the only host access.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) })
    }

    fn check(&self, op: &'static str, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(Error::invalid(
                op,
                format!("bytes {off}..+{len} of a {}-byte pinned buffer", self.bytes),
            )),
        }
    }

    fn remember(&mut self, stream: &CudaStream) -> Result<()> {
        let key = stream.cu_stream() as usize;
        let e = GpuEvent::on(stream)?;
        match self.pending.iter_mut().find(|(k, _)| *k == key) {
            // Stream order: the new event comes after the copy the old one marked.
            Some(slot) => slot.1 = e,
            None => self.pending.push((key, e)),
        }
        Ok(())
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // Copies still reading or writing must finish before the memory goes back; errors here cannot be
        // reported (the context records them for its next call).
        let _ = self.wait_copies();
        if self.bytes > 0 {
            // SAFETY: ptr came from cuMemHostAlloc in alloc_pinned and no copy uses it any more.
            let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
        }
    }
}

/// A second stream of the context, for host<->device copies.
pub struct CopyStream {
    stream: Arc<CudaStream>,
    ctx: Arc<GpuContext>,
}

fn check_dev(op: &'static str, buf: &GpuBuf, off: usize, len: usize) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= buf.len() * 4 => Ok(()),
        _ => Err(Error::invalid(
            op,
            format!(
                "bytes {off}..+{len} of a {}-byte device buffer",
                buf.len() * 4
            ),
        )),
    }
}

impl CopyStream {
    /// An event after everything queued so far on this stream.
    pub fn record(&self) -> Result<GpuEvent> {
        GpuEvent::on(&self.stream)
    }

    /// Makes this stream wait (on the device) for the work before `e`.
    pub fn wait(&self, e: &GpuEvent) -> Result<()> {
        self.stream
            .wait(&e.0)
            .map_err(|e| gpu_err("copy stream waiting for an event")(e.to_string()))
    }

    /// Blocks until everything queued on this stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| gpu_err("copy stream synchronize")(e.to_string()))
    }

    /// Queues a copy of `len` bytes from `src` at `src_off` into `dst` at byte `dst_off`. The caller has made
    /// this stream wait for the compute stream's last use of that part of `dst` (module header).
    pub fn htod(
        &self,
        src: &mut PinnedBuf,
        src_off: usize,
        dst: &mut GpuBuf,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        src.check("CopyStream::htod", src_off, len)?;
        check_dev("CopyStream::htod", dst, dst_off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.ctx
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("htod")(e.to_string()))?;
        // SAFETY: both ranges were checked to lie inside their buffers; the host bytes stay valid and unwritten
        // until `remember`'s event has passed (host access waits for it, Drop too); the device range is the
        // caller's to write on this stream (see the doc comment).
        unsafe {
            let host = std::slice::from_raw_parts(src.ptr.add(src_off), len);
            result::memcpy_htod_async(dst.ptr() + dst_off as u64, host, self.stream.cu_stream())
        }
        .map_err(|e| gpu_err("htod")(e.to_string()))?;
        src.remember(&self.stream)
    }

    /// Queues a copy of `len` bytes from `src` at byte `src_off` into `dst` at `dst_off`. The caller has made
    /// this stream wait for the compute stream's writes of that part of `src`.
    pub fn dtoh(
        &self,
        src: &GpuBuf,
        src_off: usize,
        dst: &mut PinnedBuf,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        dst.check("CopyStream::dtoh", dst_off, len)?;
        check_dev("CopyStream::dtoh", src, src_off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.ctx
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("dtoh")(e.to_string()))?;
        // SAFETY: as in htod; the host range is not read or written by the host until the event has passed.
        unsafe {
            let host = std::slice::from_raw_parts_mut(dst.ptr.add(dst_off), len);
            result::memcpy_dtoh_async(host, src.ptr() + src_off as u64, self.stream.cu_stream())
        }
        .map_err(|e| gpu_err("dtoh")(e.to_string()))?;
        dst.remember(&self.stream)
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        // Buffers the copies use may be dropped right after the stream (and go back to the compute stream's
        // allocator): let the copies finish first.
        let _ = self.stream.synchronize();
    }
}

/// `len` f32 values of page-locked host memory whose copies run on the context's compute stream: where E2E-QP
/// keeps what the GPU does not need between two uses (scale gradients, AdamW moments).
/// Being on the compute stream, `store` and `load` are ordered with every kernel: a device buffer stored and then
/// dropped (its memory handed to the next kernel) is read before that kernel runs, and a buffer loaded is
/// written before any later kernel reads it. Host access (`to_vec`, `write`) and Drop wait for the compute
/// stream first, so they never meet a copy in flight.
pub struct PinnedF32 {
    buf: PinnedBuf,
    len: usize,
    ctx: Arc<GpuContext>,
}

impl std::fmt::Debug for PinnedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedF32({} f32 for cuda:{})",
            self.len,
            self.ctx.ordinal()
        )
    }
}

impl GpuContext {
    /// Page-locked host memory for `n` f32 (zeroed), copied on this context's compute stream.
    pub fn alloc_pinned_f32(self: &Arc<Self>, n: usize) -> Result<PinnedF32> {
        Ok(PinnedF32 {
            buf: self.alloc_pinned(n * 4)?,
            len: n,
            ctx: self.clone(),
        })
    }
}

impl PinnedF32 {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context whose compute stream copies this buffer.
    pub fn ctx(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    fn check(&self, what: &str, n: usize, ctx: &Arc<GpuContext>) -> Result<()> {
        if n > self.len || !Arc::ptr_eq(ctx, &self.ctx) {
            return Err(Error::invalid(
                "PinnedF32",
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
        // SAFETY: src.len() ≤ len values of our own pages; the copy runs on the stream that orders every use of
        // src, and host access and Drop wait for that stream.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(self.buf.ptr as *mut f32, src.len());
            result::memcpy_dtoh_async(dst, src.ptr(), self.ctx.stream().cu_stream())
        }
        .map_err(|e| gpu_err("pinned store")(e.to_string()))
    }

    /// Queues a copy of the first `dst.len()` values into `dst`.
    pub fn load(&self, dst: &mut GpuBuf) -> Result<()> {
        self.check("load", dst.len(), dst.ctx())?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: dst.len() ≤ len values of our own pages, read by a copy on the stream that orders every use of
        // dst; host writes (`write`) and Drop wait for that stream first.
        unsafe {
            let src = std::slice::from_raw_parts(self.buf.ptr as *const f32, dst.len());
            result::memcpy_htod_async(dst.ptr(), src, self.ctx.stream().cu_stream())
        }
        .map_err(|e| gpu_err("pinned load")(e.to_string()))
    }

    /// The first `n` values, after every queued copy finished.
    pub fn to_vec(&self, n: usize) -> Result<Vec<f32>> {
        self.check("read", n, &self.ctx)?;
        self.ctx.synchronize()?;
        // SAFETY: n ≤ len values of our pages (zeroed at allocation); no copy is in flight after the synchronize
        // and &self excludes host writes.
        Ok(unsafe { std::slice::from_raw_parts(self.buf.ptr as *const f32, n) }.to_vec())
    }

    /// Overwrites the first `data.len()` values, after every queued copy finished.
    pub fn write(&mut self, data: &[f32]) -> Result<()> {
        self.check("write", data.len(), &self.ctx)?;
        self.ctx.synchronize()?;
        self.buf.as_mut_slice()?[..4 * data.len()].copy_from_slice(bytemuck::cast_slice(data));
        Ok(())
    }
}

impl Drop for PinnedF32 {
    fn drop(&mut self) {
        // A copy on the compute stream may still use the pages: wait for it before the inner buffer frees them
        // (an error means the context is broken; the pages are freed regardless).
        let _ = self.ctx.synchronize();
    }
}
