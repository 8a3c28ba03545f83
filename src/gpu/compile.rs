//! NVRTC compilation of `cuda/<op>.cu`. NVRTC has no include path, so `cuda/prelude.cuh` is prepended to every
//! source; a `#line` directive after it keeps compile errors pointing at the op's own file and line. PTX is
//! cached per (op, arch) for the life of the process, so a second context on the same architecture (or a second
//! test) does not compile again.
use crate::error::{Error, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The helpers every kernel source starts with.
pub const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// One `cuda/<op>.cu`: the op name (its file stem) and the source text (`include_str!`'d by the op's file).
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub op: &'static str,
    pub code: &'static str,
}

impl KernelSource {
    /// The text NVRTC compiles: the prelude, then the op's source with its own file name and line numbers.
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"cuda/{}.cu\"\n{}", self.op, self.code)
    }
}

static PTX_CACHE: OnceLock<Mutex<HashMap<(&'static str, String), Ptx>>> = OnceLock::new();

/// Compiles (or takes from the cache) the PTX of `src` for `arch` (`sm_90`, ...). A compile error carries
/// NVRTC's full log.
pub fn ptx(src: &KernelSource, arch: &str) -> Result<Ptx> {
    let cache = PTX_CACHE.get_or_init(Mutex::default);
    let key = (src.op, arch.to_string());
    if let Some(p) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(p.clone());
    }
    let opts = CompileOptions {
        options: vec![
            // On Hopper the arch-specific target, so that kernels may use wgmma (the code is the same
            // otherwise; such PTX loads only on sm_90 devices, which is where it is compiled for).
            format!(
                "--gpu-architecture={}",
                if arch == "sm_90" { "sm_90a" } else { arch }
            ),
            "--std=c++17".into(),
            // Source lines in the PTX, for profilers; it does not change the code.
            "--generate-line-info".into(),
        ],
        name: Some(format!("{}.cu", src.op)),
        ..Default::default()
    };
    let p =
        compile_ptx_with_opts(src.full_source(), opts).map_err(|e| compile_error(src, arch, e))?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, p.clone());
    Ok(p)
}

/// How many (op, arch) pairs have PTX in the process cache (tests check that a second request compiles nothing).
pub fn cached_ptx_count() -> usize {
    PTX_CACHE
        .get()
        .map_or(0, |c| c.lock().unwrap_or_else(|e| e.into_inner()).len())
}

fn compile_error(src: &KernelSource, arch: &str, e: CompileError) -> Error {
    match e {
        CompileError::CompileError {
            nvrtc,
            options,
            log,
        } => Error::Gpu(format!(
            "NVRTC could not compile cuda/{}.cu for {arch} ({nvrtc:?}, options {options:?}):\n{}",
            src.op,
            log.to_string_lossy()
        )),
        other => Error::Gpu(format!(
            "NVRTC failed on cuda/{}.cu for {arch}: {other:?}",
            src.op
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// NVRTC compiles without a GPU; where the library is missing (CI) the test says so instead of passing quietly.
    fn nvrtc_present() -> bool {
        // SAFETY: only tries to dlopen libnvrtc.
        let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
        if !present {
            let _ = writeln!(std::io::stderr(), "skipped: NVRTC not found");
        }
        present
    }

    #[test]
    fn every_kernel_source_compiles_for_hopper_and_ampere() {
        if !nvrtc_present() {
            return;
        }
        for src in crate::gpu::kernel_sources() {
            for arch in ["sm_80", "sm_90"] {
                let p = ptx(&src, arch).unwrap_or_else(|e| panic!("{e}"));
                // EQAT_DUMP_PTX=dir keeps the PTX, for ptxas -v and cuobjdump -sass (`.ci/sass_local.sh`).
                if let Some(dir) = std::env::var_os("EQAT_DUMP_PTX") {
                    let path = std::path::Path::new(&dir).join(format!("{}_{arch}.ptx", src.op));
                    std::fs::write(&path, p.to_src())
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                assert!(
                    p.to_src().contains(".entry"),
                    "{} {arch}: no kernel",
                    src.op
                );
            }
        }
        let before = cached_ptx_count();
        ptx(&crate::ops::add::CUDA, "sm_90").unwrap();
        assert_eq!(
            cached_ptx_count(),
            before,
            "a second request compiles nothing"
        );
    }

    #[test]
    fn a_compile_error_carries_the_file_line_and_nvrtc_log() {
        if !nvrtc_present() {
            return;
        }
        let broken = KernelSource {
            op: "broken_for_test",
            code: "extern \"C\" __global__ void broken_fwd_f32(float* out) {\n    out[0] = not_declared;\n}\n",
        };
        let e = ptx(&broken, "sm_90").unwrap_err().to_string();
        assert!(
            e.contains("cuda/broken_for_test.cu(2)")
                && e.contains("not_declared")
                && e.contains("sm_90"),
            "{e}"
        );
    }
}
