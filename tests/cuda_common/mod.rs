//! Shared by the GPU test binaries (tests/cuda_*.rs): the device, or a printed skip; uploads and downloads; and a
//! report that runs every check of a test before failing, so that one run on the lent GPU shows all the errors at
//! once.
#![allow(dead_code)] // each test binary uses its own subset

use eqat::gpu::{GpuBuf, GpuContext};
use eqat::model::llama::LlamaConfig;
use eqat::ops::rope::RopeLayout;
use eqat::testing::compare;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

pub mod bf16_mode;
pub mod real_quant;

/// Writes to the process's stderr directly: the test harness captures `eprintln!` of passing tests, and a skip
/// must never pass silently.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The shared GPU 0 (with NaN poisoning of new buffers), or None after printing `skipped: no CUDA device: ..`.
pub fn device(test: &str) -> Option<Arc<GpuContext>> {
    static CTX: OnceLock<Result<Arc<GpuContext>, String>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        GpuContext::new(0).map_err(|e| e.to_string()).inspect(|c| {
            c.set_poison(true);
            say(&format!("device: {c:?}, {} SMs", c.sm_count()));
        })
    });
    match ctx {
        Ok(c) => Some(c.clone()),
        Err(e) => {
            say(&format!("{test}: skipped: {e}"));
            None
        }
    }
}

pub fn up(ctx: &Arc<GpuContext>, v: &[f32]) -> GpuBuf {
    ctx.upload(v).unwrap()
}

pub fn down(b: &GpuBuf) -> Vec<f32> {
    b.to_vec().unwrap()
}

/// The equivalence bar: |got - want| <= RTOL·|want| + max(RTOL·rms(want), F32_FLOOR) elementwise. The rms term
/// judges an element that cancels to near zero (rope's x·c − y·s, rmsnorm's dx) on the scale of its tensor; the
/// floor admits references below f32's normal range, which no f32 can hold (swiglu of gate −150 is −2.9e−64 in
/// f64 and −0 in f32: seen failing on the H100 before this floor existed). NaN never passes.
pub const RTOL: f64 = 1e-5;
pub const F32_FLOOR: f64 = f32::MIN_POSITIVE as f64;

pub fn rms(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
}

/// Collects the checks of one test; `finish` prints a summary line and panics if any check failed.
pub struct Report {
    name: &'static str,
    checks: usize,
    worst: f64,
    worst_at: String,
    failures: Vec<String>,
    start: Instant,
}

impl Report {
    pub fn new(name: &'static str) -> Report {
        Report {
            name,
            checks: 0,
            worst: 0.0,
            worst_at: String::new(),
            failures: Vec::new(),
            start: Instant::now(),
        }
    }

    /// The standard bar (see [`RTOL`]).
    pub fn check(&mut self, what: &str, got: &[f32], want: &[f64]) {
        let atol = (RTOL * rms(want)).max(F32_FLOOR);
        self.check_tol(what, got, want, atol, RTOL);
    }

    /// An explicit atol/rtol (each use documents why it differs from the standard bar).
    pub fn check_tol(&mut self, what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
        self.checks += 1;
        let scale = rms(want).max(f64::MIN_POSITIVE);
        for (&g, &w) in got.iter().zip(want) {
            let e = (g as f64 - w).abs() / (w.abs() + scale);
            if e > self.worst || e.is_nan() {
                self.worst = if e.is_nan() { f64::INFINITY } else { e };
                self.worst_at = what.to_string();
            }
        }
        if let Err(msg) = compare(what, got, want, atol, rtol) {
            self.failures.push(msg);
        }
    }

    /// A condition that must hold (e.g. bitwise equality with the CPU path).
    pub fn expect(&mut self, what: &str, ok: bool) {
        self.checks += 1;
        if !ok {
            self.failures.push(format!("{what}: failed"));
        }
    }

    pub fn finish(self) {
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        let status = if self.failures.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        say(&format!(
            "{status} {:<28} {:>4} checks  worst |err|/(|ref|+rms) {:.2e} ({})  {ms:.1} ms",
            self.name, self.checks, self.worst, self.worst_at
        ));
        for f in &self.failures {
            say(&format!("    {f}"));
        }
        assert!(
            self.failures.is_empty(),
            "{}: {} failed checks",
            self.name,
            self.failures.len()
        );
    }
}

/// A one-block Llama small enough for a test to train in milliseconds (hidden 64, 4 heads of 16, 2 kv heads).
pub fn tiny_block(intermediate: usize) -> LlamaConfig {
    LlamaConfig {
        hidden: 64,
        intermediate,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        n_layers: 1,
        vocab: 32,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_layout: RopeLayout::HalfSplit,
        tie_embeddings: false,
        attn_bias: false,
    }
}
