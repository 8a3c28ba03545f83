//! Block-AP for one block: train all of a block's parameters (weights, norms, scales, zeros) under fake
//! quantization so that its output on quantized inputs matches the full-precision block's output (MSE).
//!
//! Defaults are the official recipe (formats.md §1.2): AdamW with weight decay 0, quant_lr 1e-4 for scales and
//! zeros, weight_lr 2e-5 at 2 bits and 1e-5 otherwise for weights and norms, cosine decay to lr/20, batch 2,
//! 2 epochs, no gradient clipping, samples visited in order.
//!
//! Early stop (`early_stop` = N > 0) follows `quantize/block_ap.py`: after each epoch the validation loss is
//! compared with the best so far; each epoch that does not beat it adds one to a counter that is never reset,
//! and training stops once the counter reaches N. So N counts epochs without improvement, not necessarily in a
//! row. The block keeps its last parameters (the official code restores no best state), and the cosine
//! schedule keeps its length of `epochs` epochs.
//!
//! On the host every step's loss is checked before its update. On a GPU the losses stay on the device and are
//! read back `LOSS_READBACK_STEPS` at a time and at each epoch's end (`train::device::LossQueue`), so that the
//! host keeps queueing steps; a non-finite loss is then an error naming its step, found up to 63 steps later
//! (the block is not saved either way).
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use crate::ops::mse::{mse, mse_loss};
use crate::quant::fake_quant::QuantConfig;
#[cfg(feature = "cuda")]
use crate::tensor::Storage;
use crate::tensor::Tensor;
use crate::train::adamw::{AdamW, ParamGroup};
use crate::train::device::{block_to_host, Device, LossQueue};
use crate::train::early_stop::EarlyStop;
use crate::train::schedule::CosineSchedule;
use crate::train::store::{BlockInputStore, Stream};

#[derive(Clone, Debug)]
pub struct BlockApOptions {
    pub quant: QuantConfig,
    pub quant_lr: f32,
    pub weight_lr: f32,
    pub epochs: usize,
    pub batch_size: usize,
    pub min_lr_factor: f32,
    /// Where the block trains (the host by default).
    pub device: Device,
    /// Stop after this many epochs whose validation loss does not beat the best so far; 0 = never.
    pub early_stop: usize,
    /// On a GPU in the bf16 mode, update each linear's weight, scales and zeros with AdamW's fused fake-quant
    /// step (`AdamW::fuse_fake_quant`: the same values, fewer passes over memory); off runs the separate kernels.
    pub fused_update: bool,
}

impl BlockApOptions {
    /// The official EfficientQAT Block-AP recipe for `quant`.
    pub fn recipe(quant: QuantConfig) -> Self {
        BlockApOptions {
            quant,
            quant_lr: 1e-4,
            weight_lr: if quant.wbits == 2 { 2e-5 } else { 1e-5 },
            epochs: 2,
            batch_size: 2,
            min_lr_factor: 20.0,
            device: Device::Cpu,
            early_stop: 0,
            fused_update: true,
        }
    }
}

/// A trained block: its weights and norms, and the scales and zeros of each of its seven linears.
#[derive(Clone, Debug)]
pub struct TrainedBlock {
    pub weights: BlockWeights,
    pub scales: [Tensor; 7],
    pub zeros: [Tensor; 7],
    pub step_losses: Vec<f32>,
    pub val_losses: Vec<f32>,
    /// Epochs trained: `epochs`, or fewer when early stop ended the block.
    pub epochs_run: usize,
}

/// Progress of one optimizer step, for progress bars and logs.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f32,
}

/// Where a block's training pairs come from: in-memory tensors, or the `BlockInputStore` (inputs from the
/// quantized stream, targets from the full-precision stream).
pub trait BlockSamples {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// (inputs, targets) of samples `start..start + count`, each [count, T, C].
    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)>;
    /// The pair for training step `step` (0-based over the block's steps); inputs that change over training
    /// (MREM's annealed mix, `train::mrem`) override this, fixed data keeps `pair`.
    fn train_pair(&self, step: usize, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        let _ = step;
        self.pair(start, count)
    }
}

