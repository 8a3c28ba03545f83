//! Kill and resume the real binary: `engine train` on stories260K is SIGKILLed in the middle of a run, continued
//! with `--resume`, and must end with a checkpoint byte-identical to an uninterrupted run with the same seed.
//!
//! The kill point is made deterministic by the EQAT_TEST_PAUSE_AT_STEP hook (src/train/job.rs): the run prints
//! "paused at step N" and sleeps at its N-th training step, and the test kills it then. Polling for a block file
//! instead would race the run on a loaded machine (stories260K trains a block in a fraction of a second).
//!
//! Compared byte for byte: every file of the directory except train_log.jsonl, which is an append-only log: it
//! keeps the killed run's lines and the resumed run appends its own. It is checked separately: the killed run's
//! lines are a prefix of the uninterrupted log and the resumed run's lines are its tail. (No file holds timings.)
#![cfg(feature = "cli")]
mod engine_cli;
mod shared_data;
use engine_cli::{engine_train, scratch, snapshot};
use shared_data::shared_data;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};

/// Kills the child when a failed assertion unwinds past it, so no paused run outlives the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_to_end(model: &Path, out: &Path, extra: &[&str]) {
    let o = engine_train(model, out, extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "engine train {extra:?} failed: {stderr}"
    );
}

/// Starts a run that pauses at training step `step`, waits for the pause, and SIGKILLs it.
fn kill_at_step(model: &Path, out: &Path, step: usize) {
    let child = engine_train(model, out, &[])
        .env("EQAT_TEST_PAUSE_AT_STEP", step.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    let want = format!("paused at step {step} ");
    let mut seen = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        if line.starts_with(&want) {
            child.0.kill().unwrap(); // SIGKILL on Unix
            let status = child.0.wait().unwrap();
            assert!(!status.success(), "killed run exited with {status}");
            return;
        }
        seen.push(line);
    }
    panic!(
        "the run ended without pausing at step {step}:\n{}",
        seen.join("\n")
    );
}

fn log_lines(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("train_log.jsonl")).unwrap();
    text.lines().map(str::to_string).collect()
}

#[test]
fn a_run_killed_mid_block_or_mid_e2e_resumes_to_the_same_bytes() {
    let Some(model) = shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let root = scratch("kill-resume");
    let whole = root.join("whole");
    run_to_end(&model, &whole, &[]);
    let want = snapshot(&whole);
    let want_log = log_lines(&whole);
    for f in [
        "eqat.json",
        "config.json",
        "head.safetensors",
        "e2e_scales.safetensors",
    ] {
        assert!(want.contains_key(Path::new(f)), "{f} missing from {want:?}");
    }

    // 4 Block-AP steps per block: step 6 is the second step of block 1; 5 blocks make 20 steps, so step 21 is
    // the first E2E-QP step (all blocks saved, the head too, E2E-QP's scales not yet).
    for (step, blocks_at_kill) in [(6, 1), (21, 5)] {
        let out = root.join(format!("killed-at-{step}"));
        kill_at_step(&model, &out, step);
        for i in 0..5 {
            let f = out.join(format!("blocks/layer_{i:04}.safetensors"));
            assert_eq!(
                f.exists(),
                i < blocks_at_kill,
                "{} at the kill",
                f.display()
            );
        }
        assert!(!out.join("e2e_scales.safetensors").exists());
        let killed_log = log_lines(&out);

        run_to_end(&model, &out, &["--resume"]);
        let mut got = snapshot(&out);
        let mut want = want.clone();
        got.remove(Path::new("train_log.jsonl"));
        want.remove(Path::new("train_log.jsonl"));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "files after a kill at step {step} and resume"
        );
        for (name, bytes) in &want {
            assert!(
                got[name] == *bytes,
                "{} differs after a kill at step {step} and resume",
                name.display()
            );
        }

        let log = log_lines(&out);
        let before = killed_log.len();
        assert_eq!(
            log[..before],
            want_log[..before],
            "the killed run's log lines"
        );
        let resumed = &log[before..];
        assert!(
            want_log.ends_with(resumed),
            "the resumed run's log lines are not the uninterrupted log's tail:\n{}",
            resumed.join("\n")
        );
        if step == 6 {
            assert!(resumed[0].contains("\"block_start\"") && resumed[0].contains("\"block\":1"));
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}
