//! Tape-based reverse-mode autograd.
//!
//! The tape is a `Vec` of entries in creation order, which is already a topological order: backward walks it in
//! reverse (no DFS). Parameters are registered first and survive `reset()`; everything after them is one step's
//! activations, whose buffers go back to a pool on `reset()` so the next step reuses them.
//!
//! Accumulation rule: an op's `Backward` writes each input gradient into a fresh zeroed buffer (`=` semantics);
//! the tape adds it into the input's gradient slot (`+=`), which handles inputs used twice (`mul(x, x)`) and
//! parameters shared by several ops. Parameter gradients accumulate across `backward` calls until `zero_grad`.
//! Three opt-in fast paths skip work on large activations (`Backward`'s provided methods): a pass-through of dout
//! (reshape, a same-shape add: no backward runs, no copy), uninitialised buffers for ops that overwrite them (no
//! memset) and the running sum handed to ops that add into it (a GEMM with beta = 1: no separate `+=` pass).
mod backward;
#[cfg(feature = "cuda")]
mod device_values;
#[cfg(feature = "cuda")]
mod fake_quant_copies;
#[cfg(feature = "cuda")]
pub use fake_quant_copies::DeferredGrad;
mod grads;
mod pool;

pub use backward::Backward;
pub use pool::BufferPool;

use grads::{accumulate, grad_buffer, pass_through};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A handle to a value on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

impl Var {
    pub fn index(self) -> usize {
        self.0
    }
}

struct Node {
    inputs: Vec<Var>,
    backward: Box<dyn Backward>,
}

#[derive(Default)]
pub struct Tape {
    values: Vec<Tensor>,
    grads: Vec<Option<Tensor>>,
    requires_grad: Vec<bool>,
    nodes: Vec<Option<Node>>,
    n_params: usize,
    no_grad: bool,
    pool: BufferPool,
    /// bf16 copies of this step's device values (`bf16_copy`), by entry index; dropped on `reset`.
    #[cfg(feature = "cuda")]
    bf16_copies: std::collections::HashMap<usize, std::sync::Arc<crate::gpu::Bf16Buf>>,
    /// Folded norms' outputs (`ops::rmsnorm::rmsnorm_folded`), by entry index; dropped on `reset`.
    #[cfg(feature = "cuda")]
    norm_folds: std::collections::HashMap<usize, crate::ops::rmsnorm::NormFold>,
    /// bf16 twins of this step's gradients (`wants_bf16_twin`); dropped on `reset`.
    #[cfg(feature = "cuda")]
    twins: device_values::Bf16Twins,
    /// Weights whose fake-quantized bf16 value persists between steps (`defer_fake_quant`).
    #[cfg(feature = "cuda")]
    fake_quant_copies: fake_quant_copies::FakeQuantCopies,
    /// Device constants of this tape's ops (`device_constant`), kept across `reset`.
    #[cfg(feature = "cuda")]
    device_constants:
        std::collections::HashMap<String, std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    /// Registers a trainable parameter. Parameters must come before any other entry so that `reset` keeps them.
    pub fn param(&mut self, value: Tensor) -> Result<Var> {
        self.persistent(value, true)
    }

    /// Registers a frozen tensor that survives `reset` (a frozen embedding or norm): no gradient is computed for
    /// it and it is not copied again every step.
    pub fn frozen(&mut self, value: Tensor) -> Result<Var> {
        self.persistent(value, false)
    }

    fn persistent(&mut self, value: Tensor, requires_grad: bool) -> Result<Var> {
        if self.values.len() != self.n_params {
            return Err(Error::Autograd(format!(
                "param registered after {} non-parameter entries; register parameters first",
                self.values.len() - self.n_params
            )));
        }
        let v = self.push_entry(value, requires_grad, None);
        self.n_params += 1;
        Ok(v)
    }

    /// A leaf for this step (an input or constant). With `requires_grad`, `backward` fills its gradient too.
    /// Host f32 values are copied into a pooled buffer so that steady-state steps allocate nothing new.
    pub fn leaf(&mut self, value: Tensor, requires_grad: bool) -> Var {
        let value = match value.f32s("leaf") {
            Ok(src) => {
                let mut t = self.alloc(value.shape());
                t.f32s_mut("leaf")
                    .expect("pooled tensors are host f32")
                    .copy_from_slice(src);
                t
            }
            Err(_) => value,
        };
        self.push_entry(value, requires_grad, None)
    }

