//! One sequence of E2E-QP on the tape: the model's tensors registered there, the forward that keeps only the
//! block inputs, the head's backward, and the per-block recomputation and backward (the module docs of
//! `e2e_qp` say why), with the scale gradients left on the tape or moved out around each block.
#[cfg(feature = "cuda")]
use super::grads::PinnedGrads;
use super::offload::BlockInputs;
use super::{Example, IGNORE};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::model::llama::block_forward_with;
use crate::model::quantized::QuantizedModel;
use crate::ops::{
    cross_entropy::cross_entropy, embedding::embedding, linear::linear, mul::mul, rmsnorm::rmsnorm,
    scale::scale, sum::sum,
};
use crate::quant::real_quant::linear::real_quant_linear;
use crate::tensor::Tensor;
use crate::train::device::Device;

/// The model's tensors on a tape: trainable scales first (parameters), then the frozen tensors.
pub(super) struct ModelVars {
    pub scales: Vec<[Var; 7]>,
    norms: Vec<(Var, Var)>,
    embedding: Var,
    final_norm: Var,
    head: Var,
}

/// The model's tensors on `dev`; with `host_embedding` an untied embedding table stays on the host.
pub(super) fn register(
    tape: &mut Tape,
    m: &QuantizedModel,
    dev: &Device,
    host_embedding: bool,
) -> Result<ModelVars> {
    let mut scales = Vec::with_capacity(m.blocks.len());
    for b in &m.blocks {
        let mut s = Vec::with_capacity(7);
        for l in &b.linears {
            s.push(tape.param(dev.copy(l.scales())?)?);
        }
        scales.push(s.try_into().expect("seven linears"));
    }
    let mut norms = Vec::with_capacity(m.blocks.len());
    for b in &m.blocks {
        norms.push((
            tape.frozen(dev.copy(&b.attn_norm)?)?,
            tape.frozen(dev.copy(&b.ffn_norm)?)?,
        ));
    }
    let embedding = match host_embedding && m.lm_head.is_some() {
        true => tape.frozen(m.embedding.to_host()?)?,
        false => tape.frozen(dev.copy(&m.embedding)?)?,
    };
    let final_norm = tape.frozen(dev.copy(&m.final_norm)?)?;
    let head = match &m.lm_head {
        Some(h) => tape.frozen(dev.copy(h)?)?,
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

/// Moves a value off the tape (the entry keeps an empty placeholder until the next `reset`).
fn take_value(tape: &mut Tape, v: Var) -> Tensor {
    std::mem::replace(tape.value_mut(v), Tensor::zeros(&[0]))
}

/// Block `i` on the tape: x [1, T, C] -> [1, T, C].
fn block(tape: &mut Tape, m: &QuantizedModel, v: &ModelVars, i: usize, x: Var) -> Result<Var> {
    let (attn_norm, ffn_norm) = v.norms[i];
    let scales = v.scales[i];
    let linears = &m.blocks[i].linears;
    block_forward_with(
        tape,
        &m.cfg,
        (attn_norm, false),
        ffn_norm,
        x,
        &mut |tape, j, input| real_quant_linear(tape, input, &linears[j], scales[j]),
    )
}

/// What happens to a block's scale gradients around its backward: they stay on the tape, or visit it
/// (`grads::PinnedGrads`).
pub(super) trait BlockGrads {
    fn before(&mut self, tape: &mut Tape, scales: &[Var]) -> Result<()>;
    fn after(&mut self, tape: &mut Tape, scales: &[Var]) -> Result<()>;
}

/// The gradients accumulate on the tape.
pub(super) struct OnTape;

impl BlockGrads for OnTape {
    fn before(&mut self, _: &mut Tape, _: &[Var]) -> Result<()> {
        Ok(())
    }
    fn after(&mut self, _: &mut Tape, _: &[Var]) -> Result<()> {
        Ok(())
    }
}

/// Where one sequence stands in its optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct SeqPos {
    pub first: bool,
    pub last: bool,
}

/// The gradients wait in pinned host memory between blocks.
#[cfg(feature = "cuda")]
pub(super) struct Offloaded<'a>(pub &'a mut PinnedGrads, pub SeqPos);

