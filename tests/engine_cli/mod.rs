//! Running the real `engine` binary from the integration tests (they need the `cli` feature, which CI enables),
//! and comparing checkpoint directories file by file.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `engine train` on `model` into `out` with a recipe small enough for stories260K to finish in seconds:
/// 3 bits, groups of 4 (they divide its 64 and 172 in_features), 8 + 2 self-sampled sequences of 32 tokens,
/// one epoch of 4 Block-AP steps per block, 2 E2E-QP steps, no perplexity evaluation. A flag in `extra` replaces
/// the default of the same name (clap refuses a repeated flag); a flag not followed by a value is a switch.
pub fn engine_train(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let (model, out) = (model.display().to_string(), out.display().to_string());
    let mut flags: Vec<(&str, Option<&str>)> = vec![
        ("--model", Some(&model)),
        ("--out", Some(&out)),
        ("--wbits", Some("3")),
        ("--group-size", Some("4")),
        ("--calib", Some("self")),
        ("--train-size", Some("8")),
        ("--val-size", Some("2")),
        ("--seqlen", Some("32")),
        ("--epochs", Some("1")),
        ("--batch-size", Some("2")),
        ("--e2e-batch", Some("4")),
        ("--eval-data", Some("none")),
        ("--seed", Some("3")),
    ];
    let mut rest = extra.iter().peekable();
    while let Some(&flag) = rest.next() {
        let value = rest.next_if(|v| !v.starts_with("--")).copied();
        match flags.iter_mut().find(|(f, _)| *f == flag) {
            Some(slot) => slot.1 = value,
            None => flags.push((flag, value)),
        }
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_engine"));
    cmd.arg("train");
    for (flag, value) in flags {
        cmd.arg(flag);
        cmd.args(value);
    }
    cmd
}

/// Every file under `dir` (relative path -> bytes; a symbolic link -> its target); empty when `dir` does not exist.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let e = e.unwrap();
            let (path, kind) = (e.path(), e.file_type().unwrap());
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if kind.is_dir() {
                walk(root, &path, out);
            } else if kind.is_symlink() {
                // A link stands for its target's name (a test links a file to /dev/full, which never ends).
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, target.into_os_string().into_encoded_bytes());
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A fresh scratch directory for one test case.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eqat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
