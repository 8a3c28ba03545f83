//! E2E-QP: with the integer weights and zero points frozen, train only the step sizes (scales) of every
//! quantized linear end to end with the causal-LM cross-entropy.
//!
//! Recipe (formats.md §1.2): AdamW lr 2e-5 at 2 bits and 1e-5 otherwise, weight decay 0, global gradient-norm
//! clip 0.3, cosine schedule with HF-style warmup (3% of steps) decaying to 0, one epoch, the global batch built
//! by gradient accumulation. The forward dequantizes each packed linear on the fly (`real_quant_linear`); norms,
//! embeddings and the output head are frozen tensors on the tape, so no model-sized gradient buffer exists.
//!
//! Activation checkpointing per block: a sequence's forward runs without recording and keeps only each block's
//! input [1, T, C]; the head (final norm, output linear, cross-entropy) is recorded and differentiated, giving
//! dx at the last block's output; then each block, last to first, is run again with recording and differentiated
//! through the surrogate loss Σ y ⊙ dy (its gradient at y is dy exactly), which adds its scale gradients and
//! yields dx for the block before it. Memory holds one block's activations, not the whole model's; the price is
//! one more forward of the blocks.
//!
//! Device: with `E2eOptions::device` a GPU, the scales, frozen tensors, activations, gradients and AdamW moments
//! live there (the packed integers and zero points are uploaded once per layer, packed, and each linear
//! dequantizes into a reused scratch); only each sequence's loss comes back per step, and the learned scales at
//! the end. With `E2eOptions::offload` (the default) the GPU keeps only what it computes with: the block
//! checkpoints ([`offload::BlockInputs`]), the scales' gradients between blocks (`grads::PinnedGrads`) and
//! their AdamW moments (`AdamW::set_pinned_moments`) go to pinned host memory, and an untied embedding table
//! stays on the host (a sequence's rows are gathered there and uploaded). All of it moves exact copies in the
//! same order of operations, so the results do not change; the price is PCIe traffic (per sequence 2·L·T·C·4
//! bytes of checkpoints and 4 to 8 bytes per scale of gradient; per step 20 bytes per scale for the update).
//!
//! Gradients: the recipe accumulates the global batch (32 sequences) and clips the global norm before AdamW, so
//! every scale's gradient must exist until the last sequence's backward, in f32 (they are sums of 32 parts):
//! AdamW cannot run layer by layer inside the backward, and the gradient buffer stays, in host memory when
//! offloaded.
//!
//! Resuming: [`E2eRun`] (run.rs) steps the loop for a caller that saves its [`E2eProgress`] between steps
//! (progress.rs: the scales, AdamW's state and the losses are the whole state) and continues from it later, bit
//! for bit on the same device.
use crate::autograd::{Tape, Var};
use crate::dist::{shard, Communicator, SingleRank};
use crate::error::{Error, Result};
use crate::model::quantized::QuantizedModel;
use crate::train::adamw::{AdamW, ParamGroup};
use crate::train::clip::clip_grad_norm;
use crate::train::device::Device;
use dist::{all_reduce_grads, broadcast_scales};
pub use dist::{scale_shapes, share_examples, share_progress};
use offload::BlockInputs;

mod dist;
#[cfg(feature = "cuda")]
pub mod grads;
pub mod offload;
mod progress;
mod run;
mod sequence;

pub use progress::{identity_flags, E2eIdentity, E2eProgress, SaveEvery};
pub use run::{train_e2e, train_e2e_dist, E2eRun};
#[cfg(feature = "cuda")]
use sequence::Offloaded;
pub use sequence::{example_loss_and_grads, SeqPos};
use sequence::{register, sequence_backward, BlockGrads, ModelVars, OnTape};

/// Label of a position that does not count in the loss (torch's ignore_index).
pub const IGNORE: i32 = -100;

