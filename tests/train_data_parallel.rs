//! `engine train` with data-parallel E2E-QP on the CPU (`--e2e-ranks K`: K threads over the loopback
//! all-reduce) against the single-rank run, on stories260K. Ranks 1..K go through the code that launched GPU
//! ranks run (rank 0's sequences over the communicator, the Block-AP model read from rank 0's --out, rank 0's
//! scales broadcast), so a mistake there shows here as a different trained model. Also: `--launcher env`'s
//! errors name the variable or flag at fault.
#![cfg(feature = "cli")]
mod engine_cli;
mod shared_data;
use engine_cli::{engine_train, scratch, snapshot};
use eqat::io::safetensors::SafetensorsFile;
use std::collections::BTreeMap;
use std::path::Path;

/// Per-step loss and gradient norm: the ranks' sum of the K partial gradients differs from the single rank's
/// running sum only in the order of the f32 additions (~1e-7 relative), and both are reductions over the
/// whole model; 1e-5 relative is two orders above that and far below any real difference (a rank that skipped
/// the all-reduce would report the norm of its own slice, off by tens of percent).
const STEP_RTOL: f64 = 1e-5;

/// Scales: AdamW moves each by about lr (1e-5 at 3 bits) per step whatever the gradient's size, so the
/// reassociation noise reaches a scale as ~1e-6 of a step; 1e-8 absolute plus 1e-6 relative (scales are
/// ~1e-2) is ~1e-3 of a step, and a step taken with the wrong gradient is 1e-5.
const SCALE_ATOL: f64 = 1e-8;
const SCALE_RTOL: f64 = 1e-6;

/// The (loss, grad_norm) of every E2E-QP step in DIR/train_log.jsonl.
fn e2e_steps(dir: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(dir.join("train_log.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["phase"] == "e2e-qp")
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Every `*.scales` tensor of a safetensors file.
fn scales(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let f = SafetensorsFile::open(path).unwrap();
    f.tensors()
        .iter()
        .filter(|t| t.name.ends_with(".scales"))
        .map(|t| {
            let v = f.tensor_f32(&t.name).unwrap();
            (t.name.clone(), v.f32s("t").unwrap().to_vec())
        })
        .collect()
}

#[test]
fn k_loopback_ranks_train_what_one_rank_trains() {
    let Some(model) = shared_data::shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let root = scratch("data-parallel");
    let run = |name: &str, extra: &[&str]| {
        let out = root.join(name);
        let mut flags = vec!["--e2e-epochs", "2"];
        flags.extend_from_slice(extra);
        let o = engine_train(&model, &out, &flags).output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        (out, stdout)
    };
    let (single, _) = run("single", &[]);
    let want_steps = e2e_steps(&single);
    let want = scales(&single.join("e2e_scales.safetensors"));
    assert_eq!(want_steps.len(), 4, "8 sequences, batches of 4, 2 epochs");
    let mut block_ap = BTreeMap::new();
    for i in 0..5 {
        let block = single.join(format!("blocks/layer_{i:04}.safetensors"));
        block_ap.extend(scales(&block));
    }
    let moved = want
        .iter()
        .flat_map(|(k, w)| w.iter().zip(&block_ap[k]))
        .filter(|(a, b)| a != b)
        .count();
    let total: usize = want.values().map(Vec::len).sum();
    assert!(
        moved > total / 2,
        "E2E-QP must move the scales ({moved} of {total})"
    );
    // K = 3 does not divide the batch of 4: the ranks take 2, 1 and 1 sequences.
    for k in [2, 3] {
        let (dir, stdout) = run(&format!("ranks{k}"), &["--e2e-ranks", &k.to_string()]);
        assert!(
            stdout.contains(&format!("E2E-QP data-parallel over {k} ranks")),
            "{stdout}"
        );
        // Block-AP does not depend on the E2E-QP ranks: the blocks are byte-identical, so the E2E-QP runs
        // start from the same model.
        let (a, b) = (
            snapshot(&single.join("blocks")),
            snapshot(&dir.join("blocks")),
        );
        assert!(a == b, "ranks {k}: Block-AP blocks differ");
        let got_steps = e2e_steps(&dir);
        assert_eq!(got_steps.len(), want_steps.len());
        for (s, ((gl, gn), (wl, wn))) in got_steps.iter().zip(&want_steps).enumerate() {
            assert!(
                (gl - wl).abs() <= STEP_RTOL * wl.abs() && (gn - wn).abs() <= STEP_RTOL * wn.abs(),
                "ranks {k} step {s}: loss {gl} grad norm {gn}, single rank {wl} {wn}"
            );
        }
        let got = scales(&dir.join("e2e_scales.safetensors"));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        let mut max_diff = 0.0f64;
        for (name, w) in &want {
            for (g, w) in got[name].iter().zip(w) {
                let d = (*g as f64 - *w as f64).abs();
                max_diff = max_diff.max(d);
                assert!(
                    d <= SCALE_ATOL + SCALE_RTOL * (*w as f64).abs(),
                    "ranks {k}: {name}: {g} vs single-rank {w}"
                );
            }
        }
        eprintln!("ranks {k}: max |scale - single-rank scale| = {max_diff:e}");
    }
}

/// A `--launcher env` run: the launcher variables set (all others removed), extra flags, what the error names.
struct Launch {
    vars: &'static [(&'static str, &'static str)],
    flags: &'static [&'static str],
    names: &'static [&'static str],
}

#[test]
fn launcher_env_errors_name_the_variable_or_flag() {
    let Some(model) = shared_data::shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let root = scratch("launcher-env");
    let launcher_vars = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
    ];
    let cases = [
        Launch {
            vars: &[],
            flags: &[],
            names: &["--launcher env", "RANK and WORLD_SIZE"],
        },
        Launch {
            vars: &[("RANK", "1")],
            flags: &[],
            names: &["RANK and WORLD_SIZE must be set together"],
        },
        Launch {
            vars: &[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2")],
            flags: &[],
            names: &["SLURM_PROCID=2", "SLURM_NTASKS=2"],
        },
        Launch {
            vars: &[("RANK", "0"), ("WORLD_SIZE", "2")],
            flags: &["--device", "cpu"],
            names: &["--launcher env", "--device cuda"],
        },
    ];
    for (
        i,
        Launch {
            vars,
            flags: extra,
            names,
        },
    ) in cases.iter().enumerate()
    {
        let out = root.join(format!("case{i}"));
        let mut flags = vec!["--launcher", "env"];
        flags.extend_from_slice(extra);
        let mut cmd = engine_train(&model, &out, &flags);
        for v in launcher_vars {
            cmd.env_remove(v);
        }
        cmd.envs(vars.iter().copied());
        let o = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "case {vars:?}: {stderr}");
        for n in *names {
            assert!(stderr.contains(n), "case {vars:?}: `{n}` not in {stderr}");
        }
        assert!(!out.exists(), "case {vars:?} wrote {}", out.display());
    }
}