    pub fn input(&mut self, value: Tensor) -> Var {
        self.leaf(value, false)
    }

    fn push_entry(&mut self, value: Tensor, requires_grad: bool, node: Option<Node>) -> Var {
        self.values.push(value);
        self.grads.push(None);
        self.requires_grad.push(requires_grad);
        self.nodes.push(node);
        Var(self.values.len() - 1)
    }

    /// Whether an op on `inputs` must record its backward (some input needs a gradient and grad mode is on).
    pub fn needs_grad(&self, inputs: &[Var]) -> bool {
        !self.no_grad && inputs.iter().any(|v| self.requires_grad[v.0])
    }

    /// Records an op's output. `backward` is dropped unless some input needs a gradient.
    pub fn push_op(&mut self, value: Tensor, inputs: &[Var], backward: Box<dyn Backward>) -> Var {
        if self.needs_grad(inputs) {
            let node = Node {
                inputs: inputs.to_vec(),
                backward,
            };
            self.push_entry(value, true, Some(node))
        } else {
            self.push_entry(value, false, None)
        }
    }

    /// Records a value computed without a backward (no-grad paths).
    pub fn push_const(&mut self, value: Tensor) -> Var {
        self.push_entry(value, false, None)
    }

    /// A zeroed host f32 tensor from the pool (ops allocate their outputs here).
    pub fn alloc(&mut self, shape: &[usize]) -> Tensor {
        let buf = self.pool.take_zeroed(crate::tensor::numel(shape));
        Tensor::from_vec(shape, buf).expect("pool buffer has the requested length")
    }

    /// A pooled scalar tensor holding `value` (loss outputs), so scalars are recycled like every other output.
    pub fn alloc_scalar(&mut self, value: f32) -> Tensor {
        let mut t = self.alloc(&[]);
        t.f32s_mut("alloc_scalar")
            .expect("pooled tensors are host f32")[0] = value;
        t
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.values[v.0]
    }

