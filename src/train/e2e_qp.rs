//! E2E-QP: with the integer weights and zero points frozen, train only the step sizes (scales) of every
//! quantized linear end to end with the causal-LM cross-entropy.
//!
//! Recipe (formats.md §1.2): AdamW lr 2e-5 at 2 bits and 1e-5 otherwise, weight decay 0, global gradient-norm
//! clip 0.3, cosine schedule with HF-style warmup (3% of steps) decaying to 0, one epoch, the global batch built
//! by gradient accumulation. The forward dequantizes each packed linear on the fly (`real_quant_linear`); norms,
//! embeddings and the output head are frozen tensors on the tape, so no model-sized gradient buffer exists.
use crate::autograd::{Tape, Var};
use crate::dist::{shard, Communicator, SingleRank};
use crate::error::{Error, Result};
use crate::model::llama::block_forward_with;
use crate::model::quantized::QuantizedModel;
use crate::ops::{
    cross_entropy::cross_entropy, embedding::embedding, linear::linear, rmsnorm::rmsnorm,
};
use crate::quant::real_quant::linear::real_quant_linear;
use crate::tensor::Tensor;
use crate::train::adamw::{AdamW, ParamGroup};
use crate::train::clip::clip_grad_norm;
use crate::train::schedule::CosineSchedule;

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

/// The model's tensors on a tape: trainable scales first (parameters), then the frozen tensors.
struct ModelVars {
    scales: Vec<[Var; 7]>,
    norms: Vec<(Var, Var)>,
    embedding: Var,
    final_norm: Var,
    head: Var,
}

fn register(tape: &mut Tape, m: &QuantizedModel) -> Result<ModelVars> {
    let mut scales = Vec::with_capacity(m.blocks.len());
    for b in &m.blocks {
        let mut s = Vec::with_capacity(7);
        for l in &b.linears {
            s.push(tape.param(l.scales().clone())?);
        }
        scales.push(s.try_into().expect("seven linears"));
    }
    let mut norms = Vec::with_capacity(m.blocks.len());
    for b in &m.blocks {
        norms.push((
            tape.frozen(b.attn_norm.clone())?,
            tape.frozen(b.ffn_norm.clone())?,
        ));
    }
    let embedding = tape.frozen(m.embedding.clone())?;
    let final_norm = tape.frozen(m.final_norm.clone())?;
    let head = match &m.lm_head {
        Some(h) => tape.frozen(h.clone())?,
        None => embedding,
    };
    Ok(ModelVars {
        scales,
        norms,
        embedding,
        final_norm,
        head,
    })
}

/// Mean cross-entropy of one sequence on the tape.
fn sequence_loss(tape: &mut Tape, m: &QuantizedModel, v: &ModelVars, ex: &Example) -> Result<Var> {
    let t = ex.ids.len();
    let mut x = embedding(tape, v.embedding, &ex.ids, &[1, t])?;
    for (i, b) in m.blocks.iter().enumerate() {
        let (attn_norm, ffn_norm) = v.norms[i];
        let scales = v.scales[i];
        x = block_forward_with(
            tape,
            &m.cfg,
            attn_norm,
            ffn_norm,
            x,
            &mut |tape, j, input| real_quant_linear(tape, input, &b.linears[j], scales[j]),
        )?;
    }
    let h = rmsnorm(tape, x, v.final_norm, m.cfg.rms_eps)?;
    let logits = linear(tape, h, v.head, None)?;
    cross_entropy(tape, logits, &ex.labels, IGNORE)
}

