//! The scale gradients of a GPU run in pinned host memory (`E2eOptions::offload`), so that the GPU holds one
//! block's scale gradients instead of the whole model's (4 GiB f32 for Llama-2-70B at g64).
//!
//! The recipe accumulates a global batch and clips its global norm before AdamW (e2e_qp's module docs), so every
//! gradient must outlive every sequence's backward; it just does not have to stay on the GPU. Around each block's
//! backward the block's seven gradients come back onto the tape (from the step's second sequence on), the tape
//! adds the sequence's part as usual, and they go back to host memory. On the step's last sequence their Σ g²
//! partials are taken first, with clip_grad_norm's kernel in its order, so the norm is that of the GPU clip bit
//! for bit. The update then streams: each gradient is loaded, scaled by the clip coefficient, and applied by
//! AdamW (`step_param_cuda`, moments pinned too). The arithmetic is the on-GPU path's, in the same order; only
//! where the values wait changes. A data-parallel step sums the stashed gradients over the ranks first
//! ([`PinnedGrads::all_reduce`]) and takes the partials of the sums instead.
use super::SeqPos;
use crate::autograd::{Tape, Var};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::gpu::{GpuBuf, GpuContext, PinnedF32};
use crate::tensor::Tensor;
use crate::train::adamw::AdamW;
use crate::train::clip::{clip_coefficient, cuda as clip_cuda};
use std::sync::Arc;

pub struct PinnedGrads {
    /// One slot per persistent tape entry, indexed by `Var::index`; a scale's is made on its first backward.
    bufs: Vec<Option<PinnedF32>>,
    /// The last sequence's Σ g² partials, PARTIALS per slot (the scales come first on the tape, so the f64 sum
    /// over all slots, zeros included, is clip_grad_norm's).
    partials: Option<GpuBuf>,
}

impl PinnedGrads {
    /// For a tape with `n_persistent` parameters and frozen tensors.
    pub fn new(n_persistent: usize) -> PinnedGrads {
        PinnedGrads {
            bufs: (0..n_persistent).map(|_| None).collect(),
            partials: None,
        }
    }

    /// Before a block's backward: unless this is the step's first sequence, its scales' gradients so far go back
    /// onto the tape.
    pub fn restore(&self, tape: &mut Tape, scales: &[Var], pos: SeqPos) -> Result<()> {
        if pos.first {
            return Ok(());
        }
        for &v in scales {
            let p = self.bufs[v.index()].as_ref().ok_or_else(|| {
                Error::Autograd(format!("e2e_qp: scale {} has no gradient", v.index()))
            })?;
            let mut g = p.ctx().alloc(p.len())?;
            p.load(&mut g)?;
            let shape = tape.value(v).shape().to_vec();
            tape.set_grad(v, Tensor::from_gpu(&shape, g)?)?;
        }
        Ok(())
    }

    /// After a block's backward: its scales' gradients leave the tape for host memory (their Σ g² partials
    /// taken first on the step's last sequence).
    pub fn stash(&mut self, tape: &mut Tape, scales: &[Var], pos: SeqPos) -> Result<()> {
        for &v in scales {
            let g = tape.take_grad(v).ok_or_else(|| {
                Error::Autograd(format!("e2e_qp: scale {} got no gradient", v.index()))
            })?;
            let g = g.gpu("e2e_qp gradient offload")?;
            let ctx = g.ctx().clone();
            if pos.last {
                clip_cuda::partial_sum_squares(self.partials(&ctx)?, v.index(), g)?;
            }
            let slot = &mut self.bufs[v.index()];
            if slot.as_ref().is_none_or(|p| p.len() != g.len()) {
                *slot = Some(ctx.alloc_pinned_f32(g.len())?);
            }
            slot.as_mut().expect("made above").store(g)?;
        }
        Ok(())
    }

    /// Data-parallel steps: after this rank's last sequence (stashed without partials), sums every scale's
    /// gradient over the ranks, one at a time through the GPU (`Communicator::all_reduce_sum_gpu`), and takes
    /// the Σ g² partials of the sums, so that [`PinnedGrads::clip_and_step`] clips the global batch's gradient.
    pub fn all_reduce(&mut self, scales: &[Var], comm: &dyn Communicator) -> Result<()> {
        for &v in scales {
            let p = self.bufs[v.index()].as_ref().ok_or_else(|| {
                Error::Autograd(format!("e2e_qp: scale {} has no gradient", v.index()))
            })?;
            let ctx = p.ctx().clone();
            let mut g = ctx.alloc(p.len())?;
            p.load(&mut g)?;
            comm.all_reduce_sum_gpu(&mut g)?;
            clip_cuda::partial_sum_squares(self.partials(&ctx)?, v.index(), &g)?;
            self.bufs[v.index()]
                .as_mut()
                .expect("checked above")
                .store(&g)?;
        }
        Ok(())
    }

    /// The partials buffer, zeroed on first use.
    fn partials(&mut self, ctx: &Arc<GpuContext>) -> Result<&GpuBuf> {
        if self.partials.is_none() {
            self.partials = Some(ctx.zeros(self.bufs.len() * clip_cuda::PARTIALS)?);
        }
        Ok(self.partials.as_ref().expect("made above"))
    }

    /// After the step's last sequence: the global norm (returned), the clip to `max_norm`, and AdamW on every
    /// one of `scales`, one at a time.
    pub fn clip_and_step(
        &mut self,
        tape: &mut Tape,
        scales: &[Var],
        opt: &mut AdamW,
        (max_norm, lr_factor): (f32, f32),
    ) -> Result<f32> {
        if !(max_norm > 0.0 && max_norm.is_finite()) {
            return Err(Error::invalid(
                "clip_grad_norm",
                format!("max_norm {max_norm} must be positive"),
            ));
        }
        let partials = self
            .partials
            .take()
            .ok_or_else(|| Error::Autograd("e2e_qp: no gradient to clip".into()))?;
        let (norm, coef) = clip_coefficient(clip_cuda::sum_partials(&partials)?, max_norm)?;
        for &v in scales {
            let p = self.bufs[v.index()].as_ref().ok_or_else(|| {
                Error::Autograd(format!("e2e_qp: scale {} has no gradient", v.index()))
            })?;
            let mut g = p.ctx().alloc(p.len())?;
            p.load(&mut g)?;
            if coef < 1.0 {
                clip_cuda::scale(&mut g, coef as f32)?;
            }
            opt.step_param_cuda(v, tape.value_mut(v).gpu_mut("AdamW")?, &g, lr_factor)?;
        }
        opt.end_step();
        Ok(norm)
    }
}
