//! Cosine learning-rate schedules as learning-rate factors (lr = group.lr · factor), for the t-th optimizer
//! step (t = 0 is the first update).
//!
//! Block-AP (`quantize/block_ap.py`) builds `CosineAnnealingLR(T_max = epochs·train_size/batch_size,
//! eta_min = lr / min_lr_factor)` per parameter group. With η = 1/min_lr_factor and C(t) = 1 + cos(π·t/T):
//! - [`CosineForm::ClosedForm`]: factor(t) = η + (1 − η)·C(t)/2, torch's `_get_closed_form_lr` (its recursive
//!   `step()` chain gives the same values up to rounding). From 1 at t = 0 down to η at t = T.
//! - [`CosineForm::BlockApGetLr`]: what block_ap.py actually hands AdamW. After `scheduler.step()` it sets the
//!   group's lr to `scheduler.get_lr()[0]`; called outside `step()`, torch's recursive `get_lr` applies the
//!   ratio C(t)/C(t−1) a second time to the already-stepped value, so step t ≥ 1 runs at
//!   η + (1 − η)·C(t)²/(2·C(t−1)), and step 0 at 1 [derived from torch 2.x `CosineAnnealingLR.get_lr`].
//!   The gap to the closed form is at most (1 − η)·π/(2T) (3.7e-4 for T = 4096) but large for short runs.
//!
//! Warmup (E2E-QP runs HF Trainer's cosine with warmup_ratio 0.03, decaying to 0): HF's
//! `get_cosine_schedule_with_warmup` convention, factor(t) = t/W for t < W (the first step runs at 0), then
//! the closed form over the remaining T − W steps. `min_lr_factor = ∞` gives η = 0, HF's schedule exactly.
//!
//! Past T, torch's and HF's cosines turn back up; the official loops stop at T, and here the factor stays at η.
use crate::error::{Error, Result};
use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CosineForm {
    ClosedForm,
    BlockApGetLr,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    /// T: the step at which the factor reaches 1/min_lr_factor (Block-AP: epochs · train_size / batch_size).
    pub total_steps: u64,
    /// The final factor is 1/min_lr_factor (Block-AP default 20; ∞ decays to 0).
    pub min_lr_factor: f32,
    /// Linear warmup steps, 0 by default.
    pub warmup_steps: u64,
    pub form: CosineForm,
}

impl CosineSchedule {
    /// The closed-form cosine without warmup. Needs total_steps > 0 and min_lr_factor >= 1 (∞ allowed).
    pub fn new(total_steps: u64, min_lr_factor: f32) -> Result<CosineSchedule> {
        if total_steps == 0 {
            return Err(Error::invalid("CosineSchedule", "total_steps must be > 0"));
        }
        if min_lr_factor.is_nan() || min_lr_factor < 1.0 {
            return Err(Error::invalid(
                "CosineSchedule",
                format!("min_lr_factor {min_lr_factor} must be >= 1 (the final lr is lr / min_lr_factor)"),
            ));
        }
        Ok(CosineSchedule {
            total_steps,
            min_lr_factor,
            warmup_steps: 0,
            form: CosineForm::ClosedForm,
        })
    }

    /// Adds HF-style linear warmup (closed form only); warmup must leave at least one cosine step.
    pub fn with_warmup(self, warmup_steps: u64) -> Result<CosineSchedule> {
        if warmup_steps >= self.total_steps || self.form != CosineForm::ClosedForm {
            return Err(Error::invalid(
                "CosineSchedule",
                format!(
                    "warmup {warmup_steps} needs the closed form and fewer steps than total_steps {} ({:?})",
                    self.total_steps, self.form
                ),
            ));
        }
        Ok(CosineSchedule {
            warmup_steps,
            ..self
        })
    }

    /// Switches to the learning rates block_ap.py really uses (see the header); no warmup there.
    pub fn block_ap_get_lr(self) -> Result<CosineSchedule> {
        if self.warmup_steps > 0 {
            return Err(Error::invalid(
                "CosineSchedule",
                "block_ap.py has no warmup",
            ));
        }
        Ok(CosineSchedule {
            form: CosineForm::BlockApGetLr,
            ..self
        })
    }

