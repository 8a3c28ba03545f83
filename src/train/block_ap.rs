//! Block-AP for one block: train all of a block's parameters (weights, norms, scales, zeros) under fake
//! quantization so that its output on quantized inputs matches the full-precision block's output (MSE).
//!
//! Defaults are the official recipe (formats.md §1.2): AdamW with weight decay 0, quant_lr 1e-4 for scales and
//! zeros, weight_lr 2e-5 at 2 bits and 1e-5 otherwise for weights and norms, cosine decay to lr/20, batch 2,
//! 2 epochs, no gradient clipping, samples visited in order.
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use crate::ops::mse::mse;
use crate::quant::fake_quant::QuantConfig;
use crate::tensor::Tensor;
use crate::train::adamw::{AdamW, ParamGroup};
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
    let mut tape = Tape::new();
    let vars = BlockVars::register(&mut tape, weights, Some(opts.quant))?;
    let mut weight_params = vec![vars.attn_norm, vars.ffn_norm];
    let mut quant_params = Vec::new();
    for l in &vars.linears {
        weight_params.push(l.weight);
        if let Some((s, z)) = l.quant {
            quant_params.extend([s, z]);
        }
    }
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
    let steps_per_epoch = n / opts.batch_size;
    let total_steps = steps_per_epoch * opts.epochs;
    let schedule = CosineSchedule::new(total_steps as u64, opts.min_lr_factor)?;
    let mut step_losses = Vec::with_capacity(total_steps);
    let mut val_losses = Vec::with_capacity(opts.epochs);
    for epoch in 0..opts.epochs {
        for i in 0..steps_per_epoch {
            let step = epoch * steps_per_epoch + i;
            tape.reset();
            let (xs, ys) = train.train_pair(step, i * opts.batch_size, opts.batch_size)?;
            let x = tape.input(xs);
            let y = tape.input(ys);
            let out = block_forward(&mut tape, cfg, &vars, x)?;
            on_output(step, i * opts.batch_size, tape.value(out))?;
            let loss = mse(&mut tape, out, y)?;
            let loss_value = tape.value(loss).f32s("train_block")?[0];
            if !loss_value.is_finite() {
                return Err(Error::NonFinite {
                    what: format!("Block-AP loss at epoch {epoch} step {step}"),
                });
            }
            tape.zero_grad();
            tape.backward(loss)?;
            opt.step(&mut tape, schedule.lr_factor(step as u64))?;
            step_losses.push(loss_value);
            on_step(StepInfo {
                step,
                total_steps,
                epoch,
                loss: loss_value,
            });
        }
        if let Some(val) = val {
            val_losses.push(eval_block_loss(
                &mut tape,
                cfg,
                &vars,
                val,
                opts.batch_size,
            )?);
        }
    }
    let quant_of = |i: usize| vars.linears[i].quant.expect("registered with quantization");
    Ok(TrainedBlock {
        weights: vars.weights(&tape),
        scales: std::array::from_fn(|i| tape.value(quant_of(i).0).clone()),
        zeros: std::array::from_fn(|i| tape.value(quant_of(i).1).clone()),
        step_losses,
        val_losses,
    })
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
            let x = tape.input(xs);
            let y = tape.input(ys);
            let out = block_forward(tape, cfg, vars, x)?;
            let loss = mse(tape, out, y)?;
            Ok(tape.value(loss).f32s("eval_block_loss")?[0])
        })?;
        total += l as f64 * count as f64;
        start += count;
    }
    tape.reset();
    Ok((total / n as f64) as f32)
}