#[cfg(feature = "cuda")]
impl BlockGrads for Offloaded<'_> {
    fn before(&mut self, tape: &mut Tape, scales: &[Var]) -> Result<()> {
        self.0.restore(tape, scales, self.1)
    }
    fn after(&mut self, tape: &mut Tape, scales: &[Var]) -> Result<()> {
        self.0.stash(tape, scales, self.1)
    }
}

/// One sequence's forward and backward with per-block recomputation (module docs); the scale gradients of
/// `weight` × its mean cross-entropy are added to the tape's (or to `grads`' store). Returns the (unweighted)
/// loss. `inputs` keeps the block inputs (empty before and after); `dev` is where the blocks run.
pub(super) fn sequence_backward(
    tape: &mut Tape,
    m: &QuantizedModel,
    v: &ModelVars,
    (ex, weight): (&Example, f32),
    inputs: &mut BlockInputs,
    dev: &Device,
    grads: &mut dyn BlockGrads,
) -> Result<f32> {
    let t = ex.ids.len();
    let n_blocks = m.blocks.len();
    tape.reset();
    let x = tape.no_grad(|tape| embedding(tape, v.embedding, &ex.ids, &[1, t]))?;
    // An embedding kept on the host gives host rows: move them to the blocks' device.
    let mut x = take_value(tape, x);
    if !x.is_cuda() {
        x = dev.put(x)?;
    }
    for i in 0..n_blocks {
        tape.reset();
        let xv = tape.leaf(x, false);
        let y = tape.no_grad(|tape| block(tape, m, v, i, xv))?;
        x = take_value(tape, y);
        inputs.push(take_value(tape, xv))?;
    }

    tape.reset();
    let xv = tape.leaf(x, true);
    let h = rmsnorm(tape, xv, v.final_norm, m.cfg.rms_eps)?;
    let logits = linear(tape, h, v.head, None)?;
    let loss = cross_entropy(tape, logits, &ex.labels, IGNORE)?;
    let value = tape.value(loss).to_host()?.f32s("e2e_qp")?[0];
    if !value.is_finite() {
        return Err(Error::NonFinite {
            what: "E2E-QP sequence loss".into(),
        });
    }
    let weighted = scale(tape, loss, weight)?;
    tape.backward(weighted)?;
    let mut dy = tape
        .grad(xv)
        .ok_or_else(|| Error::Autograd("e2e_qp: no gradient at the last block's output".into()))?
        .clone();

    for i in (0..n_blocks).rev() {
        tape.reset();
        let x = inputs.pop()?;
        // The embedding is frozen: the first block's input needs no gradient.
        let xv = tape.leaf(x, i > 0);
        let y = block(tape, m, v, i, xv)?;
        let dyv = tape.input(dy);
        let surrogate = mul(tape, y, dyv)?;
        let surrogate = sum(tape, surrogate)?;
        grads.before(tape, &v.scales[i])?;
        tape.backward(surrogate)?;
        grads.after(tape, &v.scales[i])?;
        dy = match i {
            0 => Tensor::zeros(&[0]),
            _ => tape
                .grad(xv)
                .ok_or_else(|| {
                    Error::Autograd(format!("e2e_qp: no gradient at block {i}'s input"))
                })?
                .clone(),
        };
    }
    tape.reset();
    Ok(value)
}

/// The loss of one example and the gradient of every scale, in [block][linear] order: what one sequence adds to
/// an E2E-QP step (for checks of the labels; training goes through [`train_e2e`]). On the host.
pub fn example_loss_and_grads(model: &QuantizedModel, ex: &Example) -> Result<(f32, Vec<Tensor>)> {
    let mut tape = Tape::new();
    let vars = register(&mut tape, model, &Device::Cpu, false)?;
    let mut inputs = BlockInputs::new(false);
    let value = sequence_backward(
        &mut tape,
        model,
        &vars,
        (ex, 1.0),
        &mut inputs,
        &Device::Cpu,
        &mut OnTape,
    )?;
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
