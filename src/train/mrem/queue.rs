//! The queue between modules (module m−1's quantized outputs, in step order) and the annealed training inputs
//! of module m > 0 built from it.
use super::forward::forward_blocks;
use super::lambda;
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::ops::add::add;
use crate::ops::scale::scale;
use crate::tensor::{DType, Tensor};
use crate::train::block_ap::BlockSamples;
use crate::train::device::Device;
use crate::train::pipeline::Streams;
use crate::train::store::Stream;
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

/// The consumer's end of the queue, and the latest output seen for every batch (used once the queue closes), kept
/// in f16 like the block input streams: half the host memory of a whole stream in f32.
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
                    self.last.insert(start, m.output.to_dtype(DType::F16));
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
        self.last_output(start).ok_or_else(|| {
            Error::invalid(
                "mrem",
                format!("the previous module stopped before sending batch {start} (it failed; see its error)"),
            )
        })
    }

    /// The latest output received for the batch at `start` (f32, from its f16 copy).
    fn last_output(&self, start: usize) -> Option<Tensor> {
        self.last.get(&start).map(|t| t.to_dtype(DType::F32))
    }
}

/// Training pairs of a block of module m > 0: the annealed mix of the module's FP input (its streams' quantized
/// stream, never moved in such a module) and the predecessor's outputs, pushed through the module's frozen
/// blocks, on the module's device; targets from the streams' FP stream.
pub(super) struct MixedInputs<'a> {
    pub cfg: &'a LlamaConfig,
    pub streams: &'a Streams,
    /// Where the module trains; `frozen` lives there.
    pub device: &'a Device,
    pub frozen: &'a [BlockWeights],
    pub upstream: &'a RefCell<Upstream>,
    pub step0: usize,
    pub anneal: usize,
}

impl MixedInputs<'_> {
    fn inputs(&self, lambda: f32, q: &Tensor, start: usize, count: usize) -> Result<Tensor> {
        let fp = || -> Result<Tensor> {
            self.device
                .put(self.streams.read(Stream::Quant, start, count)?)
        };
        let x = if lambda >= 1.0 {
            fp()?
        } else if lambda <= 0.0 {
            self.device.copy(q)?
        } else {
            let (fp, q) = (fp()?, self.device.copy(q)?);
            crate::ops::check_same("mrem mix", fp.shape(), q.shape())?;
            mix(fp, q, lambda)?
        };
        forward_blocks(self.cfg, self.frozen, x, self.device)
    }
}

/// λ·fp + (1 − λ)·q on the values' device, in f32 (each product rounded, then the sum).
fn mix(fp: Tensor, q: Tensor, lambda: f32) -> Result<Tensor> {
    let mut tape = Tape::new();
    tape.no_grad(|tape| -> Result<Tensor> {
        let (f, q) = (tape.input(fp), tape.input(q));
        let f = scale(tape, f, lambda)?;
        let q = scale(tape, q, 1.0 - lambda)?;
        let x = add(tape, f, q)?;
        Ok(tape.value(x).clone())
    })
}

impl BlockSamples for MixedInputs<'_> {
    fn len(&self) -> usize {
        self.streams.samples().len()
    }
    /// Outside training (not used by `train_block`): λ = 0 with the predecessor's latest outputs.
    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        let q = self.upstream.borrow().last_output(start).ok_or_else(|| {
            Error::invalid("mrem", format!("no quantized output of batch {start} yet"))
        })?;
        Ok((
            self.inputs(0.0, &q, start, count)?,
            self.streams.read(Stream::Fp, start, count)?,
        ))
    }
    fn train_pair(&self, step: usize, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        let t = self.step0 + step;
        let q = self.upstream.borrow_mut().next(t, start)?;
        let x = self.inputs(lambda(t, self.anneal), &q, start, count)?;
        Ok((x, self.streams.read(Stream::Fp, start, count)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_the_f32_formula() {
        let fp = Tensor::from_vec(&[1, 2, 3], vec![1.0, -2.0, 0.3, 4.5, 1e-3, -7.25]).unwrap();
        let q = Tensor::from_vec(&[1, 2, 3], vec![0.5, 2.0, -0.1, 4.0, 3.0, 0.0]).unwrap();
        for lambda in [0.0f32, 0.25, 0.7, 1.0] {
            let got = mix(fp.clone(), q.clone(), lambda).unwrap();
            let want: Vec<f32> = fp
                .f32s("t")
                .unwrap()
                .iter()
                .zip(q.f32s("t").unwrap())
                .map(|(f, q)| lambda * f + (1.0 - lambda) * q)
                .collect();
            assert_eq!(got.f32s("t").unwrap(), &want[..], "lambda {lambda}");
        }
    }
}
