//! The E2E-QP loop: one epoch after another over the global batches in data order, the cosine schedule with
//! warmup, and the loss of every step. [`E2eRun`] is stepped by its caller, which can save the run's
//! [`E2eProgress`] between two steps and continue from it later; [`train_e2e`] runs it to the end.
use super::progress::{total_steps, E2eProgress};
use super::{check_data, E2eOptions, E2eStep, E2eTrainer, Example};
use crate::dist::{Communicator, SingleRank};
use crate::error::{Error, Result};
use crate::model::quantized::QuantizedModel;
use crate::train::schedule::CosineSchedule;

/// An E2E-QP run over `data`, from its start or from a saved [`E2eProgress`]. The model passed to `step` and
/// `finish` must be the one given to `new`.
pub struct E2eRun<'d> {
    trainer: E2eTrainer,
    data: &'d [Example],
    global_batch: usize,
    total_steps: usize,
    schedule: CosineSchedule,
    losses: Vec<f32>,
}

impl<'d> E2eRun<'d> {
    /// Starts E2E-QP of `model` on `data`, or continues the run that saved `progress` (the same model, data
    /// and options: `E2eIdentity` checks them when the progress comes from a file).
    pub fn new(
        model: &QuantizedModel,
        data: &'d [Example],
        opts: &E2eOptions,
        progress: Option<E2eProgress>,
    ) -> Result<E2eRun<'d>> {
        check_data(data, opts.global_batch)?;
        let total = total_steps(data.len(), opts);
        let warmup = (opts.warmup_ratio as f64 * total as f64).ceil() as u64;
        let mut schedule = CosineSchedule::new(total as u64, f32::INFINITY)?;
        if warmup > 0 && (warmup as usize) < total {
            schedule = schedule.with_warmup(warmup)?;
        }
        let mut trainer = E2eTrainer::new(model, opts)?;
        let mut losses = Vec::with_capacity(total);
        if let Some(p) = progress {
            if p.steps_done() > total {
                return Err(Error::invalid(
                    "e2e_qp resume",
                    format!(
                        "the saved progress has {} steps, the run makes {total}",
                        p.steps_done()
                    ),
                ));
            }
            losses.extend_from_slice(&p.losses);
            trainer.restore(p)?;
        }
        Ok(E2eRun {
            trainer,
            data,
            global_batch: opts.global_batch,
            total_steps: total,
            schedule,
            losses,
        })
    }

    /// [`E2eRun::new`] on rank `comm.rank()` of a data-parallel run: checks that every rank gets a sequence of
    /// each global batch and, with several ranks, makes them start from rank 0's scales (`progress`, when given,
    /// must be rank 0's on every rank: `share_progress`).
    pub fn new_dist(
        model: &mut QuantizedModel,
        data: &'d [Example],
        opts: &E2eOptions,
        progress: Option<E2eProgress>,
        comm: &dyn Communicator,
    ) -> Result<E2eRun<'d>> {
        let world = comm.world_size();
        if opts.global_batch < world {
            return Err(Error::invalid(
                "e2e_qp",
                format!(
                    "a global batch of {} cannot give each of {world} ranks a sequence",
                    opts.global_batch
                ),
            ));
        }
        if world > 1 {
            super::broadcast_scales(model, comm)?;
        }
        E2eRun::new(model, data, opts, progress)
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn steps_done(&self) -> usize {
        self.losses.len()
    }

    pub fn is_done(&self) -> bool {
        self.losses.len() == self.total_steps
    }

    /// The next optimizer step, on this rank's slice of its global batch (`E2eTrainer::step_dist`).
    pub fn step(&mut self, model: &QuantizedModel, comm: &dyn Communicator) -> Result<E2eStep> {
        let step = self.losses.len();
        if step == self.total_steps {
            return Err(Error::invalid(
                "e2e_qp",
                format!("all {step} steps are done"),
            ));
        }
        let steps_per_epoch = self.data.len() / self.global_batch;
        let first = (step % steps_per_epoch) * self.global_batch;
        let batch = &self.data[first..first + self.global_batch];
        let lr_factor = self.schedule.lr_factor(step as u64);
        let (loss, grad_norm) = self
            .trainer
            .step_dist(model, batch, lr_factor, comm)
            .map_err(|e| match e {
                Error::NonFinite { what } => Error::NonFinite {
                    what: format!("{what} at step {step}"),
                },
                e => e,
            })?;
        self.losses.push(loss);
        Ok(E2eStep {
            step,
            total_steps: self.total_steps,
            loss,
            grad_norm,
        })
    }

    /// The state after the steps done so far, to save.
    pub fn progress(&mut self) -> Result<E2eProgress> {
        self.trainer.progress(&self.losses)
    }

    /// Writes the trained scales into `model`; returns the loss of every step.
    pub fn finish(self, model: &mut QuantizedModel) -> Result<Vec<f32>> {
        self.trainer.finish(model)?;
        Ok(self.losses)
    }
}

/// Trains the scales of `model` in place on `data`; returns the loss of every optimizer step.
pub fn train_e2e(
    model: &mut QuantizedModel,
    data: &[Example],
    opts: &E2eOptions,
    on_step: impl FnMut(E2eStep),
) -> Result<Vec<f32>> {
    train_e2e_dist(model, data, opts, &SingleRank, on_step)
}

/// Data-parallel [`train_e2e`]: every rank holds the whole `data` and the same `model`, and takes its contiguous
/// slice (`dist::shard`) of every global batch. Each rank accumulates loss/global_batch over its sequences,
/// exactly as the single rank does over all of them; the summed gradients (`all_reduce_sum`) are then the
/// single-rank gradients up to the order of the f32 additions, and every rank clips and steps identically, so
/// the scales stay equal on all ranks (they start equal: [`E2eRun::new_dist`]). Returns the loss of every
/// optimizer step (the global-batch mean). On a GPU the gradients are summed where the run keeps them: on the
/// device, or, offloaded, loaded from pinned memory one scale at a time (`grads::PinnedGrads::all_reduce`); NCCL
/// sums on the device, other communicators through the host.
pub fn train_e2e_dist(
    model: &mut QuantizedModel,
    data: &[Example],
    opts: &E2eOptions,
    comm: &dyn Communicator,
    mut on_step: impl FnMut(E2eStep),
) -> Result<Vec<f32>> {
    let mut run = E2eRun::new_dist(model, data, opts, None, comm)?;
    while !run.is_done() {
        on_step(run.step(model, comm)?);
    }
    run.finish(model)
}
