//! The tape's per-step device values of the bf16 mode: the bf16 copies ops share (`bf16_copy`), device constants
//! (`device_constant`), folded norms' outputs (`norm_fold`), which pass-through inputs may take a bf16 gradient
//! (`takes_bf16_dout`), and the bf16 twins of gradients that ops write for them (`wants_bf16_twin`).
use super::{Node, Tape, Var};
use crate::error::{Error, Result};
use crate::gpu::Bf16Buf;
use std::collections::HashMap;

/// The bf16 twins of this step's gradients, by entry: bf16(grads[entry]) as the op that left that gradient final
/// wrote it in its own pass, for the pass-through node that hands its input bf16(dout) (no cast pass then).
#[derive(Default)]
pub(super) struct Bf16Twins {
    pub(super) by_entry: HashMap<usize, Bf16Buf>,
    /// `Tape::set_bf16_twins(false)`: none asked for (casts instead; for comparisons).
    off: bool,
    /// Twins handed on since the tape was made.
    used: usize,
}

impl Bf16Twins {
    /// After an op's backward wrote into v's slot: `twin` is the slot's when `sole` (the slot holds exactly what the
    /// op wrote); any other change to the slot leaves an older twin stale.
    pub(super) fn record(&mut self, v: Var, twin: Option<Bf16Buf>, sole: bool) {
        match twin {
            Some(b) if sole => {
                self.by_entry.insert(v.0, b);
            }
            _ => {
                self.by_entry.remove(&v.0);
            }
        }
    }

    /// The twin of pass-through node `node`'s dout for the `bf16` inputs that take bf16(dout) (one at most uses
    /// it); the `needy` inputs' slots change, so their own twins go.
    pub(super) fn hand_on(&mut self, node: usize, needy: &[Var], bf16: usize) -> Option<Bf16Buf> {
        for v in needy {
            self.by_entry.remove(&v.0);
        }
        let twin = self.by_entry.remove(&node).filter(|_| bf16 > 0);
        self.used += twin.is_some() as usize;
        twin
    }
}

impl Tape {
    /// The bf16 copy (round to nearest even) of device value `v`, made once per step and shared by every op
    /// that multiplies it in the bf16 mode (q, k and v read the same normed input). Parameters, which
    /// optimizers change in place, are cast afresh each time.
    pub fn bf16_copy(&mut self, v: Var) -> Result<std::sync::Arc<crate::gpu::Bf16Buf>> {
        if let Some(b) = self.bf16_copies.get(&v.0) {
            return Ok(b.clone());
        }
        // A bf16 value is its own copy.
        if let crate::tensor::Storage::CudaBf16(b) = self.values[v.0].storage() {
            return Ok(b.clone());
        }
        let b = std::sync::Arc::new(crate::ops::linear::cast_bf16_cuda(
            self.values[v.0].gpu("bf16_copy")?,
        )?);
        if v.0 >= self.n_params {
            self.bf16_copies.insert(v.0, b.clone());
        }
        Ok(b)
    }

    /// A device constant of an op (a table it reads every call), made by `make` the first time `key` is asked
    /// for and kept as long as the tape, across `reset`. A key must always name the same type of value.
    pub fn device_constant<T: std::any::Any + Send + Sync>(
        &mut self,
        key: &str,
        make: impl FnOnce() -> Result<std::sync::Arc<T>>,
    ) -> Result<std::sync::Arc<T>> {
        if let Some(c) = self.device_constants.get(key) {
            return c.clone().downcast::<T>().map_err(|_| {
                Error::Autograd(format!(
                    "device constant {key:?} was made with another type"
                ))
            });
        }
        let c = make()?;
        self.device_constants.insert(key.to_string(), c.clone());
        Ok(c)
    }

    /// Records `b` as the bf16 copy of this step's value `v`, written by the op that produced v in the same pass
    /// (it must equal what `bf16_copy` would make: round to nearest even).
    pub fn set_bf16_copy(&mut self, v: Var, b: crate::gpu::Bf16Buf) {
        if v.0 >= self.n_params {
            self.bf16_copies.insert(v.0, std::sync::Arc::new(b));
        }
    }

    /// Records that value `v` is a folded norm's output (`ops::rmsnorm::rmsnorm_folded`).
    pub fn set_norm_fold(&mut self, v: Var, fold: crate::ops::rmsnorm::NormFold) {
        self.norm_folds.insert(v.0, fold);
    }

    /// The fold of value `v` when a folded norm made it: its readers owe γ its gradient.
    pub fn norm_fold(&self, v: Var) -> Option<crate::ops::rmsnorm::NormFold> {
        self.norm_folds.get(&v.0).cloned()
    }

    /// Whether the op about to be recorded, reading `v`, should write the bf16 twin of v's gradient in its backward
    /// (`Backward::take_bf16_twin`): v is an f32 device value from a pass-through node that will hand one of its
    /// inputs bf16(dout) (`takes_bf16_dout`), and no op recorded since v reads it, so that this op's backward runs
    /// last among v's readers and leaves v's gradient final.
    pub fn wants_bf16_twin(&self, v: Var) -> bool {
        let Some(node) = self.nodes[v.0].as_ref() else {
            return false;
        };
        !self.twins.off
            && node.backward.passes_dout_through()
            && self.values[v.0].dtype() == crate::tensor::DType::F32
            && self.values[v.0].is_cuda()
            && !self.nodes[v.0 + 1..]
                .iter()
                .flatten()
                .any(|n| n.inputs.contains(&v))
            && node
                .inputs
                .iter()
                .any(|&u| self.requires_grad[u.0] && self.takes_bf16_dout(u, v.0))
    }

    /// Turns the bf16 twins of gradients off (each pass-through then casts) or back on, for comparisons.
    pub fn set_bf16_twins(&mut self, on: bool) {
        self.twins.off = !on;
    }

    /// How many bf16 twins pass-through nodes handed on (instead of casting) since the tape was made.
    pub fn bf16_twins_used(&self) -> usize {
        self.twins.used
    }

    /// Whether entry `v`, read by the pass-through node `reader`, may take a bf16 copy of an f32 gradient: its
    /// producer reads its dout only as bf16 (`Backward::reads_dout_as_bf16`) and `reader` is its only reader, so
    /// no second gradient (which a bf16 one could not be added to) will come.
    pub(super) fn takes_bf16_dout(&self, v: Var, reader: usize) -> bool {
        let producer_wants = self.nodes[v.0]
            .as_ref()
            .is_some_and(|n| n.backward.reads_dout_as_bf16());
        let reads = |n: &Option<Node>| {
            n.as_ref()
                .map_or(0, |n| n.inputs.iter().filter(|u| **u == v).count())
        };
        producer_wants
            && self.values[v.0].dtype() == crate::tensor::DType::F32
            && self.nodes[v.0 + 1..].iter().map(reads).sum::<usize>() == 1
            && reads(&self.nodes[reader]) == 1
    }
}
