//! Kill and resume the real binary: `engine train` on stories260K is SIGKILLed in the middle of a run, continued
//! with `--resume`, and must end with a checkpoint byte-identical to an uninterrupted run with the same seed.
//! Block-AP resumes after its last finished block, E2E-QP after its last progress save (e2e_progress.safetensors);
//! a progress file of another run, or a damaged one, stops the resumed run with an error naming it.
//!
//! The kill point is made deterministic by the EQAT_TEST_PAUSE_AT_STEP hook (src/train/job/pause.rs): the run prints
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
use eqat::io::safetensors::SafetensorsFile;
use shared_data::shared_data;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

/// Kills the child when a failed assertion unwinds past it, so no paused run outlives the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `engine train` to its end; returns its standard output.
fn run_to_end(model: &Path, out: &Path, extra: &[&str]) -> String {
    let o = engine_train(model, out, extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "engine train {extra:?} failed: {stderr}"
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Starts a run with the flags `extra` that pauses at training step `step`, waits for the pause, and SIGKILLs it.
fn kill_at_step(model: &Path, out: &Path, step: usize, extra: &[&str]) {
    let child = engine_train(model, out, extra)
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

/// Every file of `dir` but the log is byte-identical to `want`'s (a snapshot of the uninterrupted run).
fn assert_same_files(dir: &Path, want: &BTreeMap<PathBuf, Vec<u8>>, after: &str) {
    let mut got = snapshot(dir);
    let mut want = want.clone();
    got.remove(Path::new("train_log.jsonl"));
    want.remove(Path::new("train_log.jsonl"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "files after {after}"
    );
    for (name, bytes) in &want {
        assert!(
            got[name] == *bytes,
            "{} differs after {after}",
            name.display()
        );
    }
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
        "e2e_progress.safetensors",
    ] {
        assert!(want.contains_key(Path::new(f)), "{f} missing from {want:?}");
    }

    // 4 Block-AP steps per block: step 6 is the second step of block 1; 5 blocks make 20 steps, so step 21 is
    // the first E2E-QP step (all blocks saved, the head too; E2E-QP's scales not yet, nor its progress, first
    // saved after 5 minutes by default: the resumed run starts E2E-QP over).
    for (step, blocks_at_kill) in [(6, 1), (21, 5)] {
        let out = root.join(format!("killed-at-{step}"));
        kill_at_step(&model, &out, step, &[]);
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
        assert!(!out.join("e2e_progress.safetensors").exists());
        let killed_log = log_lines(&out);

        run_to_end(&model, &out, &["--resume"]);
        assert_same_files(&out, &want, &format!("a kill at step {step} and resume"));

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

/// 8 sequences in global batches of 2: 4 E2E-QP steps after Block-AP's 20, so training step 23 is E2E-QP's
/// third. Saving every 2 steps, a run killed there has E2E-QP's progress after its second step on disk.
const E2E_BATCH_2: [&str; 2] = ["--e2e-batch", "2"];
const SAVE_EVERY_2: [&str; 4] = ["--e2e-batch", "2", "--e2e-checkpoint-every", "2"];
const E2E_THIRD_STEP: usize = 23;

/// The E2E-QP losses of a log, in step order.
fn e2e_losses(log: &[String]) -> Vec<f32> {
    log.iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["phase"] == "e2e-qp")
        .map(|v| v["loss"].as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn a_run_killed_mid_e2e_qp_continues_from_its_last_save_to_the_same_bytes() {
    killed_mid_e2e_qp_resumes_to_the_same_bytes("kill-resume-e2e", &[]);
}

/// With two data-parallel ranks, rank 0 saves the progress and shares it with rank 1 at the resume
/// (`share_progress`), so the resumed pair ends as the uninterrupted pair does.
#[test]
fn data_parallel_ranks_killed_mid_e2e_qp_continue_from_rank_0s_save_to_the_same_bytes() {
    killed_mid_e2e_qp_resumes_to_the_same_bytes("kill-resume-e2e-ranks", &["--e2e-ranks", "2"]);
}

fn killed_mid_e2e_qp_resumes_to_the_same_bytes(name: &str, ranks: &[&'static str]) {
    let Some(model) = shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let root = scratch(name);
    let with = |flags: &[&'static str]| [flags, ranks].concat();
    // The uninterrupted run saves E2E-QP's progress only at its end (the default: every 5 minutes).
    let whole = root.join("whole");
    run_to_end(&model, &whole, &with(&E2E_BATCH_2));
    let want = snapshot(&whole);
    let want_log = log_lines(&whole);
    assert_eq!(e2e_losses(&want_log).len(), 4);

    let out = root.join("killed");
    kill_at_step(&model, &out, E2E_THIRD_STEP, &with(&SAVE_EVERY_2));
    assert!(!out.join("e2e_scales.safetensors").exists());
    let saved = SafetensorsFile::open(out.join("e2e_progress.safetensors")).unwrap();
    let saved_losses = saved.tensor_f32("losses").unwrap();
    assert_eq!(
        saved_losses.f32s("losses").unwrap(),
        &e2e_losses(&want_log)[..2],
        "the progress at the kill: E2E-QP's first two steps"
    );
    let killed_log = log_lines(&out);
    let n = want_log.len();
    assert_eq!(
        killed_log,
        want_log[..n - 1],
        "the killed run logs every step up to E2E-QP's third"
    );

    let stdout = run_to_end(
        &model,
        &out,
        &with(&[&SAVE_EVERY_2[..], &["--resume"]].concat()),
    );
    assert!(
        stdout.contains("E2E-QP: continuing after step 2/4"),
        "{stdout}"
    );
    assert_same_files(&out, &want, "a kill in E2E-QP's third step and resume");
    assert_eq!(
        log_lines(&out)[killed_log.len()..],
        want_log[n - 2..],
        "the resumed run redoes E2E-QP's third step (unsaved at the kill) and makes its fourth, nothing else"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn e2e_progress_of_another_run_or_a_damaged_file_is_refused_naming_the_file() {
    let Some(model) = shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let root = scratch("kill-resume-e2e-refused");
    let out = root.join("w3");
    kill_at_step(&model, &out, E2E_THIRD_STEP, &SAVE_EVERY_2);
    let two_bits = root.join("w2");
    let at_2_bits = [&SAVE_EVERY_2[..], &["--wbits", "2"]].concat();
    kill_at_step(&model, &two_bits, E2E_THIRD_STEP, &at_2_bits);

    let progress = out.join("e2e_progress.safetensors");
    let good = std::fs::read(&progress).unwrap();
    let cases: [(&str, Vec<u8>, &[&str], &str); 3] = [
        (
            "another learning rate",
            good.clone(),
            &["--e2e-lr", "3e-5"],
            "e2e_lr (--e2e-lr): E2E-QP's progress was saved with 0.00001, this run asks for 0.00003",
        ),
        (
            "a 2-bit run's file",
            std::fs::read(two_bits.join("e2e_progress.safetensors")).unwrap(),
            &[],
            "wbits (--wbits): E2E-QP's progress was saved with 2, this run asks for 3",
        ),
        ("a truncated file", good[..good.len() / 2].to_vec(), &[], ""),
    ];
    for (case, bytes, flags, error) in cases {
        std::fs::write(&progress, &bytes).unwrap();
        let before = snapshot(&out);
        let resume = [&SAVE_EVERY_2[..], flags, &["--resume"]].concat();
        let o = engine_train(&model, &out, &resume).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{case}: {stderr}");
        let want = format!("error: {}: {error}", progress.display());
        assert!(
            stderr.starts_with(&want) && stderr.lines().count() == 1,
            "{case}: {stderr}"
        );
        assert!(
            snapshot(&out) == before,
            "{case}: the refused run changed files"
        );
    }
    // The directory still resumes once its file is whole again.
    std::fs::write(&progress, &good).unwrap();
    run_to_end(&model, &out, &[&SAVE_EVERY_2[..], &["--resume"]].concat());
    assert!(out.join("e2e_scales.safetensors").exists());
    std::fs::remove_dir_all(&root).unwrap();
}
