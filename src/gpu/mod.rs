//! The CUDA backend's plumbing (no kernels here): the device context and its one stream, NVRTC compilation of
//! `cuda/<op>.cu` with a per-(op, arch) cache, kernel launches, the cuBLAS handle and the caching allocator.
//!
//! Kernels live beside their op: `src/ops/rmsnorm.rs` declares `KernelSource { op: "rmsnorm", code:
//! include_str!("../../cuda/rmsnorm.cu") }` and launches `rmsnorm_fwd_f32` through [`GpuContext::launch`].
//!
//! Ordering: everything (kernels, cuBLAS, copies, frees) runs on the context's single stream, so stream order is
//! the only synchronisation needed: a buffer handed back to the allocator and reused by the next kernel is only
//! touched after every earlier use finished. Copies to the host wait for the stream.
//!
//! cudarc loads libcuda, libnvrtc and libcublas at run time (`dynamic-loading`): without them `GpuContext::new`
//! returns `no CUDA device: <reason>` and everything on the CPU works as before.
mod alloc;
mod bf16;
mod blas;
mod compile;
mod pinned;

pub use alloc::{size_class, GpuBuf, MemoryStats};
pub use bf16::Bf16Buf;
pub use compile::{cached_ptx_count, KernelSource};
pub use pinned::{CopyStream, GpuEvent, PinnedBuf, PinnedF32};

use crate::error::{Error, Result};
use crate::tensor::{Storage, Tensor};
use alloc::Pool;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    sys::{CUdevice_attribute, CUfunction_attribute},
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One GPU: its context, the stream all work goes to, a cuBLAS handle bound to that stream, loaded kernels and
/// the buffer cache. Shared as `Arc<GpuContext>` by every device tensor made on it.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    ordinal: usize,
    name: String,
    /// `sm_XX` from the compute capability: what NVRTC compiles for.
    arch: String,
    sm_count: u32,
    /// Loaded modules by op, and functions by kernel name (each kernel name is unique across cuda/).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    pool: Mutex<Pool>,
    /// Fill every new uninitialised buffer with NaN (tests: an output element a kernel forgets to write fails).
    poison: AtomicBool,
    /// The bf16 mixed-precision mode of the linears (`set_matmul_bf16`).
    matmul_bf16: AtomicBool,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({}, {})", self.ordinal, self.name, self.arch)
    }
}

/// A kernel argument: device pointers go by value as `u64` (0 is a null pointer: an output the kernel skips).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I64(i64),
    U64(u64),
    I32(i32),
    F32(f32),
}

impl Arg {
    /// A null pointer: the kernel skips the output it stands for.
    pub const NULL: Arg = Arg::Ptr(0);
}

/// Every `cuda/<op>.cu` of the crate (for warming the compile cache and for compile checks).
pub fn kernel_sources() -> [KernelSource; 22] {
    [
        crate::bench::random::CUDA,
        crate::ops::add::CUDA,
        crate::ops::attention::CUDA,
        crate::ops::attention::CUDA_BF16,
        crate::ops::cross_entropy::cuda::CUDA,
        crate::ops::embedding::CUDA,
        crate::ops::linear::CUDA,
        crate::ops::mse::CUDA,
        crate::ops::mul::CUDA,
        crate::ops::rmsnorm::CUDA,
        crate::ops::rope::CUDA,
        crate::ops::scale::CUDA,
        crate::ops::silu::CUDA,
        crate::ops::softmax::CUDA,
        crate::ops::sum::CUDA,
        crate::ops::swiglu::CUDA,
        crate::ops::transpose::CUDA,
        crate::quant::fake_quant::CUDA,
        crate::quant::real_quant::cuda::CUDA,
        crate::train::adamw::CUDA,
        crate::train::clip::CUDA,
        crate::train::device_store::CUDA,
    ]
}

/// The pointer of an optional output, or null when the gradient is not wanted.
pub fn opt_arg(b: &Option<&mut GpuBuf>) -> Arg {
    b.as_ref().map_or(Arg::NULL, |b| b.arg())
}

/// Dynamic shared memory a launch gets without opting in.
const DEFAULT_SHARED_MEM: u32 = 48 << 10;

/// Threads per block of the 1-D kernels.
pub const BLOCK: u32 = 256;

fn no_device(reason: impl std::fmt::Display) -> Error {
    Error::Gpu(format!("no CUDA device: {reason}"))
}

/// Turns a driver/cuBLAS error into ours, naming what failed.
pub(crate) fn gpu_err(what: impl std::fmt::Display) -> impl FnOnce(String) -> Error {
    move |e| Error::Gpu(format!("{what}: {e}"))
}

