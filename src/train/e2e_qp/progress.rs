//! Where an E2E-QP run stands between two optimizer steps, enough to continue it bit for bit after a crash: the
//! trained scales, AdamW's step counts and moments, and the loss of every step so far.
//!
//! Nothing else needs saving. The data order is fixed (step k trains on global batch k mod steps-per-epoch, in
//! the order of the examples), the learning rate is a function of the step index, E2E-QP draws no random
//! numbers, and the gradient buffers are rebuilt from zero in every step. So the number of steps done is also
//! the data position and the schedule position; [`E2eIdentity`] makes sure the data and settings are the same.
use super::{E2eOptions, E2eTrainer, Example};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::train::adamw::AdamWState;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// The state of an E2E-QP run after `losses.len()` optimizer steps, in host memory.
#[derive(Clone, Debug)]
pub struct E2eProgress {
    /// The mean loss of every step done; the next step trains global batch `losses.len()`.
    pub losses: Vec<f32>,
    /// The trained scales, [block][linear] order.
    pub scales: Vec<Tensor>,
    /// AdamW's state, its parameters in the order of `scales`.
    pub adamw: AdamWState,
}

impl E2eProgress {
    pub fn steps_done(&self) -> usize {
        self.losses.len()
    }
}

/// Equal losses, AdamW states, and scales of equal shapes and host values.
impl PartialEq for E2eProgress {
    fn eq(&self, other: &E2eProgress) -> bool {
        let same = |a: &Tensor, b: &Tensor| {
            a.shape() == b.shape()
                && matches!((a.f32s("E2eProgress"), b.f32s("E2eProgress")), (Ok(x), Ok(y)) if x == y)
        };
        self.losses == other.losses
            && self.adamw == other.adamw
            && self.scales.len() == other.scales.len()
            && self
                .scales
                .iter()
                .zip(&other.scales)
                .all(|(a, b)| same(a, b))
    }
}

/// What a saved [`E2eProgress`] must match to continue a run: every E2E-QP setting that changes the result
/// (`settings`, keys named like the `engine train` flags), with a SHA-256 of the training data, and the number
/// of steps the run makes.
#[derive(Clone, Debug, PartialEq)]
pub struct E2eIdentity {
    pub settings: Value,
    pub total_steps: usize,
}

impl E2eIdentity {
    pub fn new(opts: &E2eOptions, data: &[Example]) -> E2eIdentity {
        let mut sha = Sha256::new();
        for e in data {
            sha.update((e.ids.len() as u64).to_le_bytes());
            let ids: Vec<u8> = e.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
            let labels: Vec<u8> = e.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
            sha.update(ids);
            sha.update(labels);
        }
        let digest: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
        E2eIdentity {
            settings: json!({
                "e2e_lr": readable(opts.lr),
                "e2e_batch": opts.global_batch,
                "e2e_epochs": opts.epochs,
                "e2e_weight_decay": readable(opts.weight_decay),
                "e2e_max_grad_norm": readable(opts.max_grad_norm),
                "e2e_warmup_ratio": readable(opts.warmup_ratio),
                "e2e_examples": data.len(),
                "e2e_data_sha256": digest,
            }),
            total_steps: total_steps(data.len(), opts),
        }
    }
}

/// `x` as the f64 its shortest decimal names (0.00001, not 9.999999747378752e-6): as exact a record of the
/// f32, and readable in an error message.
fn readable(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::NAN)
}

/// Optimizer steps of E2E-QP on `examples` sequences: whole global batches, every epoch.
pub(super) fn total_steps(examples: usize, opts: &E2eOptions) -> usize {
    match opts.global_batch {
        0 => 0,
        b => examples / b * opts.epochs,
    }
}

/// The flags behind a setting of [`E2eIdentity::settings`], for error messages.
pub fn identity_flags(key: &str) -> &'static str {
    match key {
        "e2e_lr" => "--e2e-lr",
        "e2e_batch" => "--e2e-batch",
        "e2e_epochs" => "--e2e-epochs",
        "e2e_examples" => "--e2e-train-size, --e2e-data",
        "e2e_data_sha256" => "--e2e-data, --e2e-seqlen, --e2e-train-size, --calib, --seed",
        _ => "the recipe's constants (a different eqat version)",
    }
}

/// How often `engine train` saves E2E-QP's progress (it always saves after the last step too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SaveEvery {
    /// After every N-th optimizer step (`parse` gives N >= 1; 0 saves only after the last step).
    Steps(usize),
    /// After the first step that ends this long after the last save (or the start).
    Interval(Duration),
}

impl SaveEvery {
    /// The default: every 5 minutes, whatever a step costs on the model and device at hand.
    pub const DEFAULT: SaveEvery = SaveEvery::Interval(Duration::from_secs(300));