    /// The learning-rate factor for optimizer step `t` (0-based).
    pub fn lr_factor(&self, t: u64) -> f32 {
        let eta = 1.0 / self.min_lr_factor as f64;
        let (w, total) = (self.warmup_steps, self.total_steps);
        if t < w {
            return (t as f64 / w as f64) as f32;
        }
        let t = (t - w).min(total - w);
        let c = |t: u64| 1.0 + (PI * t as f64 / (total - w) as f64).cos();
        let f = match self.form {
            CosineForm::ClosedForm => eta + (1.0 - eta) * c(t) / 2.0,
            CosineForm::BlockApGetLr if t == 0 => 1.0,
            CosineForm::BlockApGetLr => eta + (1.0 - eta) * c(t) * c(t) / (2.0 * c(t - 1)),
        };
        f as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_matches_hand_values_and_torch_recursion() {
        let s = CosineSchedule::new(100, 20.0).unwrap();
        let c45 = (1.0 + (PI / 4.0).cos()) / 2.0;
        for (t, want) in [
            (0, 1.0),
            (25, 0.05 + 0.95 * c45),
            (50, 0.525),
            (75, 0.05 + 0.95 * (1.0 - c45)),
            (100, 0.05),
            (250, 0.05),
        ] {
            assert!(
                (s.lr_factor(t) as f64 - want).abs() < 1e-7,
                "t {t}: {} vs {want}",
                s.lr_factor(t)
            );
        }
        // torch's CosineAnnealingLR.step() chain: lr_t = C(t)/C(t-1)·(lr_{t-1} − η) + η.
        let (total, eta) = (37u64, 1.0 / 20.0);
        let s = CosineSchedule::new(total, 20.0).unwrap();
        let c = |t: u64| 1.0 + (PI * t as f64 / total as f64).cos();
        let mut lr = 1.0f64;
        for t in 1..=total {
            lr = c(t) / c(t - 1) * (lr - eta) + eta;
            assert!((s.lr_factor(t) as f64 - lr).abs() < 1e-6, "t {t}");
        }
    }

    /// Replays block_ap.py's loop literally: the scheduler's own optimizer follows the step() chain, and the
    /// training optimizer gets get_lr() re-evaluated after each step.
    #[test]
    fn block_ap_form_matches_the_official_loop_replayed() {
        for (total, mf) in [(8u64, 20.0f32), (4096, 20.0), (5, 1.0)] {
            let s = CosineSchedule::new(total, mf)
                .unwrap()
                .block_ap_get_lr()
                .unwrap();
            let closed = CosineSchedule::new(total, mf).unwrap();
            let (tf, eta) = (total as f64, 1.0 / mf as f64);
            let c = |t: u64| 1.0 + (PI * t as f64 / tf).cos();
            let (mut chained, mut used, mut max_gap) = (1.0f64, 1.0f64, 0.0f64);
            for t in 0..total {
                assert!(
                    (s.lr_factor(t) as f64 - used).abs() < 1e-6,
                    "T {total} t {t}"
                );
                max_gap = max_gap.max((s.lr_factor(t) - closed.lr_factor(t)).abs() as f64);
                // scheduler.step(), then get_lr() outside step() on the already-stepped value.
                let t = t + 1;
                chained = c(t) / c(t - 1) * (chained - eta) + eta;
                used = c(t) / c(t - 1) * (chained - eta) + eta;
            }
            assert!(
                max_gap <= (1.0 - eta) * PI / (2.0 * tf) + 1e-6,
                "T {total}: gap {max_gap}"
            );
            if total == 8 {
                assert!(
                    max_gap > 0.05,
                    "the two forms should differ on a short run: {max_gap}"
                );
            }
        }
    }

    #[test]
    fn warmup_follows_hf_and_infinite_factor_decays_to_zero() {
        let s = CosineSchedule::new(110, f32::INFINITY)
            .unwrap()
            .with_warmup(10)
            .unwrap();
        for (t, want) in [
            (0, 0.0),
            (5, 0.5),
            (10, 1.0),
            (60, 0.5),
            (110, 0.0),
            (200, 0.0),
        ] {
            assert!(
                (s.lr_factor(t) as f64 - want).abs() < 1e-7,
                "t {t}: {}",
                s.lr_factor(t)
            );
        }
        let hf = |t: u64| 0.5 * (1.0 + (PI * (t - 10) as f64 / 100.0).cos());
        for t in 10..=110 {
            assert!((s.lr_factor(t) as f64 - hf(t)).abs() < 1e-7);
        }
    }

    #[test]
    fn schedule_rejects_bad_settings() {
        assert!(CosineSchedule::new(0, 20.0).is_err());
        assert!(CosineSchedule::new(10, 0.5).is_err());
        assert!(CosineSchedule::new(10, f32::NAN).is_err());
        assert!(CosineSchedule::new(10, 20.0)
            .unwrap()
            .with_warmup(10)
            .is_err());
        let warm = CosineSchedule::new(10, 20.0)
            .unwrap()
            .with_warmup(2)
            .unwrap();
        assert!(warm.block_ap_get_lr().is_err());
        let official = CosineSchedule::new(10, 20.0)
            .unwrap()
            .block_ap_get_lr()
            .unwrap();
        assert!(official.with_warmup(2).is_err());
    }
}