/// The loss of one example and the gradient of every scale, in [block][linear] order: what one sequence adds to
/// an E2E-QP step (for checks of the labels; training goes through [`train_e2e`]).
pub fn example_loss_and_grads(model: &QuantizedModel, ex: &Example) -> Result<(f32, Vec<Tensor>)> {
    let mut tape = Tape::new();
    let vars = register(&mut tape, model)?;
    let loss = sequence_loss(&mut tape, model, &vars, ex)?;
    tape.backward(loss)?;
    let value = tape.value(loss).f32s("e2e_qp")?[0];
    let grads = vars
        .scales
        .iter()
        .flatten()
        .map(|&s| {
            tape.grad(s)
                .cloned()
                .ok_or_else(|| Error::invalid("e2e_qp", "a scale received no gradient"))
        })
        .collect::<Result<_>>()?;
    Ok((value, grads))
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
/// slice ([`shard`]) of every global batch. Each rank accumulates loss/global_batch over its sequences, exactly
/// as the single rank does over all of them; the summed gradients (`all_reduce_sum`) are then the single-rank
/// gradients up to the order of the f32 additions, and every rank clips and steps identically, so the scales
/// stay equal on all ranks. Returns the loss of every optimizer step (the global-batch mean).
pub fn train_e2e_dist(
    model: &mut QuantizedModel,
    data: &[Example],
    opts: &E2eOptions,
    comm: &dyn Communicator,
    mut on_step: impl FnMut(E2eStep),
) -> Result<Vec<f32>> {
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
    if opts.global_batch == 0 || data.len() < opts.global_batch {
        return Err(Error::invalid(
            "e2e_qp",
            format!(
                "{} training sequences cannot fill one global batch of {}",
                data.len(),
                opts.global_batch
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
    let mut tape = Tape::new();
    let vars = register(&mut tape, model)?;
    let params: Vec<Var> = vars.scales.iter().flatten().copied().collect();
    let mut opt = AdamW::new(
        vec![ParamGroup {
            params,
            lr: opts.lr,
            weight_decay: opts.weight_decay,
        }],
        0.9,
        0.999,
        1e-8,
    )?;
    let steps_per_epoch = data.len() / opts.global_batch;
    let total = steps_per_epoch * opts.epochs;
    let warmup = (opts.warmup_ratio as f64 * total as f64).ceil() as u64;
    let mut schedule = CosineSchedule::new(total as u64, f32::INFINITY)?;
    if warmup > 0 && (warmup as usize) < total {
        schedule = schedule.with_warmup(warmup)?;
    }
    let mut losses = Vec::with_capacity(total);
    for step in 0..total {
        let first = (step % steps_per_epoch) * opts.global_batch;
        tape.zero_grad();
        let mut loss_sum = 0.0f64;
        let mine = shard(opts.global_batch, comm.rank(), world);
        for ex in &data[first + mine.start..first + mine.end] {
            tape.reset();
            let loss = sequence_loss(&mut tape, model, &vars, ex)?;
            // Mean over the global batch: scale each sequence's gradient by 1/global_batch.
            let scaled = crate::ops::scale::scale(&mut tape, loss, 1.0 / opts.global_batch as f32)?;
            let l = tape.value(loss).f32s("e2e_qp")?[0];
            if !l.is_finite() {
                return Err(Error::NonFinite {
                    what: format!("E2E-QP loss at step {step}"),
                });
            }
            loss_sum += l as f64;
            tape.backward(scaled)?;
        }
        tape.reset();
        if world > 1 {
            loss_sum = all_reduce_grads(&mut tape, comm, loss_sum as f32)? as f64;
        }
        let grad_norm = clip_grad_norm(&mut tape, opts.max_grad_norm)?;
        opt.step(&mut tape, schedule.lr_factor(step as u64))?;
        let loss = (loss_sum / opts.global_batch as f64) as f32;
        losses.push(loss);
        on_step(E2eStep {
            step,
            total_steps: total,
            loss,
            grad_norm,
        });
    }
    for (b, s) in model.blocks.iter_mut().zip(&vars.scales) {
        for (l, &v) in b.linears.iter_mut().zip(s) {
            l.set_scales(tape.value(v).clone())?;
        }
    }
    Ok(losses)
}

/// Sums every parameter gradient and `loss_sum` over the ranks (one flat buffer, one collective); returns the
/// summed loss.
fn all_reduce_grads(tape: &mut Tape, comm: &dyn Communicator, loss_sum: f32) -> Result<f32> {
    let mut flat = Vec::new();
    for g in tape.param_grads_mut() {
        flat.extend_from_slice(g.f32s("e2e_qp all-reduce")?);
    }
    flat.push(loss_sum);
    comm.all_reduce_sum(&mut flat)?;
    let mut at = 0;
    for g in tape.param_grads_mut() {
        let d = g.f32s_mut("e2e_qp all-reduce")?;
        d.copy_from_slice(&flat[at..at + d.len()]);
        at += d.len();
    }
    Ok(flat[at])
}
