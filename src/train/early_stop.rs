//! Block-AP's early stop, as the official EfficientQAT code counts it.

/// The official early-stop rule (train::block_ap's module comment): `patience` epochs that fail to beat the best
/// validation loss, counted over the whole run, end it; 0 never does.
pub(crate) struct EarlyStop {
    patience: usize,
    best: f32,
    misses: usize,
}

impl EarlyStop {
    pub(crate) fn new(patience: usize) -> Self {
        // The official code starts from best_val_loss = 1e6, so the first epoch always improves.
        EarlyStop {
            patience,
            best: f32::INFINITY,
            misses: 0,
        }
    }

    /// Records one epoch's validation loss; true when training must stop.
    pub(crate) fn stop_after(&mut self, val_loss: f32) -> bool {
        if val_loss < self.best {
            self.best = val_loss;
            return false;
        }
        self.misses += 1;
        self.patience > 0 && self.misses >= self.patience
    }
}

#[cfg(test)]
mod tests {
    use super::EarlyStop;

    /// Epochs run before `EarlyStop` ends training on this validation history (all when it never does).
    fn epochs_run(patience: usize, history: &[f32]) -> usize {
        let mut rule = EarlyStop::new(patience);
        history
            .iter()
            .position(|&v| rule.stop_after(v))
            .map_or(history.len(), |i| i + 1)
    }

    #[test]
    fn early_stop_counts_every_epoch_without_a_new_best_as_the_official_code_does() {
        let history = [5.0, 4.0, 4.5, 3.0, 3.5, 2.0, 2.0];
        // Misses at epochs 3, 5 and 7: not in a row, and the counter is never reset by the new best at 4.
        assert_eq!(epochs_run(1, &history), 3);
        assert_eq!(epochs_run(2, &history), 5);
        assert_eq!(epochs_run(3, &history), 7);
        assert_eq!(epochs_run(4, &history), 7);
        assert_eq!(epochs_run(0, &history), 7);
        // Equal is no improvement; the first epoch always is one.
        assert_eq!(epochs_run(1, &[1e9, 1e9]), 2);
        assert_eq!(epochs_run(1, &[3.0, 2.0, 1.0]), 3);
    }
}