    pub fn value_mut(&mut self, v: Var) -> &mut Tensor {
        // The value may change: a bf16 copy made of it is stale.
        #[cfg(feature = "cuda")]
        {
            self.bf16_copies.remove(&v.0);
            self.norm_folds.remove(&v.0);
            self.fake_quant_copies.invalidate(v.0);
        }
        &mut self.values[v.0]
    }

    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        self.grads[v.0].as_ref()
    }

    pub fn params(&self) -> impl Iterator<Item = Var> {
        (0..self.n_params).map(Var)
    }

    pub fn n_params(&self) -> usize {
        self.n_params
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Runs `f` with recording off: ops compute values but save nothing for backward.
    pub fn no_grad<T>(&mut self, f: impl FnOnce(&mut Tape) -> T) -> T {
        let before = self.no_grad;
        self.no_grad = true;
        let out = f(self);
        self.no_grad = before;
        out
    }

    pub fn is_no_grad(&self) -> bool {
        self.no_grad
    }

    /// Drops this step's entries (keeping parameters and their gradients) and recycles their buffers.
    pub fn reset(&mut self) {
        #[cfg(feature = "cuda")]
        {
            self.bf16_copies.clear();
            self.norm_folds.clear();
            self.twins.by_entry.clear();
        }
        let n = self.n_params;
        for t in self.values.drain(n..) {
            if let Some(buf) = t.into_f32_vec() {
                self.pool.give(buf);
            }
        }
        for g in self.grads.drain(n..).flatten() {
            if let Some(buf) = g.into_f32_vec() {
                self.pool.give(buf);
            }
        }
        self.requires_grad.truncate(n);
        self.nodes.truncate(n);
    }

    /// Zeroes parameter gradients in place (keeps their buffers).
    pub fn zero_grad(&mut self) {
        #[cfg(feature = "cuda")]
        self.fake_quant_copies.clear_grads();
        for g in self.grads[..self.n_params].iter_mut().flatten() {
            if let Ok(s) = g.f32s_mut("zero_grad") {
                s.fill(0.0);
            }
            #[cfg(feature = "cuda")]
            if let Ok(b) = g.gpu_mut("zero_grad") {
                // A memset fails only on a broken context, whose error is sticky: the next launch or copy
                // reports it, so there is nothing to do with it here.
                let _ = b.zero();
            }
        }
    }

    /// Drops the parameter gradients (host buffers go back to the pool): the next `backward` moves each
    /// parameter's first gradient into place instead of adding it to a zeroed buffer, which saves a memset and
    /// an add over every parameter per step. Values equal `zero_grad` + `backward` (0 + g == g).
    pub fn clear_grads(&mut self) {
        #[cfg(feature = "cuda")]
        self.fake_quant_copies.clear_grads();
        for g in self.grads[..self.n_params].iter_mut() {
            if let Some(buf) = g.take().and_then(Tensor::into_f32_vec) {
                self.pool.give(buf);
            }
        }
    }

    /// Takes parameter `v`'s gradient off the tape (None when it has none), for a caller that keeps it elsewhere
    /// between two backwards (E2E-QP moves each layer's scale gradient to host memory); `set_grad` puts it back.
    pub fn take_grad(&mut self, v: Var) -> Option<Tensor> {
        match v.0 < self.n_params {
            true => self.grads[v.0].take(),
            false => None,
        }
    }

    /// Sets parameter `v`'s gradient (the next backward adds to it); errors for a non-parameter or another shape.
    pub fn set_grad(&mut self, v: Var, g: Tensor) -> Result<()> {
        if v.0 >= self.n_params || g.shape() != self.values[v.0].shape() {
            return Err(Error::Autograd(format!(
                "set_grad: entry {} (of {} parameters) with a gradient {:?}",
                v.0,
                self.n_params,
                g.shape()
            )));
        }
        self.grads[v.0] = Some(g);
        Ok(())
    }

    /// Parameter values and gradients together, for optimizers: (value, grad) per parameter, grad None if unused.
    /// Any parameter may change: deferred weights' ŵ_b copies are dropped (the optimizer sets new ones).
    pub fn params_and_grads_mut(&mut self) -> impl Iterator<Item = (&mut Tensor, Option<&Tensor>)> {
        #[cfg(feature = "cuda")]
        self.fake_quant_copies.invalidate_all();
        let n = self.n_params;
        self.values[..n]
            .iter_mut()
            .zip(self.grads[..n].iter().map(|g| g.as_ref()))
    }

    /// Parameter gradients mutably (for clipping).
    pub fn param_grads_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        let n = self.n_params;
        self.grads[..n].iter_mut().flatten()
    }

    /// Fills gradients of every entry that requires one, seeding d(loss)/d(loss) = 1. `loss` must be a scalar.
    pub fn backward(&mut self, loss: Var) -> Result<()> {
        if self.values[loss.0].numel() != 1 {
            return Err(Error::Autograd(format!(
                "backward needs a scalar loss, got shape {:?}",
                self.values[loss.0].shape()
            )));
        }
        if !self.requires_grad[loss.0] {
            return Err(Error::Autograd(
                "loss does not depend on any trainable value".into(),
            ));
        }
        let loss_shape = self.values[loss.0].shape().to_vec();
        let mut seed = self.alloc(&loss_shape);
        seed.f32s_mut("backward")?.fill(1.0);
        #[cfg(feature = "cuda")]
        if let Some(ctx) = crate::gpu::device_of("backward", &[&self.values[loss.0]])? {
            seed = seed.to_device(&ctx)?;
        }
        accumulate(&mut self.grads[loss.0], seed, &mut self.pool)?;
        for i in (0..=loss.0).rev() {
            let Some(node) = self.nodes[i].as_ref() else {
                continue;
            };
            let Some(dout) = self.grads[i].take() else {
                continue;
            };
            if node.backward.passes_dout_through() {
                let needy: Vec<Var> = node
                    .inputs
                    .iter()
                    .copied()
                    .filter(|v| self.requires_grad[v.0])
                    .collect();
                #[cfg(feature = "cuda")]
                let bf16: Vec<Var> = needy
                    .iter()
                    .copied()
                    .filter(|&v| self.takes_bf16_dout(v, i))
                    .collect();
                #[cfg(not(feature = "cuda"))]
                let bf16 = Vec::new();
                #[cfg(feature = "cuda")]
                let twin = self.twins.hand_on(i, &needy, bf16.len());
                #[cfg(not(feature = "cuda"))]
                let twin = None;
                pass_through(
                    &mut self.grads,
                    &self.values,
                    (&needy, &bf16),
                    (dout, twin),
                    &mut self.pool,
                )?;
                continue;
            }
            let inputs: Vec<&Tensor> = node.inputs.iter().map(|v| &self.values[v.0]).collect();
            let uninit = node.backward.overwrites_dinputs();
            let mut dinputs: Vec<Option<Tensor>> = Vec::with_capacity(node.inputs.len());
            let mut acc = vec![false; node.inputs.len()];
            for (j, v) in node.inputs.iter().enumerate() {
                // An input that appears once and holds a gradient already is handed to an op that adds into it.
                let once = node.inputs.iter().filter(|u| *u == v).count() == 1;
                if once && node.backward.accumulates(j) && self.grads[v.0].is_some() {
                    acc[j] = true;
                    dinputs.push(self.grads[v.0].take());
                    continue;
                }
                // A deferred weight's dŵ goes to its `DeferredGrad`, not to a tape slot.
                #[cfg(feature = "cuda")]
                if self.fake_quant_copies.is_deferred(v.0) {
                    dinputs.push(None);
                    continue;
                }
                let f32_dout = self.nodes[v.0]
                    .as_ref()
                    .is_some_and(|n| n.backward.reads_f32_dout());
                dinputs.push(match self.requires_grad[v.0] {
                    true => Some(grad_buffer(
                        &self.values[v.0],
                        (uninit, f32_dout),
                        &mut self.pool,
                    )?),
                    false => None,
                });
            }
            // The loss's node gets dout = 1: its forward may have computed its gradients already.
            let early =
                i == loss.0 && !acc.contains(&true) && node.backward.root_grads(&mut dinputs)?;
            if !early {
                node.backward
                    .backward_into(&inputs, &self.values[i], &dout, &mut dinputs, &acc)?;
            }
            let name = node.backward.name();
            let input_vars = node.inputs.clone();
            for (j, ((v, d), added)) in input_vars.iter().zip(dinputs).zip(acc).enumerate() {
                if let Some(d) = d {
                    if d.shape() != self.values[v.0].shape() {
                        return Err(Error::Autograd(format!(
                            "{name} backward produced a gradient of shape {:?} for an input of shape {:?}",
                            d.shape(),
                            self.values[v.0].shape()
                        )));
                    }
                    // The op's twin is the slot's when the slot holds what the op wrote, and nothing else.
                    #[cfg(feature = "cuda")]
                    self.twins.record(
                        *v,
                        node.backward.take_bf16_twin(j),
                        added || self.grads[v.0].is_none(),
                    );
                    #[cfg(not(feature = "cuda"))]
                    let _ = j;
                    match added {
                        // The slot was taken out above and now holds the sum.
                        true => self.grads[v.0] = Some(d),
                        false => accumulate(&mut self.grads[v.0], d, &mut self.pool)?,
                    }
                }
            }
            // Keep gradients of leaves (inputs asked for); an op output's gradient is spent once its node ran.
            if let Some(buf) = dout.into_f32_vec() {
                self.pool.give(buf);
            }
        }
        Ok(())
    }

    /// Bytes held by the pool for reuse (tests check that steady-state steps stop growing it).
    pub fn pool_held_values(&self) -> usize {
        self.pool.held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_gradient_set_back_accumulates_the_next_backward() {
        let mut tape = Tape::new();
        let p = tape
            .param(Tensor::from_vec(&[3], vec![1.0, -2.0, 0.5]).unwrap())
            .unwrap();
        let loss = |tape: &mut Tape| {
            let y = crate::ops::mul::mul(tape, p, p).unwrap();
            crate::ops::sum::sum(tape, y).unwrap()
        };
        let l = loss(&mut tape);
        tape.backward(l).unwrap();
        let g = tape.take_grad(p).unwrap();
        assert_eq!(g.f32s("t").unwrap(), [2.0, -4.0, 1.0]);
        assert!(tape.grad(p).is_none() && tape.take_grad(p).is_none());
        tape.reset();
        tape.set_grad(p, g).unwrap();
        let l = loss(&mut tape);
        tape.backward(l).unwrap();
        assert_eq!(tape.grad(p).unwrap().f32s("t").unwrap(), [4.0, -8.0, 2.0]);
        let e = tape
            .set_grad(p, Tensor::zeros(&[2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("set_grad") && e.contains("[2]"), "{e}");
        assert!(
            tape.set_grad(l, Tensor::zeros(&[])).is_err(),
            "not a parameter"
        );
    }
}