/// One training sequence: `ids` and, per position, the id it must predict or `IGNORE` (instruction data
/// ignores the prompt; pretraining text predicts every next token).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Example {
    /// Causal-LM labels for plain text: position t predicts ids[t + 1]; the last position predicts nothing.
    pub fn causal(ids: Vec<u32>) -> Example {
        let mut labels: Vec<i32> = ids.iter().skip(1).map(|&i| i as i32).collect();
        labels.push(IGNORE);
        Example { ids, labels }
    }

    /// Labels for instruction data, where only the response counts: the first `prompt_len` ids are the prompt,
    /// and position t predicts ids[t + 1] only when that id is part of the response. So positions
    /// `prompt_len - 1 ..= len - 2` carry loss: HF's labels `[IGNORE; prompt_len] ++ response`, shifted by one.
    pub fn response_only(ids: Vec<u32>, prompt_len: usize) -> Example {
        let labels = (0..ids.len())
            .map(|t| match ids.get(t + 1) {
                Some(&next) if t + 1 >= prompt_len => next as i32,
                _ => IGNORE,
            })
            .collect();
        Example { ids, labels }
    }
}

#[derive(Clone, Debug)]
pub struct E2eOptions {
    pub lr: f32,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    pub epochs: usize,
    /// Sequences per optimizer step (the global batch), reached by accumulating one sequence at a time.
    pub global_batch: usize,
    pub warmup_ratio: f32,
    /// Where the training runs (the model stays on the host; the trained scales come back to it).
    pub device: Device,
    /// GPU runs: block checkpoints and AdamW moments in pinned host memory, an untied embedding on the host
    /// (module docs). No effect on the CPU.
    pub offload: bool,
}

impl E2eOptions {
    pub fn recipe(wbits: u32) -> Self {
        E2eOptions {
            lr: if wbits == 2 { 2e-5 } else { 1e-5 },
            weight_decay: 0.0,
            max_grad_norm: 0.3,
            epochs: 1,
            global_batch: 32,
            warmup_ratio: 0.03,
            device: Device::Cpu,
            offload: true,
        }
    }
}

/// Progress of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct E2eStep {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f32,
    pub grad_norm: f32,
}

fn check_data(data: &[Example], global_batch: usize) -> Result<()> {
    if global_batch == 0 || data.len() < global_batch {
        return Err(Error::invalid(
            "e2e_qp",
            format!(
                "{} training sequences cannot fill one global batch of {global_batch}",
                data.len(),
            ),
        ));
    }
    if let Some((i, e)) = data
        .iter()
        .enumerate()
        .find(|(_, e)| e.ids.len() != e.labels.len() || e.ids.is_empty())
    {
        return Err(Error::invalid(
            "e2e_qp",
            format!(
                "example {i} has {} ids and {} labels",
                e.ids.len(),
                e.labels.len()
            ),
        ));
    }
    Ok(())
}

/// The training state of E2E-QP on one model: the tape with the scales (on `opts.device`) and AdamW. The
/// model passed to `step` and `finish` must be the one given to `new`.
pub struct E2eTrainer {
    tape: Tape,
    vars: ModelVars,
    opt: AdamW,
    max_grad_norm: f32,
    inputs: BlockInputs,
    device: Device,
    /// The scale gradients' home between blocks in an offloaded GPU run.
    #[cfg(feature = "cuda")]
    grads: Option<grads::PinnedGrads>,
}

impl E2eTrainer {
    pub fn new(model: &QuantizedModel, opts: &E2eOptions) -> Result<E2eTrainer> {
        let mut tape = Tape::new();
        let offload = opts.offload && !opts.device.is_cpu();
        let vars = register(&mut tape, model, &opts.device, offload)?;
        let params: Vec<Var> = vars.scales.iter().flatten().copied().collect();
        let opt = AdamW::new(
            vec![ParamGroup {
                params,
                lr: opts.lr,
                weight_decay: opts.weight_decay,
            }],
            0.9,
            0.999,
            1e-8,
        )?;
        #[cfg(feature = "cuda")]
        let opt = {
            let mut opt = opt;
            opt.set_pinned_moments(offload);
            opt
        };
        Ok(E2eTrainer {
            vars,
            opt,
            max_grad_norm: opts.max_grad_norm,
            inputs: BlockInputs::new(offload),
            device: opts.device.clone(),
            #[cfg(feature = "cuda")]
            grads: offload.then(|| grads::PinnedGrads::new(tape.n_params())),
            tape,
        })
    }

