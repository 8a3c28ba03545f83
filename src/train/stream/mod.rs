//! Streaming Block-AP on a GPU: calibration batches and outputs move between a host activation store
//! (`PinnedStore`: pinned RAM up to `--host-mem`, the rest in a file) and the GPU on a second stream, double
//! buffered, so that the copy of batch i+1 runs while batch i trains (`BatchLoader`), and the outputs of a
//! block go back while the next batch computes (`BatchWriter`). Values travel as f16 (half the PCIe bytes of
//! f32) and are converted on the device by `cuda/store.cu`.
//!
//! Hook into a training loop: `BatchLoader::next` yields the step's tensors already on the device
//! (`train_step` uses device tensors as they are); `StreamedSamples` is that loader as the `BlockSamples`
//! `train_block` reads. `PinnedStreams` puts it all together for `train::pipeline` (`StreamsAt::Pinned`).
pub mod layout;
#[cfg(feature = "cuda")]
mod loader;
#[cfg(feature = "cuda")]
mod pipeline;
#[cfg(feature = "cuda")]
mod samples;
#[cfg(feature = "cuda")]
mod store;
#[cfg(feature = "cuda")]
mod writer;

#[cfg(feature = "cuda")]
pub use cuda::*;

#[cfg(feature = "cuda")]
mod cuda {
    pub use super::loader::{BatchLoader, CopyTiming};
    pub use super::pipeline::PinnedStreams;
    pub use super::samples::StreamedSamples;
    pub use super::store::PinnedStore;
    pub use super::writer::BatchWriter;
    use crate::error::{Error, Result};
    use crate::gpu::{Arg, GpuBuf, GpuContext};
    use crate::tensor::{numel, Storage, Tensor};
    use std::sync::Arc;

    // The store's f16 <-> f32 conversions (cuda/store.cu): the same rounding as the host store's.
    use crate::train::device_store::CUDA;

    /// An f32 tensor of `shape` from the f16 values at byte `off` of `buf` (queued on the compute stream).
    pub fn f16_to_f32(
        ctx: &Arc<GpuContext>,
        buf: &GpuBuf,
        off: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let n = numel(shape);
        if off + 2 * n > 4 * buf.len() {
            return Err(Error::shape(
                "stream_f16_to_f32",
                format!(
                    "{n} f16 values at byte {off} of a {}-byte buffer",
                    4 * buf.len()
                ),
            ));
        }
        let out = ctx.alloc(n)?;
        ctx.launch_1d(
            &CUDA,
            "store_read_f16",
            n,
            &[
                out.arg(),
                Arg::Ptr(buf.ptr() + off as u64),
                Arg::I64(n as i64),
            ],
        )?;
        Tensor::from_gpu(shape, out)
    }

    /// Writes the f32 device tensor `t` as f16 at byte `off` of `dst` (queued on the compute stream).
    pub fn f32_to_f16(t: &Tensor, dst: &mut GpuBuf, off: usize) -> Result<()> {
        let Storage::Cuda(src) = t.storage() else {
            return Err(Error::invalid(
                "stream_f32_to_f16",
                format!("tensor {:?} is not on a GPU", t.shape()),
            ));
        };
        let n = src.len();
        if off + 2 * n > 4 * dst.len() {
            return Err(Error::shape(
                "stream_f32_to_f16",
                format!(
                    "{n} f16 values at byte {off} of a {}-byte buffer",
                    4 * dst.len()
                ),
            ));
        }
        src.ctx().launch_1d(
            &CUDA,
            "store_write_f16",
            n,
            &[
                Arg::Ptr(dst.ptr() + off as u64),
                src.arg(),
                Arg::I64(n as i64),
            ],
        )
    }
}