/// In-memory (inputs, targets), both [N, T, C].
pub struct TensorPairs<'a> {
    pub inputs: &'a Tensor,
    pub targets: &'a Tensor,
}

impl BlockSamples for TensorPairs<'_> {
    fn len(&self) -> usize {
        self.inputs.shape().first().copied().unwrap_or(0)
    }
    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        crate::ops::check_same("TensorPairs", self.inputs.shape(), self.targets.shape())?;
        Ok((
            take_samples(self.inputs, start, count)?,
            take_samples(self.targets, start, count)?,
        ))
    }
}

impl BlockSamples for BlockInputStore {
    fn len(&self) -> usize {
        self.samples()
    }
    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.read(Stream::Quant, start, count)?,
            self.read(Stream::Fp, start, count)?,
        ))
    }
}

/// Copies samples `start..start + count` of a [N, T, C] tensor.
pub fn take_samples(t: &Tensor, start: usize, count: usize) -> Result<Tensor> {
    let s = t.shape();
    if s.len() != 3 || start + count > s[0] {
        return Err(Error::shape(
            "take_samples",
            format!("samples {start}..{} of {s:?}", start + count),
        ));
    }
    let row = s[1] * s[2];
    let data = t.f32s("take_samples")?[start * row..(start + count) * row].to_vec();
    Tensor::from_vec(&[count, s[1], s[2]], data)
}

/// Trains one block. `train` pairs the quantized predecessors' outputs (inputs) with the full-precision block's
/// outputs on full-precision inputs (targets); `val` is scored the same way after every epoch.
pub fn train_block(
    cfg: &LlamaConfig,
    weights: &BlockWeights,
    train: &dyn BlockSamples,
    val: Option<&dyn BlockSamples>,
    opts: &BlockApOptions,
    on_step: impl FnMut(StepInfo),
) -> Result<TrainedBlock> {
    train_block_with(cfg, weights, train, val, opts, on_step, &mut |_, _, _| {
        Ok(())
    })
}