impl GpuContext {
    /// Opens device `ordinal`. Errors `no CUDA device: <reason>` when the driver library, NVRTC or cuBLAS cannot
    /// be loaded, no device is present, or the ordinal is out of range.
    pub fn new(ordinal: usize) -> Result<Arc<GpuContext>> {
        // SAFETY: these only try to dlopen the libraries (cudarc would panic on a later call without them).
        let (has_cuda, has_nvrtc, has_cublas) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
                cudarc::cublas::sys::is_culib_present(),
            )
        };
        for (present, lib) in [
            (has_cuda, "libcuda (the NVIDIA driver)"),
            (has_nvrtc, "libnvrtc"),
            (has_cublas, "libcublas"),
        ] {
            if !present {
                return Err(no_device(format!("{lib} could not be loaded")));
            }
        }
        let count = CudaContext::device_count().map_err(no_device)?;
        if ordinal >= count.max(0) as usize {
            return Err(no_device(format!(
                "ordinal {ordinal} requested, {count} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(no_device)?;
        // SAFETY: all work goes to one stream, whose order already serialises every use of every buffer, so
        // cudarc's per-buffer events (two per allocation) would only add overhead.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(no_device)?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(no_device)? as u32;
        let name = ctx.name().map_err(no_device)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| no_device(format!("cuBLAS: {e}")))?;
        Ok(Arc::new(GpuContext {
            ctx,
            stream,
            blas,
            ordinal,
            name,
            arch: format!("sm_{major}{minor}"),
            sm_count,
            modules: Mutex::default(),
            functions: Mutex::default(),
            pool: Mutex::default(),
            poison: AtomicBool::new(false),
            matmul_bf16: AtomicBool::new(false),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The NVRTC target, `sm_XX`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (free, total) bytes of device memory as the driver counts them: the allocator's cached buffers are used.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| Error::Gpu(format!("cuda:{} memory info: {e}", self.ordinal)))
    }

    /// Waits for all queued work; reports an asynchronous kernel fault (an illegal address, say) if one happened.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::Gpu(format!("cuda:{} synchronize: {e}", self.ordinal)))
    }

    /// With `on`, new uninitialised buffers are filled with NaN so that unwritten outputs cannot pass a check.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    pub(crate) fn poison(&self) -> bool {
        self.poison.load(Ordering::Relaxed)
    }

    pub(crate) fn pool(&self) -> MutexGuard<'_, Pool> {
        // A panic while the pool was locked leaves it consistent (every method updates it in one step).
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kernel of `src` by name, compiling and loading the module on first use.
    pub fn function(&self, src: &KernelSource, kernel: &'static str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(kernel) {
            return Ok(f.clone());
        }
        let module = self.module(src)?;
        let f = module
            .load_function(kernel)
            .map_err(|e| Error::Gpu(format!("cuda/{}.cu: kernel {kernel}: {e}", src.op)))?;
        functions.insert(kernel, f.clone());
        Ok(f)
    }

    /// The loaded module of `src` (PTX from the process-wide (op, arch) cache, compiled there on first use).
    pub fn module(&self, src: &KernelSource) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(src.op) {
            return Ok(m.clone());
        }
        let ptx = compile::ptx(src, &self.arch)?;
        let m = self
            .ctx
            .load_module(ptx)
            .map_err(|e| Error::Gpu(format!("cuda/{}.cu: loading the module: {e}", src.op)))?;
        modules.insert(src.op, m.clone());
        Ok(m)
    }

    /// Launches `kernel` of `src` with `args` in order. A zero-sized grid launches nothing.
    pub fn launch(
        &self,
        src: &KernelSource,
        kernel: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = self.function(src, kernel)?;
        if shared_mem_bytes > DEFAULT_SHARED_MEM {
            // A block gets more than 48 KiB of dynamic shared memory only after opting in per function.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_mem_bytes as i32,
            )
            .map_err(|e| {
                Error::Gpu(format!(
                    "{kernel}: {shared_mem_bytes} bytes of shared memory: {e}"
                ))
            })?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I64(v) => b.arg(v),
                Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes,
        };
        // SAFETY: each launcher in src/ops passes the kernel's parameters in the order and types its extern "C"
        // signature declares, with pointers to live buffers of the lengths the kernel indexes (the launchers
        // check shapes first); the values `b` points to live in `args` until the launch has copied them.
        unsafe { b.launch(cfg) }
            .map_err(|e| Error::Gpu(format!("launch of {kernel} (cuda/{}.cu): {e}", src.op)))?;
        Ok(())
    }

    /// A 1-D launch of `BLOCK` threads per block covering `n` items with a grid-stride loop: at most 32 blocks
    /// per SM, enough to fill the chip, so the kernel loops when n is larger.
    pub fn launch_1d(
        &self,
        src: &KernelSource,
        kernel: &'static str,
        n: usize,
        args: &[Arg],
    ) -> Result<()> {
        let blocks = n.div_ceil(BLOCK as usize).min(32 * self.sm_count as usize) as u32;
        self.launch(src, kernel, (blocks, 1, 1), (BLOCK, 1, 1), 0, args)
    }
}

/// Where an op runs: None when every tensor is on the host, the common context when every one is on the same
/// GPU; an error naming the op when they are mixed.
pub fn device_of(op: &'static str, tensors: &[&Tensor]) -> Result<Option<Arc<GpuContext>>> {
    let ctx = |t: &Tensor| match t.storage() {
        Storage::Cuda(b) => Some(b.ctx().clone()),
        Storage::CudaBf16(b) => Some(b.ctx().clone()),
        _ => None,
    };
    let first = tensors.first().and_then(|t| ctx(t));
    for (i, t) in tensors.iter().enumerate() {
        let here = ctx(t);
        let same = match (&first, &here) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if !same {
            return Err(Error::Storage {
                op,
                msg: format!(
                    "input 0 is on {} but input {i} on {}: move them to one device first",
                    tensors[0].device_name(),
                    t.device_name()
                ),
            });
        }
    }
    Ok(first)
}
