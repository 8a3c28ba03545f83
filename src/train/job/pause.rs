//! The kill-and-resume tests' pause point.

/// Test hook for tests/kill_resume.rs: with EQAT_TEST_PAUSE_AT_STEP=N the run prints "paused at step N" and
/// sleeps for a minute at its N-th training step (Block-AP and E2E-QP steps counted together from 1), so that a
/// test can SIGKILL it at a known point in the middle of a block or of E2E-QP (there after the step's log line
/// and its progress save, if one was due).
pub(super) struct PauseHook {
    at: Option<usize>,
    steps: usize,
}

impl PauseHook {
    pub(super) fn from_env() -> Self {
        let at = std::env::var("EQAT_TEST_PAUSE_AT_STEP").ok();
        PauseHook {
            at: at.and_then(|v| v.parse().ok()),
            steps: 0,
        }
    }
    pub(super) fn step(&mut self, say: &mut impl FnMut(&str)) {
        self.steps += 1;
        if self.at == Some(self.steps) {
            say(&format!(
                "paused at step {} (EQAT_TEST_PAUSE_AT_STEP)",
                self.steps
            ));
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}
