//! Weights whose fake-quantized bf16 value ŵ_b is kept between steps: the bf16 mode's fused optimizer step
//! (`AdamW::fuse_fake_quant`, `cuda/fake_quant.cu`'s `fake_quant_adamw_f32`) writes the next step's ŵ_b while it updates
//! w, its scales and its zeros, so the forward need not quantize again. For such a weight the tape's gradient of w
//! is the gradient of ŵ (dŵ), not of w: the optimizer applies fake-quant's backward itself, and the scales and
//! zeros get no gradient on the tape. `fake_quant_linear`'s bf16 path is the only op that reads a deferred weight.
//! dŵ itself is bf16 (the dŵ GEMM rounds it, as torch.autocast's bf16 matmul does) and is not a tape gradient
//! slot: the op's backward leaves it in the weight's [`DeferredGrad`], where the optimizer takes it
//! (`take_fake_quant_grad`), so no f32 dŵ buffer is ever allocated.
use super::{Tape, Var};
use crate::error::{Error, Result};
use crate::gpu::Bf16Buf;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A deferred weight's quantizer parameters (tape entries), its current ŵ_b (None once stale) and this step's dŵ.
pub(super) struct DeferredWeight {
    scales: usize,
    zeros: usize,
    copy: Option<Arc<Bf16Buf>>,
    grad: DeferredGrad,
}

/// Where the backward of the op reading a deferred weight leaves dŵ (bf16) until the optimizer takes it.
#[derive(Clone, Default)]
pub struct DeferredGrad(Arc<Mutex<Option<Bf16Buf>>>);

impl DeferredGrad {
    /// Stores this step's dŵ. A dŵ already there (the weight read twice, or two backwards without an optimizer
    /// step between them) is an error: fused weights do not accumulate gradients.
    pub fn put(&self, dwq: Bf16Buf) -> Result<()> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Err(Error::Autograd(
                "a weight deferred to the fused optimizer step got a second gradient before the optimizer \
                 step (read twice, or gradients accumulated over several backwards): not supported"
                    .into(),
            ));
        }
        *slot = Some(dwq);
        Ok(())
    }

    fn take(&self) -> Option<Bf16Buf> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The deferred weights, by the tape entry of w.
#[derive(Default)]
pub(super) struct FakeQuantCopies(HashMap<usize, DeferredWeight>);

impl FakeQuantCopies {
    /// A value of entry `v` may change: a ŵ_b made from it is stale.
    pub(super) fn invalidate(&mut self, v: usize) {
        for (w, d) in self.0.iter_mut() {
            if *w == v || d.scales == v || d.zeros == v {
                d.copy = None;
            }
        }
    }

    pub(super) fn invalidate_all(&mut self) {
        self.0.values_mut().for_each(|d| d.copy = None);
    }

    /// Whether tape entry `v` is a deferred weight (its gradient never takes a tape slot).
    pub(super) fn is_deferred(&self, v: usize) -> bool {
        self.0.contains_key(&v)
    }

    /// Drops every pending dŵ (the tape's `clear_grads` and `zero_grad`).
    pub(super) fn clear_grads(&mut self) {
        self.0.values().for_each(|d| drop(d.grad.take()));
    }
}

impl Tape {
    /// Marks parameter `w` (quantized with parameters `scales` and `zeros`) as deferred (module docs).
    pub fn defer_fake_quant(&mut self, w: Var, scales: Var, zeros: Var) -> Result<()> {
        let n = self.n_params;
        if [w, scales, zeros].iter().any(|v| v.0 >= n)
            || w == scales
            || w == zeros
            || scales == zeros
        {
            return Err(Error::Autograd(format!(
                "defer_fake_quant: entries {}, {}, {} must be three distinct parameters (of {n})",
                w.0, scales.0, zeros.0
            )));
        }
        self.fake_quant_copies.0.insert(
            w.0,
            DeferredWeight {
                scales: scales.0,
                zeros: zeros.0,
                copy: None,
                grad: DeferredGrad::default(),
            },
        );
        Ok(())
    }

    /// The quantizer parameters (scales, zeros) of a deferred weight; None for any other entry.
    pub fn deferred_fake_quant(&self, w: Var) -> Option<(Var, Var)> {
        self.fake_quant_copies
            .0
            .get(&w.0)
            .map(|d| (Var(d.scales), Var(d.zeros)))
    }

    /// Where the op reading deferred weight `w` leaves its dŵ; None for any other entry.
    pub fn fake_quant_grad_slot(&self, w: Var) -> Option<DeferredGrad> {
        self.fake_quant_copies.0.get(&w.0).map(|d| d.grad.clone())
    }

    /// Takes deferred weight `w`'s dŵ of the last backward (None when there is none, or w is not deferred).
    pub fn take_fake_quant_grad(&mut self, w: Var) -> Option<Bf16Buf> {
        self.fake_quant_copies.0.get(&w.0)?.grad.take()
    }

    /// The current ŵ_b of a deferred weight, when one was set since its values last changed.
    pub fn fake_quant_copy(&self, w: Var) -> Option<Arc<Bf16Buf>> {
        self.fake_quant_copies.0.get(&w.0)?.copy.clone()
    }

    /// Records `b` as deferred weight `w`'s ŵ_b for its current values (ignored for any other entry).
    pub fn set_fake_quant_copy(&mut self, w: Var, b: Arc<Bf16Buf>) {
        if let Some(d) = self.fake_quant_copies.0.get_mut(&w.0) {
            d.copy = Some(b);
        }
    }
}