    /// `N` (optimizer steps) or a duration `Ns`, `Nm`, `Nh`; N a positive integer.
    pub fn parse(s: &str) -> Result<SaveEvery> {
        let bad = || {
            Error::invalid(
                "engine train",
                format!("--e2e-checkpoint-every {s}: expected N steps (e.g. 50) or a duration (90s, 5m, 1h)"),
            )
        };
        let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => s.split_at(i),
            None => (s, ""),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        let secs = |per: u64| n.checked_mul(per).map(Duration::from_secs).ok_or_else(bad);
        Ok(match unit {
            "" => SaveEvery::Steps(usize::try_from(n).map_err(|_| bad())?),
            "s" => SaveEvery::Interval(secs(1)?),
            "m" => SaveEvery::Interval(secs(60)?),
            "h" => SaveEvery::Interval(secs(3600)?),
            _ => return Err(bad()),
        })
    }

    /// Whether to save now, `steps_done` steps into the run and `since_save` after the last save.
    pub fn due(&self, steps_done: usize, since_save: Duration) -> bool {
        match *self {
            SaveEvery::Steps(n) => steps_done > 0 && steps_done.is_multiple_of(n),
            SaveEvery::Interval(d) => since_save >= d,
        }
    }
}

impl E2eTrainer {
    /// The trainer's state with `losses` as host copies (moments of GPU parameters synchronised first).
    pub(super) fn progress(&mut self, losses: &[f32]) -> Result<E2eProgress> {
        #[cfg(feature = "cuda")]
        self.opt.sync_state_to_host()?;
        let scales = self
            .vars
            .scales
            .iter()
            .flatten()
            .map(|&v| self.tape.value(v).to_host())
            .collect::<Result<_>>()?;
        Ok(E2eProgress {
            losses: losses.to_vec(),
            scales,
            adamw: self.opt.state().clone(),
        })
    }

    /// Puts `progress`'s scales (on the trainer's device) and AdamW state in place of the fresh ones.
    pub(super) fn restore(&mut self, progress: E2eProgress) -> Result<()> {
        let vars: Vec<_> = self.vars.scales.iter().flatten().copied().collect();
        if progress.scales.len() != vars.len() {
            return Err(Error::shape(
                "e2e_qp resume",
                format!(
                    "saved progress holds {} scales, the model has {}",
                    progress.scales.len(),
                    vars.len()
                ),
            ));
        }
        for (i, (&v, s)) in vars.iter().zip(&progress.scales).enumerate() {
            let want = self.tape.value(v).shape();
            let state = progress.adamw.params.get(i);
            let moments = state.map_or(0, |p| p.m.len());
            if s.shape() != want || (moments != 0 && moments != s.numel()) {
                return Err(Error::shape(
                    "e2e_qp resume",
                    format!(
                        "saved scale {i} is {:?} with {moments} AdamW moments, the model's {want:?}",
                        s.shape()
                    ),
                ));
            }
        }
        self.opt.load_state(progress.adamw)?;
        for (&v, s) in vars.iter().zip(&progress.scales) {
            *self.tape.value_mut(v) = self.device.copy(s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_every_parses_steps_and_durations_and_rejects_the_rest() {
        assert_eq!(SaveEvery::parse("50").unwrap(), SaveEvery::Steps(50));
        assert_eq!(
            SaveEvery::parse("90s").unwrap(),
            SaveEvery::Interval(Duration::from_secs(90))
        );
        assert_eq!(SaveEvery::parse("5m").unwrap(), SaveEvery::DEFAULT);
        assert_eq!(
            SaveEvery::parse("2h").unwrap(),
            SaveEvery::Interval(Duration::from_secs(7200))
        );
        for bad in [
            "",
            "0",
            "0m",
            "m",
            "5d",
            "-3",
            "1.5m",
            "5 m",
            "99999999999999999999h",
        ] {
            let e = SaveEvery::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--e2e-checkpoint-every"), "{bad:?}: {e}");
        }
        let every3 = SaveEvery::Steps(3);
        assert!(!every3.due(2, Duration::ZERO) && every3.due(3, Duration::ZERO));
        assert!(!SaveEvery::Steps(0).due(3, Duration::ZERO));
        let minute = SaveEvery::Interval(Duration::from_secs(60));
        assert!(!minute.due(7, Duration::from_secs(59)) && minute.due(7, Duration::from_secs(60)));
    }

    #[test]
    fn the_identity_changes_with_the_data_and_the_settings() {
        let data = vec![Example::causal(vec![1, 2, 3]), Example::causal(vec![4, 5])];
        let opts = E2eOptions {
            global_batch: 1,
            ..E2eOptions::recipe(3)
        };
        let id = E2eIdentity::new(&opts, &data);
        assert_eq!(id.total_steps, 2);
        assert_eq!(id, E2eIdentity::new(&opts, &data));
        let mut other = data.clone();
        other[1].ids[0] = 6;
        let changed = E2eIdentity::new(&opts, &other);
        assert_ne!(
            changed.settings["e2e_data_sha256"],
            id.settings["e2e_data_sha256"]
        );
        let lr = E2eIdentity::new(&E2eOptions { lr: 3e-5, ..opts }, &data);
        assert_ne!(lr.settings["e2e_lr"], id.settings["e2e_lr"]);
    }
}
