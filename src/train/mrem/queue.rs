//! The queue between modules (module m−1's quantized outputs, in step order) and the annealed training inputs
//! of module m > 0 built from it.
use super::forward::forward_blocks;
use super::lambda;
use crate::error::{Error, Result};
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::tensor::Tensor;
use crate::train::block_ap::{take_samples, BlockSamples};
use crate::train::device::Device;
use crate::train::store::{BlockInputStore, Stream};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::mpsc::Receiver;

/// Module m−1's quantized output of one batch at its module training step `step`.
#[derive(Debug)]
pub struct QuantOutput {
    pub step: usize,
    pub start: usize,
    pub output: Tensor,
}

/// The consumer's end of the queue, and the latest output seen for every batch (used once the queue closes).
pub struct Upstream {
    rx: Option<Receiver<QuantOutput>>,
    last: HashMap<usize, Tensor>,
}

impl Upstream {
    pub fn new(rx: Receiver<QuantOutput>) -> Self {
        Upstream {
            rx: Some(rx),
            last: HashMap::new(),
        }
    }

    /// The predecessor's quantized output of the batch at `start` for step `t`: the next queue message, which
    /// must be for (t, start); after the predecessor finished, its last output of that batch.
    pub fn next(&mut self, t: usize, start: usize) -> Result<Tensor> {
        if let Some(rx) = &self.rx {
            match rx.recv() {
                Ok(m) if m.step == t && m.start == start => {
                    self.last.insert(start, m.output.clone());
                    return Ok(m.output);
                }
                Ok(m) => {
                    return Err(Error::invalid(
                        "mrem",
                        format!(
                        "queue out of order: expected step {t} batch {start}, got step {} batch {}",
                        m.step, m.start
                    ),
                    ))
                }
                Err(_) => self.rx = None,
            }
        }
        self.last.get(&start).cloned().ok_or_else(|| {
            Error::invalid(
                "mrem",
                format!("the previous module stopped before sending batch {start} (it failed; see its error)"),
            )
        })
    }
}

/// Training pairs of the first block being trained in module m > 0 or a later one: the annealed mix of FP and
/// predecessor inputs, pushed through the module's frozen blocks; targets from the store's FP stream.
pub(super) struct MixedInputs<'a> {
    pub cfg: &'a LlamaConfig,
    pub store: &'a BlockInputStore,
    pub fp_in: &'a Tensor,
    /// Where the module trains; `frozen` lives there.
    pub device: &'a Device,
    pub frozen: &'a [BlockWeights],
    pub upstream: &'a RefCell<Upstream>,
    pub step0: usize,
    pub anneal: usize,
}

impl MixedInputs<'_> {
    fn inputs(&self, lambda: f32, q: &Tensor, start: usize, count: usize) -> Result<Tensor> {
        let fp = take_samples(self.fp_in, start, count)?;
        let x = if lambda >= 1.0 {
            fp
        } else if lambda <= 0.0 {
            q.clone()
        } else {
            crate::ops::check_same("mrem mix", fp.shape(), q.shape())?;
            let (f, q) = (fp.f32s("mrem")?, q.f32s("mrem")?);
            let mix = f
                .iter()
                .zip(q)
                .map(|(f, q)| lambda * f + (1.0 - lambda) * q)
                .collect();
            Tensor::from_vec(fp.shape(), mix)?
        };
        forward_blocks(self.cfg, self.frozen, x, self.device)
    }
}

impl BlockSamples for MixedInputs<'_> {
    fn len(&self) -> usize {
        self.store.samples()
    }
    /// Outside training (not used by `train_block`): λ = 0 with the predecessor's latest outputs.
    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        let q = self
            .upstream
            .borrow()
            .last
            .get(&start)
            .cloned()
            .ok_or_else(|| {
                Error::invalid("mrem", format!("no quantized output of batch {start} yet"))
            })?;
        Ok((
            self.inputs(0.0, &q, start, count)?,
            self.store.read(Stream::Fp, start, count)?,
        ))
    }
    fn train_pair(&self, step: usize, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        let t = self.step0 + step;
        let q = self.upstream.borrow_mut().next(t, start)?;
        let x = self.inputs(lambda(t, self.anneal), &q, start, count)?;
        Ok((x, self.store.read(Stream::Fp, start, count)?))
    }
}
