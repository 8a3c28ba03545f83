//! The block inputs that E2E-QP's activation checkpointing keeps between the forward and the backward of a
//! sequence: on the host they stay in a `Vec`; for a GPU run they go to page-locked host memory as each block's
//! forward produces them and come back one at a time for the block's recomputation, so the GPU holds one
//! block's input instead of every block's (L·T·C f32: 10 GiB for Llama-2-70B at T = 4096). The copies are exact,
//! so the training computes the same values either way, and the pinned buffers are kept from one sequence to the
//! next.
//!
//! The copies run on a second stream (`CopyStream`) while the blocks compute: a stored input is copied out while
//! the next block's forward runs (its device buffer is released once the compute stream has waited for that
//! copy), and when the backward takes an input the one before it is already being copied back for the next block
//! (into a buffer the copy stream writes only after the compute stream's earlier work). Queued on the compute
//! stream itself, the copies of a Llama-2-7B step (32 blocks × 64 MiB each way) held the kernels up for ~80 ms.
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Default)]
pub struct BlockInputs {
    /// Inputs held as they are (host tensors, or a GPU run without offloading).
    held: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    offload: bool,
    /// The page-locked copies of GPU inputs and the stream that makes them.
    #[cfg(feature = "cuda")]
    pinned: Option<gpu::PinnedInputs>,
    len: usize,
}

impl BlockInputs {
    /// With `offload`, inputs that live on a GPU are kept in pinned host memory (module docs).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn new(offload: bool) -> BlockInputs {
        BlockInputs {
            #[cfg(feature = "cuda")]
            offload,
            ..BlockInputs::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the input of the next block.
    pub fn push(&mut self, x: Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.offload && x.is_cuda() {
            let ctx = x.gpu("e2e_qp checkpoint")?.ctx().clone();
            if self.pinned.is_none() {
                self.pinned = Some(gpu::PinnedInputs::new(&ctx)?);
            }
            let pinned = self.pinned.as_mut().expect("made above");
            pinned.store(self.len, x)?;
            self.len += 1;
            return Ok(());
        }
        self.held.push(x);
        self.len += 1;
        Ok(())
    }

    /// Gives back the last input kept (on the device it was on) and forgets it.
    pub fn pop(&mut self) -> Result<Tensor> {
        if self.len == 0 {
            return Err(Error::invalid("e2e_qp", "no block input left to recompute"));
        }
        self.len -= 1;
        // A sequence's inputs all live on one device, so either all of them are held or all are pinned.
        #[cfg(feature = "cuda")]
        if self.held.is_empty() {
            if let Some(p) = self.pinned.as_mut() {
                return p.take(self.len);
            }
        }
        self.held
            .pop()
            .ok_or_else(|| Error::invalid("e2e_qp", "block inputs out of order"))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use crate::error::{Error, Result};
    use crate::gpu::{CopyStream, GpuContext, GpuEvent, PinnedBuf};
    use crate::tensor::Tensor;
    use std::sync::Arc;

    /// Pinned copies of one sequence's block inputs, by block (module docs of the parent).
    pub(super) struct PinnedInputs {
        ctx: Arc<GpuContext>,
        copy: CopyStream,
        /// Host copies and the shapes of the inputs they hold.
        host: Vec<(PinnedBuf, Vec<usize>)>,
        /// The input whose copy out is in flight, with the event after that copy: its device memory must not go
        /// back to the allocator before the compute stream has waited for the event.
        storing: Option<(Tensor, GpuEvent)>,
        /// The input being copied back for the next `take` (block index, tensor, event after the copy).
        loading: Option<(usize, Tensor, GpuEvent)>,
    }

    impl PinnedInputs {
        pub(super) fn new(ctx: &Arc<GpuContext>) -> Result<PinnedInputs> {
            Ok(PinnedInputs {
                ctx: ctx.clone(),
                copy: ctx.copy_stream()?,
                host: Vec::new(),
                storing: None,
                loading: None,
            })
        }

        /// Releases the input whose copy out was queued last, once the compute stream is ordered after it.
        fn release_stored(&mut self) -> Result<()> {
            if let Some((x, done)) = self.storing.take() {
                self.ctx.wait(&done)?;
                drop(x);
            }
            Ok(())
        }

        /// Copies input `i` (produced by the compute stream's work so far) out on the copy stream.
        pub(super) fn store(&mut self, i: usize, x: Tensor) -> Result<()> {
            self.release_stored()?;
            if i > self.host.len() {
                return Err(Error::invalid(
                    "e2e_qp",
                    format!("block input {i} stored out of order"),
                ));
            }
            let buf = x.gpu("e2e_qp checkpoint")?;
            let bytes = buf.len() * 4;
            if self.host.get(i).is_none_or(|(p, _)| p.len() < bytes) {
                let p = self.ctx.alloc_pinned(bytes)?;
                match self.host.get_mut(i) {
                    Some(slot) => slot.0 = p,
                    None => self.host.push((p, Vec::new())),
                }
            }
            let (host, shape) = &mut self.host[i];
            *shape = x.shape().to_vec();
            self.copy.wait(&self.ctx.record()?)?;
            self.copy.dtoh(buf, 0, host, 0, bytes)?;
            self.storing = Some((x, self.copy.record()?));
            Ok(())
        }

        /// Queues the copy of input `i` back to the device.
        fn load(&mut self, i: usize) -> Result<(usize, Tensor, GpuEvent)> {
            let (host, shape) = &mut self.host[i];
            let mut buf = self.ctx.alloc(crate::tensor::numel(shape))?;
            // The new buffer's memory may have served compute work queued so far: copy after it.
            self.copy.wait(&self.ctx.record()?)?;
            let bytes = buf.len() * 4;
            self.copy.htod(host, 0, &mut buf, 0, bytes)?;
            Ok((i, Tensor::from_gpu(shape, buf)?, self.copy.record()?))
        }

        /// Input `i` on the device, the compute stream ordered after its copy; the copy of input i − 1 starts.
        pub(super) fn take(&mut self, i: usize) -> Result<Tensor> {
            self.release_stored()?;
            let (_, x, done) = match self.loading.take() {
                Some(l) if l.0 == i => l,
                stale => {
                    // Not the input prefetched (never in the backward's order): let its copy land first.
                    if let Some((_, t, e)) = stale {
                        self.ctx.wait(&e)?;
                        drop(t);
                    }
                    self.load(i)?
                }
            };
            if i > 0 {
                self.loading = Some(self.load(i - 1)?);
            }
            self.ctx.wait(&done)?;
            Ok(x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;

    #[test]
    fn host_inputs_come_back_last_first_and_an_empty_store_errs() {
        let mut rng = Rng::new(5);
        let xs: Vec<Tensor> = [3, 1, 4]
            .iter()
            .map(|&t| Tensor::randn(&[1, t, 7], 1.0, &mut rng))
            .collect();
        // Offload asks only for GPU inputs to move: host tensors are held either way.
        for offload in [false, true] {
            let mut inputs = BlockInputs::new(offload);
            for x in &xs {
                inputs.push(x.clone()).unwrap();
            }
            assert_eq!(inputs.len(), 3);
            for x in xs.iter().rev() {
                let got = inputs.pop().unwrap();
                assert_eq!(
                    (got.shape(), got.f32s("t").unwrap()),
                    (x.shape(), x.f32s("t").unwrap())
                );
            }
            assert!(inputs.is_empty());
            let e = inputs.pop().unwrap_err().to_string();
            assert!(e.contains("no block input"), "{e}");
        }
    }
}