/// [`train_block`], also handing `on_output(step, start, output)` the block's (fake-quantized) output of every
/// training batch before its optimizer step: MREM sends it on to the next module (`train::mrem`).
pub fn train_block_with(
    cfg: &LlamaConfig,
    weights: &BlockWeights,
    train: &dyn BlockSamples,
    val: Option<&dyn BlockSamples>,
    opts: &BlockApOptions,
    mut on_step: impl FnMut(StepInfo),
    on_output: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>,
) -> Result<TrainedBlock> {
    let n = train.len();
    if opts.batch_size == 0 || n < opts.batch_size {
        return Err(Error::invalid(
            "train_block",
            format!(
                "{n} training samples cannot fill one batch of {}",
                opts.batch_size
            ),
        ));
    }
    if opts.early_stop > 0 && val.is_none() {
        return Err(Error::invalid(
            "train_block",
            format!(
                "early stop after {} epochs without improvement needs validation samples",
                opts.early_stop
            ),
        ));
    }
    let mut tape = Tape::new();
    let vars = match opts.device.is_cpu() {
        true => BlockVars::register(&mut tape, weights, Some(opts.quant))?,
        false => BlockVars::register(
            &mut tape,
            &opts.device.copy_block(weights)?,
            Some(opts.quant),
        )?,
    };
    let mut opt = block_ap_optimizer(&mut tape, &vars, opts)?;
    // On a GPU the losses are read back a batch of steps at a time (`LossQueue`), and the non-finite check
    // moves from each update's gradients to those losses.
    let mut queue = match opts.device.is_cpu() {
        true => None,
        false => {
            #[cfg(feature = "cuda")]
            opt.skip_device_gradient_check();
            Some(LossQueue::new())
        }
    };
    let steps_per_epoch = n / opts.batch_size;
    let total_steps = steps_per_epoch * opts.epochs;
    let schedule = CosineSchedule::new(total_steps as u64, opts.min_lr_factor)?;
    let mut step_losses = Vec::with_capacity(total_steps);
    let mut val_losses = Vec::with_capacity(opts.epochs);
    let mut early_stop = EarlyStop::new(opts.early_stop);
    let mut epochs_run = 0;
    let mut done = Vec::new();
    for epoch in 0..opts.epochs {
        epochs_run = epoch + 1;
        let at = |step: usize| {
            move |e| match e {
                Error::NonFinite { what } => Error::NonFinite {
                    what: format!("{what} at epoch {epoch} step {step}"),
                },
                e => e,
            }
        };
        for i in 0..steps_per_epoch {
            let step = epoch * steps_per_epoch + i;
            let batch = train.train_pair(step, i * opts.batch_size, opts.batch_size)?;
            let lr_factor = schedule.lr_factor(step as u64);
            let on_out = &mut |out: &Tensor| on_output(step, i * opts.batch_size, out);
            match queue.as_mut() {
                None => done.push((
                    step,
                    train_step(&mut tape, cfg, &vars, &mut opt, batch, lr_factor, on_out)
                        .map_err(at(step))?,
                )),
                Some(q) => {
                    let loss = train_step_queued(
                        &mut tape, cfg, &vars, &mut opt, batch, lr_factor, on_out,
                    )
                    .map_err(at(step))?;
                    q.push(step, loss);
                    if q.is_full() || i + 1 == steps_per_epoch {
                        done = q.read_back()?;
                    }
                }
            }
            for (step, loss) in done.drain(..) {
                if !loss.is_finite() {
                    let what = "Block-AP loss (read back after the steps queued behind it ran)";
                    return Err(at(step)(Error::NonFinite { what: what.into() }));
                }
                step_losses.push(loss);
                on_step(StepInfo {
                    step,
                    total_steps,
                    epoch,
                    loss,
                });
            }
        }
        if let Some(val) = val {
            let v = eval_block_loss(&mut tape, cfg, &vars, val, opts.batch_size)?;
            val_losses.push(v);
            if early_stop.stop_after(v) {
                break;
            }
        }
    }
    let quant_of = |i: usize| vars.linears[i].quant.expect("registered with quantization");
    let host = |v| tape.value(v).to_host();
    let (mut scales, mut zeros) = (Vec::with_capacity(7), Vec::with_capacity(7));
    for i in 0..7 {
        scales.push(host(quant_of(i).0)?);
        zeros.push(host(quant_of(i).1)?);
    }
    Ok(TrainedBlock {
        weights: block_to_host(&vars.weights(&tape))?,
        scales: scales.try_into().expect("seven linears"),
        zeros: zeros.try_into().expect("seven linears"),
        step_losses,
        val_losses,
        epochs_run,
    })
}

