//! `engine train` on bad input, one row per case: the real binary must exit with status 1 and one clear error
//! line naming the file, flag or tensor, never panic, and leave every file that existed before it ran unchanged.
#![cfg(feature = "cli")]
mod engine_cli;
mod shared_data;
use engine_cli::{engine_train, scratch, snapshot};
use eqat::io::gguf::GgufFile;
use std::path::{Path, PathBuf};

struct Ctx {
    model: PathBuf,
    /// This case's scratch directory; `--out` is `dir/out`.
    dir: PathBuf,
    /// A finished Block-AP checkpoint of the default small run (tests/engine_cli), to copy.
    finished: PathBuf,
}

impl Ctx {
    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }
    /// Copies the finished checkpoint into `--out`.
    fn copy_finished(&self) {
        for (rel, bytes) in snapshot(&self.finished) {
            let to = self.out().join(rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::write(to, bytes).unwrap();
        }
    }
}

struct Case {
    name: &'static str,
    /// Prepares `ctx.dir` and returns the flags that follow the default small run's.
    setup: fn(&Ctx) -> Vec<String>,
    /// What the error must name.
    names: &'static [&'static str],
    /// Files the run must have written before it failed.
    kept: &'static [&'static str],
}

fn flags(f: &[&str]) -> Vec<String> {
    f.iter().map(|s| s.to_string()).collect()
}

