//! The tape's per-step device values of the bf16 mode: the bf16 copies ops share (`bf16_copy`), device constants
//! (`device_constant`), folded norms' outputs (`norm_fold`), and which pass-through inputs may take a bf16 gradient
//! (`takes_bf16_dout`).
use super::{Node, Tape, Var};
use crate::error::{Error, Result};

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
