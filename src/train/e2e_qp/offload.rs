//! The block inputs that E2E-QP's activation checkpointing keeps between the forward and the backward of a
//! sequence: on the host they stay in a `Vec`; for a GPU run they go to page-locked host memory as each block's
//! forward produces them and come back one at a time for the block's recomputation, so the GPU holds one
//! block's input instead of every block's (L·T·C f32: 10 GiB for Llama-2-70B at T = 4096). The copies are exact,
//! so the training computes the same values either way; they are queued on the context's stream (`PinnedF32`),
//! in order with the kernels, and the pinned buffers are kept from one sequence to the next.
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Default)]
pub struct BlockInputs {
    /// Inputs held as they are (host tensors, or a GPU run without offloading).
    held: Vec<Tensor>,
    /// Page-locked copies of GPU inputs and their shapes; `len` of them belong to the current sequence.
    #[cfg(feature = "cuda")]
    pinned: Vec<crate::gpu::PinnedF32>,
    #[cfg(feature = "cuda")]
    shapes: Vec<Vec<usize>>,
    #[cfg(feature = "cuda")]
    offload: bool,
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
            let buf = x.gpu("e2e_qp checkpoint")?;
            let i = self.len;
            if self.pinned.get(i).is_none_or(|p| p.len() < buf.len()) {
                let p = buf.ctx().alloc_pinned_f32(buf.len())?;
                match self.pinned.get_mut(i) {
                    Some(slot) => *slot = p,
                    None => self.pinned.push(p),
                }
                self.shapes.resize(self.pinned.len(), Vec::new());
            }
            self.pinned[i].store(buf)?;
            self.shapes[i] = x.shape().to_vec();
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
            let (p, shape) = (&self.pinned[self.len], &self.shapes[self.len]);
            let mut buf = p.ctx().alloc(crate::tensor::numel(shape))?;
            p.load(&mut buf)?;
            return Tensor::from_gpu(shape, buf);
        }
        self.held
            .pop()
            .ok_or_else(|| Error::invalid("e2e_qp", "block inputs out of order"))
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