/// A copy of stories260K whose block-2 attention norm is all NaN (0xFF bytes are a NaN in F32 and F16).
fn nan_model(ctx: &Ctx) -> String {
    let f = GgufFile::open(&ctx.model).unwrap();
    let t = f.tensor_info("blk.2.attn_norm.weight").unwrap();
    let start = f.data_start() + t.offset as usize;
    let mut bytes = std::fs::read(&ctx.model).unwrap();
    bytes[start..start + t.n_bytes()].fill(0xFF);
    let path = ctx.dir.join("nan.gguf");
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn calib_text(ctx: &Ctx) -> String {
    let text =
        "Once upon a time there was a little girl who liked to play in the park with her dog. ";
    std::fs::write(ctx.dir.join("calib.txt"), text.repeat(60)).unwrap();
    ctx.path("calib.txt")
}

const CASES: &[Case] = &[
    Case {
        name: "missing model file",
        setup: |c| vec!["--model".into(), c.path("no-such-model.gguf")],
        names: &["no-such-model.gguf"],
        kept: &[],
    },
    Case {
        name: "missing calibration file",
        setup: |c| vec!["--calib".into(), c.path("no-such-text.txt")],
        names: &["no-such-text.txt"],
        kept: &[],
    },
    Case {
        name: "--wbits 5 (no packed format)",
        setup: |_| flags(&["--wbits", "5"]),
        names: &["--wbits 5"],
        kept: &[],
    },
    Case {
        name: "--wbits 1",
        setup: |_| flags(&["--wbits", "1"]),
        names: &["--wbits 1", "outside 2..=8"],
        kept: &[],
    },
    Case {
        name: "--wbits 9",
        setup: |_| flags(&["--wbits", "9"]),
        names: &["--wbits 9", "outside 2..=8"],
        kept: &[],
    },
    Case {
        name: "group size that does not divide in_features",
        setup: |_| flags(&["--group-size", "48"]),
        names: &["--group-size 48", "64 in_features of q_proj"],
        kept: &[],
    },
    Case {
        name: "more modules than blocks",
        setup: |_| flags(&["--parallel", "modules", "--modules", "9"]),
        names: &["--modules 9 with 5 blocks"],
        kept: &[],
    },
    Case {
        name: "--gpus where no GPU can be opened (CI: built without cuda, or no device)",
        setup: |_| flags(&["--parallel", "modules", "--gpus", "0,1"]),
        names: &["--gpus 0,1", "GPU 0"],
        kept: &[],
    },
    Case {
        name: "--gpus with a word for an ordinal",
        setup: |_| flags(&["--parallel", "modules", "--gpus", "0,a"]),
        names: &["--gpus 0,a", "`a` is not a GPU ordinal"],
        kept: &[],
    },
    Case {
        name: "--e2e-ranks 0",
        setup: |_| flags(&["--e2e-ranks", "0"]),
        names: &["--e2e-ranks 0"],
        kept: &[],
    },
    Case {
        name: "more E2E-QP ranks than sequences in a global batch",
        setup: |_| flags(&["--e2e-ranks", "5"]),
        names: &["--e2e-batch 4", "5 E2E-QP ranks"],
        kept: &[],
    },
    Case {
        name: "E2E-QP ranks without E2E-QP",
        setup: |_| flags(&["--e2e-ranks", "2", "--phase", "block-ap"]),
        names: &["--phase block-ap", "2 E2E-QP ranks"],
        kept: &[],
    },
    Case {
        name: "--e2e-gpus where no GPU can be opened (CI: built without cuda, or no device)",
        setup: |_| flags(&["--e2e-gpus", "0,1"]),
        names: &["--e2e-gpus 0,1", "GPU 0"],
        kept: &[],
    },
    Case {
        name: "--e2e-gpus with a word for an ordinal",
        setup: |_| flags(&["--e2e-gpus", "0,x"]),
        names: &["--e2e-gpus 0,x", "`x` is not a GPU ordinal"],
        kept: &[],
    },
    Case {
        name: "--e2e-ranks that disagrees with --e2e-gpus",
        setup: |_| flags(&["--e2e-ranks", "3", "--e2e-gpus", "0,1"]),
        names: &["--e2e-ranks 3", "--e2e-gpus 0,1"],
        kept: &[],
    },
    Case {
        name: "--launcher slurm",
        setup: |_| flags(&["--launcher", "slurm"]),
        names: &["--launcher slurm", "none or env"],
        kept: &[],
    },
    Case {
        name: "--launcher env with in-process ranks",
        setup: |_| flags(&["--launcher", "env", "--e2e-ranks", "2"]),
        names: &["--launcher env", "drop --e2e-ranks"],
        kept: &[],
    },
    Case {
        name: "--dtype bf16 on the CPU",
        setup: |_| flags(&["--dtype", "bf16"]),
        names: &["--dtype bf16", "--device cuda"],
        kept: &[],
    },
    Case {
        name: "--dtype f16",
        setup: |_| flags(&["--dtype", "f16"]),
        names: &["--dtype f16", "f32 or bf16"],
        kept: &[],
    },
    Case {
        name: "--block-inputs host on the CPU",
        setup: |_| flags(&["--block-inputs", "host"]),
        names: &["--block-inputs host", "--device cuda"],
        kept: &[],
    },
    Case {
        name: "--train-size 0",
        setup: |_| flags(&["--train-size", "0"]),
        names: &["--train-size 0"],
        kept: &[],
    },
    Case {
        name: "--e2e-checkpoint-every 0",
        setup: |_| flags(&["--e2e-checkpoint-every", "0"]),
        names: &["--e2e-checkpoint-every 0", "N steps", "a duration"],
        kept: &[],
    },
    Case {
        name: "--e2e-offload sometimes",
        setup: |_| flags(&["--e2e-offload", "sometimes"]),
        names: &["--e2e-offload sometimes", "auto, on or off"],
        kept: &[],
    },
    Case {
        name: "NaN weights in block 2: stops there, keeps blocks 0 and 1",
        setup: |c| {
            vec![
                "--model".into(),
                nan_model(c),
                "--calib".into(),
                calib_text(c),
            ]
        },
        names: &["non-finite", "block 2", "Block-AP loss"],
        kept: &[
            "blocks/layer_0000.safetensors",
            "blocks/layer_0001.safetensors",
        ],
    },
    Case {
        name: "disk full while offloading block inputs",
        setup: |c| {
            std::fs::create_dir_all(c.out()).unwrap();
            let link = c.out().join("block_inputs.train.bin");
            std::os::unix::fs::symlink("/dev/full", link).unwrap();
            flags(&["--offload", "disk"])
        },
        names: &["block_inputs.train.bin", "allocating"],
        kept: &["eqat.json"],
    },
    Case {
        name: "resume with another seed",
        setup: |c| {
            c.copy_finished();
            flags(&["--resume", "--seed", "4"])
        },
        names: &["eqat.json", "recipe.seed (--seed)", "3", "4"],
        kept: &[],
    },
    Case {
        name: "resume with other bits",
        setup: |c| {
            c.copy_finished();
            flags(&["--resume", "--wbits", "4"])
        },
        names: &["eqat.json", "wbits (--wbits)"],
        kept: &[],
    },
    Case {
        name: "resume without a checkpoint",
        setup: |_| flags(&["--resume"]),
        names: &["--resume", "eqat.json"],
        kept: &[],
    },
    Case {
        name: "a new run into a finished checkpoint",
        setup: |c| {
            c.copy_finished();
            vec![]
        },
        names: &["already holds a checkpoint", "--resume"],
        kept: &[],
    },
    Case {
        name: "resume with a truncated block file",
        setup: |c| {
            c.copy_finished();
            let f = c.out().join("blocks/layer_0001.safetensors");
            let bytes = std::fs::read(&f).unwrap();
            std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
            flags(&["--resume"])
        },
        names: &["layer_0001.safetensors"],
        kept: &[],
    },
    Case {
        name: "resume with a corrupt eqat.json",
        setup: |c| {
            c.copy_finished();
            std::fs::write(
                c.out().join("eqat.json"),
                b"{\"format\": \"eqat-checkpoint\", ",
            )
            .unwrap();
            flags(&["--resume"])
        },
        names: &["eqat.json", "json"],
        kept: &[],
    },
    Case {
        name: "resume with a block list longer than the model",
        setup: |c| {
            c.copy_finished();
            let path = c.out().join("eqat.json");
            let mut meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let blocks = meta["blocks"].as_array_mut().unwrap();
            blocks.push(blocks[0].clone());
            std::fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();
            flags(&["--resume"])
        },
        names: &[
            "eqat.json",
            "blocks",
            "6 finished blocks of a 5-block model",
        ],
        kept: &[],
    },
];

fn check(ctx: &Ctx, case: &Case) -> Result<(), String> {
    let extra = (case.setup)(ctx);
    let out = ctx.out();
    let before = snapshot(&out);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let o = engine_train(&ctx.model, &out, &extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(1) || stderr.contains("panicked at") {
        return Err(format!("exit {:?}, stderr:\n{stderr}", o.status));
    }
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("");
    println!("{}: {error}", case.name);
    if let Some(n) = case.names.iter().find(|n| !error.contains(*n)) {
        return Err(format!("the error does not name {n:?}:\n{stderr}"));
    }
    let after = snapshot(&out);
    for (f, bytes) in &before {
        if after.get(f) != Some(bytes) {
            return Err(format!("{} changed or was removed", f.display()));
        }
    }
    if let Some(f) = case.kept.iter().find(|f| !after.contains_key(Path::new(f))) {
        return Err(format!(
            "{f} was not written before the failure: {:?}",
            after.keys()
        ));
    }
    Ok(())
}

#[test]
fn bad_input_fails_with_a_clear_error_and_loses_nothing() {
    let Some(model) = shared_data::shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let root = scratch("bad-inputs");
    let finished = root.join("finished");
    let o = engine_train(&model, &finished, &["--phase", "block-ap"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let dir = root.join(format!("case-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let ctx = Ctx {
            model: model.clone(),
            dir,
            finished: finished.clone(),
        };
        if let Err(e) = check(&ctx, case) {
            failures.push(format!("{}: {e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    std::fs::remove_dir_all(&root).unwrap();
}