    /// One optimizer step on `batch` (gradient accumulation over its sequences, each weighted 1/len): returns
    /// the mean loss and the gradient norm before clipping.
    pub fn step(
        &mut self,
        model: &QuantizedModel,
        batch: &[Example],
        lr_factor: f32,
    ) -> Result<(f32, f32)> {
        self.step_dist(model, batch, lr_factor, &SingleRank)
    }

    /// [`E2eTrainer::step`] data-parallel: this rank takes its slice ([`shard`]) of the global `batch`, and the
    /// gradients and loss are summed over the ranks before every rank clips and steps identically.
    pub fn step_dist(
        &mut self,
        model: &QuantizedModel,
        batch: &[Example],
        lr_factor: f32,
        comm: &dyn Communicator,
    ) -> Result<(f32, f32)> {
        check_data(batch, batch.len())?;
        let world = comm.world_size();
        self.tape.zero_grad();
        let mut loss_sum = 0.0f64;
        let weight = 1.0 / batch.len() as f32;
        let mine = &batch[shard(batch.len(), comm.rank(), world)];
        for (s, ex) in mine.iter().enumerate() {
            // Offloaded gradients take their clip partials on the last sequence, unless the ranks' sums are
            // still to come (`PinnedGrads::all_reduce` takes them then).
            #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
            let pos = SeqPos {
                first: s == 0,
                last: s + 1 == mine.len() && world == 1,
            };
            #[cfg(feature = "cuda")]
            let mut offloaded = self.grads.as_mut().map(|g| Offloaded(g, pos));
            #[cfg(feature = "cuda")]
            let grads: &mut dyn BlockGrads = match &mut offloaded {
                Some(o) => o,
                None => &mut OnTape,
            };
            #[cfg(not(feature = "cuda"))]
            let grads: &mut dyn BlockGrads = &mut OnTape;
            loss_sum += sequence_backward(
                &mut self.tape,
                model,
                &self.vars,
                (ex, weight),
                &mut self.inputs,
                &self.device,
                grads,
            )? as f64;
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.grads {
            let scales: Vec<Var> = self.vars.scales.iter().flatten().copied().collect();
            if world > 1 {
                g.all_reduce(&scales, comm)?;
                let mut loss = [loss_sum as f32];
                comm.all_reduce_sum(&mut loss)?;
                loss_sum = loss[0] as f64;
            }
            let limits = (self.max_grad_norm, lr_factor);
            let grad_norm = g.clip_and_step(&mut self.tape, &scales, &mut self.opt, limits)?;
            return Ok(((loss_sum / batch.len() as f64) as f32, grad_norm));
        }
        if world > 1 {
            loss_sum = all_reduce_grads(&mut self.tape, comm, loss_sum as f32)? as f64;
        }
        let grad_norm = clip_grad_norm(&mut self.tape, self.max_grad_norm)?;
        self.opt.step(&mut self.tape, lr_factor)?;
        Ok(((loss_sum / batch.len() as f64) as f32, grad_norm))
    }

    /// Writes the trained scales back into `model` (downloaded from the device).
    pub fn finish(self, model: &mut QuantizedModel) -> Result<()> {
        for (b, s) in model.blocks.iter_mut().zip(&self.vars.scales) {
            for (l, &v) in b.linears.iter_mut().zip(s) {
                l.set_scales(self.tape.value(v).to_host()?)?;
            }
        }
        Ok(())
    }
}