/// The recipe's AdamW over a block registered on `tape`: scales and zeros at `quant_lr`, weights and norms at
/// `weight_lr`, no weight decay, betas (0.9, 0.999), eps 1e-8. On a GPU in the bf16 mode with `fused_update`, the
/// linears take the fused fake-quant step (`AdamW::fuse_fake_quant`).
pub fn block_ap_optimizer(
    tape: &mut Tape,
    vars: &BlockVars,
    opts: &BlockApOptions,
) -> Result<AdamW> {
    let mut weight_params = vec![vars.attn_norm, vars.ffn_norm];
    let mut quant_params = Vec::new();
    for l in &vars.linears {
        weight_params.push(l.weight);
        if let Some((s, z)) = l.quant {
            quant_params.extend([s, z]);
        }
    }
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut opt = AdamW::new(
        vec![
            ParamGroup {
                params: quant_params,
                lr: opts.quant_lr,
                weight_decay: 0.0,
            },
            ParamGroup {
                params: weight_params,
                lr: opts.weight_lr,
                weight_decay: 0.0,
            },
        ],
        0.9,
        0.999,
        1e-8,
    )?;
    #[cfg(feature = "cuda")]
    if opts.fused_update {
        let bf16 = crate::gpu::device_of("block_ap_optimizer", &[tape.value(vars.attn_norm)])?
            .is_some_and(|ctx| ctx.matmul_bf16());
        for l in vars.linears.iter().filter(|_| bf16) {
            if let Some((s, z)) = l.quant {
                opt.fuse_fake_quant(tape, l.weight, s, z, opts.quant)?;
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = tape;
    Ok(opt)
}

/// One Block-AP step on a batch: forward under fake quantization, MSE against `ys`, backward, AdamW at
/// `lr_factor`. Inputs go where the parameters are (uploaded when the block lives on a GPU). Returns the loss; a
/// non-finite loss is an error (`NonFinite`) and leaves the parameters untouched. `on_output` sees the block's
/// output before the update (MREM's hook; a no-op otherwise).
pub fn train_step(
    tape: &mut Tape,
    cfg: &LlamaConfig,
    vars: &BlockVars,
    opt: &mut AdamW,
    batch: (Tensor, Tensor),
    lr_factor: f32,
    on_output: &mut dyn FnMut(&Tensor) -> Result<()>,
) -> Result<f32> {
    let loss = forward_backward(tape, cfg, vars, batch, on_output)?;
    // Read after the backward is queued: on a GPU the download waits for the whole step's work so far, once.
    let loss_value = tape.value(loss).to_host()?.f32s("train_step")?[0];
    if !loss_value.is_finite() {
        return Err(Error::NonFinite {
            what: "Block-AP loss".into(),
        });
    }
    opt.step(tape, lr_factor)?;
    Ok(loss_value)
}

/// [`train_step`] without waiting for the loss: the update is queued whatever the loss is, and the loss comes
/// back as a tensor where it was computed (on a GPU, read later by a `LossQueue`).
pub fn train_step_queued(
    tape: &mut Tape,
    cfg: &LlamaConfig,
    vars: &BlockVars,
    opt: &mut AdamW,
    batch: (Tensor, Tensor),
    lr_factor: f32,
    on_output: &mut dyn FnMut(&Tensor) -> Result<()>,
) -> Result<Tensor> {
    let loss = forward_backward(tape, cfg, vars, batch, on_output)?;
    opt.step(tape, lr_factor)?;
    Ok(std::mem::replace(tape.value_mut(loss), Tensor::scalar(0.0)))
}

/// The forward under fake quantization, the MSE against `ys` and its backward; returns the loss.
fn forward_backward(
    tape: &mut Tape,
    cfg: &LlamaConfig,
    vars: &BlockVars,
    (xs, ys): (Tensor, Tensor),
    on_output: &mut dyn FnMut(&Tensor) -> Result<()>,
) -> Result<Var> {
    tape.reset();
    let (xs, ys) = to_param_device(tape, vars, xs, ys)?;
    let x = tape.input(xs);
    let y = tape.input(ys);
    let out = block_forward(tape, cfg, vars, x)?;
    on_output(tape.value(out))?;
    let loss = mse_loss(tape, out, y)?;
    tape.clear_grads();
    tape.backward(loss)?;
    Ok(loss)
}

/// (xs, ys) on the device of the block's parameters.
fn to_param_device(
    tape: &Tape,
    vars: &BlockVars,
    xs: Tensor,
    ys: Tensor,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Storage::Cuda(b) = tape.value(vars.attn_norm).storage() {
        let ctx = b.ctx().clone();
        let put = |t: Tensor| match t.is_cuda() {
            true => Ok(t),
            false => t.to_device(&ctx),
        };
        return Ok((put(xs)?, put(ys)?));
    }
    let _ = (tape, vars);
    Ok((xs, ys))
}

/// Mean MSE of the block (as currently trained) over all samples, without recording gradients.
pub fn eval_block_loss(
    tape: &mut Tape,
    cfg: &LlamaConfig,
    vars: &BlockVars,
    samples: &dyn BlockSamples,
    batch_size: usize,
) -> Result<f32> {
    let n = samples.len();
    let mut total = 0.0f64;
    let mut start = 0;
    while start < n {
        let count = batch_size.min(n - start);
        tape.reset();
        let l = tape.no_grad(|tape| -> Result<f32> {
            let (xs, ys) = samples.pair(start, count)?;
            let (xs, ys) = to_param_device(tape, vars, xs, ys)?;
            let x = tape.input(xs);
            let y = tape.input(ys);
            let out = block_forward(tape, cfg, vars, x)?;
            let loss = mse(tape, out, y)?;
            Ok(tape.value(loss).to_host()?.f32s("eval_block_loss")?[0])
        })?;
        total += l as f64 * count as f64;
        start += count;
    }
    tape.reset();
    Ok((total / n as f64) as f32)
}
