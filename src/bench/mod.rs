//! `engine bench block-ap`: the speed of one Block-AP training step on a synthetic block, the step that
//! `train::block_ap::train_step` runs in training: fake-quantize the seven linears, the block forward, MSE against
//! a target, backward, AdamW over scales, zeros, weights and norms.
//!
//! Weights, inputs and targets are random from a seed; on a GPU they are generated there (`random.rs`), so no
//! host copy of a 70B-shaped block is made. Reported: the median step time over the timed steps (each step ends
//! with a device synchronisation), the achieved TFLOP/s for [`StepFlops`], on a GPU also the mean step time of as
//! many steps run back to back as `engine train` runs them (`train_step_queued`: losses read once at the end, so
//! the host queues a step while the device runs the last), and the peak memory of the timed steps (GPU: the caching allocator's `MemoryStats`, parameters and optimizer state included; CPU: the process's
//! peak RSS, VmHWM).
pub mod e2e;
pub mod mrem;
#[cfg(feature = "cuda")]
mod prefetch;
#[cfg(feature = "cuda")]
pub mod random;
#[cfg(feature = "cuda")]
pub mod stream;

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::model::llama::{BlockVars, BlockWeights, LlamaConfig};
use crate::ops::rope::RopeLayout;
use crate::quant::fake_quant::QuantConfig;
use crate::tensor::{rng::Rng, Tensor};
use crate::train::block_ap::{block_ap_optimizer, train_step, train_step_queued, BlockApOptions};
use crate::train::device::Device;
use std::time::Instant;

/// Block shapes of the models the benchmark knows (one block: hidden, FFN width, query / key-value heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchShape {
    Smollm2_135m,
    Llama2_7b,
    Llama3_8b,
    Llama2_70b,
}

impl BenchShape {
    pub const NAMES: &'static str = "smollm2-135m, llama2-7b, llama3-8b or llama2-70b";

    pub fn parse(s: &str) -> Result<BenchShape> {
        Ok(match s {
            "smollm2-135m" => BenchShape::Smollm2_135m,
            "llama2-7b" => BenchShape::Llama2_7b,
            "llama3-8b" => BenchShape::Llama3_8b,
            "llama2-70b" => BenchShape::Llama2_70b,
            _ => {
                return Err(Error::invalid(
                    "bench",
                    format!("shape `{s}`: expected {}", Self::NAMES),
                ))
            }
        })
    }

    /// The block's configuration (one layer; vocabulary unused).
    pub fn config(self) -> LlamaConfig {
        let llama = |hidden, intermediate, n_heads, n_kv_heads, rope_base| LlamaConfig {
            hidden,
            intermediate,
            n_heads,
            n_kv_heads,
            head_dim: 128,
            n_layers: 1,
            vocab: 32000,
            rms_eps: 1e-5,
            rope_base,
            rope_layout: RopeLayout::HalfSplit,
            tie_embeddings: false,
            attn_bias: false,
        };
        match self {
            BenchShape::Smollm2_135m => LlamaConfig {
                n_layers: 1,
                ..LlamaConfig::smollm2_135m()
            },
            BenchShape::Llama2_7b => llama(4096, 11008, 32, 32, 10_000.0),
            BenchShape::Llama3_8b => llama(4096, 14336, 32, 8, 500_000.0),
            BenchShape::Llama2_70b => llama(8192, 28672, 64, 8, 10_000.0),
        }
    }
}

/// GEMM operands in the step: f32, or bf16 with f32 accumulation (`GpuContext::set_matmul_bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulDType {
    F32,
    Bf16,
}

#[derive(Clone, Debug)]
pub struct BlockApBench {
    pub shape: BenchShape,
    pub quant: QuantConfig,
    pub batch: usize,
    pub seqlen: usize,
    pub device: Device,
    pub dtype: MatmulDType,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
}

/// Floating-point operations of one step, counted as:
///   linears   forward 2·tokens·params, backward 4·tokens·params (dX and dW), params = Σ N·K of the 7 linears
///   attention forward 2·B·H·T²·D (causal: half of QKᵀ and of P·V, each 2·B·H·T²·D in full),
///             backward 2.5× the forward (dV, dP, dQ, dK and the recomputed QKᵀ)
/// Elementwise work (norms, rope, fake-quant, AdamW) is left out, as in gpu.md's PyTorch figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepFlops {
    pub gemm_fwd: f64,
    pub gemm_bwd: f64,
    pub attn_fwd: f64,
    pub attn_bwd: f64,
}

impl StepFlops {
    pub fn new(cfg: &LlamaConfig, batch: usize, seqlen: usize) -> StepFlops {
        let params: f64 = cfg
            .linear_shapes()
            .iter()
            .map(|&(_, n, k)| (n * k) as f64)
            .sum();
        let tokens = (batch * seqlen) as f64;
        let attn_fwd =
            2.0 * batch as f64 * cfg.n_heads as f64 * (seqlen as f64).powi(2) * cfg.head_dim as f64;
        StepFlops {
            gemm_fwd: 2.0 * tokens * params,
            gemm_bwd: 4.0 * tokens * params,
            attn_fwd,
            attn_bwd: 2.5 * attn_fwd,
        }
    }

    pub fn total(&self) -> f64 {
        self.gemm_fwd + self.gemm_bwd + self.attn_fwd + self.attn_bwd
    }

    /// The formula with this block's numbers, for the report.
    pub fn describe(&self) -> String {
        format!(
            "linears 6·tokens·params = {:.3} TFLOP (fwd {:.3}, bwd {:.3}); attention 3.5·2·B·H·T²·D = {:.3} TFLOP \
             (fwd {:.3}, bwd 2.5x); total {:.3} TFLOP",
            (self.gemm_fwd + self.gemm_bwd) * 1e-12,
            self.gemm_fwd * 1e-12,
            self.gemm_bwd * 1e-12,
            (self.attn_fwd + self.attn_bwd) * 1e-12,
            self.attn_fwd * 1e-12,
            self.total() * 1e-12
        )
    }
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub device: String,
    pub flops: StepFlops,
    /// Timed step times, in milliseconds, in run order.
    pub step_ms: Vec<f64>,
    pub losses: Vec<f32>,
    /// Peak bytes over the timed steps (GPU: in use by live buffers; CPU: peak RSS).
    pub peak_bytes: usize,
    /// GPU only: the peak reserved by the caching allocator (live and cached buffers).
    pub peak_reserved_bytes: Option<usize>,
    /// GPU only: device buffers requested per timed step, (from cuMemAlloc, from the allocator's cache).
    pub allocs_per_step: Option<(f64, f64)>,
    /// GPU only: the mean step time, in milliseconds, of `step_ms.len()` steps run back to back.
    pub back_to_back_ms: Option<f64>,
}

impl BenchReport {
    pub fn median_ms(&self) -> f64 {
        median(&self.step_ms)
    }

    pub fn tflops(&self) -> f64 {
        self.flops.total() / (self.median_ms() * 1e-3) * 1e-12
    }

    /// TFLOP/s of the back-to-back steps (GPU only).
    pub fn back_to_back_tflops(&self) -> Option<f64> {
        self.back_to_back_ms
            .map(|ms| self.flops.total() / (ms * 1e-3) * 1e-12)
    }
}

/// Random block weights where the benchmark runs: norms uniform in [0.8, 1.2), linears N(0, 0.02²).
fn random_block(cfg: &LlamaConfig, device: &Device, seed: u64) -> Result<BlockWeights> {
    match device {
        Device::Cpu => Ok(BlockWeights::random(cfg, &mut Rng::new(seed))),
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => {
            use random::{randn_cuda, uniform_cuda};
            let shapes = cfg.linear_shapes();
            let mut linears = Vec::with_capacity(7);
            for (i, &(_, n, k)) in shapes.iter().enumerate() {
                linears.push(randn_cuda(ctx, &[n, k], 0.0, 0.02, seed + 3 + i as u64)?);
            }
            Ok(BlockWeights {
                attn_norm: uniform_cuda(ctx, &[cfg.hidden], 0.8, 1.2, seed + 1)?,
                ffn_norm: uniform_cuda(ctx, &[cfg.hidden], 0.8, 1.2, seed + 2)?,
                linears: linears.try_into().expect("seven linears"),
            })
        }
    }
}

/// A random N(0, 1) activation [B, T, C] where the benchmark runs.
fn random_activation(shape: &[usize], device: &Device, seed: u64) -> Result<Tensor> {
    match device {
        Device::Cpu => Ok(Tensor::randn(shape, 1.0, &mut Rng::new(seed))),
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => random::randn_cuda(ctx, shape, 0.0, 1.0, seed),
    }
}

/// The process's peak resident set (VmHWM of /proc/self/status), in bytes; 0 where it cannot be read.
pub fn peak_rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn synchronize(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => ctx.synchronize(),
        _ => Ok(()),
    }
}

/// The median of the timed steps' milliseconds; NaN when none ran.
fn median(step_ms: &[f64]) -> f64 {
    let mut v = step_ms.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Starts the peak-memory window of [`peak_memory`] (on a GPU; the CPU's peak RSS cannot be reset).
fn reset_peak(device: &Device) {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => ctx.reset_peak(),
        _ => {}
    }
}

/// (peak bytes, peak reserved bytes) since [`reset_peak`]: on a GPU the caching allocator's peak in use and
/// peak reserved; on the CPU the process's peak RSS and None.
fn peak_memory(device: &Device) -> (usize, Option<usize>) {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => {
            let m = ctx.memory_stats();
            (m.peak_in_use, Some(m.peak_reserved))
        }
        _ => (peak_rss_bytes(), None),
    }
}

/// The caching allocator's (driver allocations, cache reuses) so far; None on the CPU.
fn alloc_counts(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => {
            let m = ctx.memory_stats();
            Some((m.driver_allocs, m.reuses))
        }
        _ => None,
    }
}

/// The peak-memory part of a report line, in GiB.
pub fn describe_peak(peak_bytes: usize, peak_reserved_bytes: Option<usize>) -> String {
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    match peak_reserved_bytes {
        Some(res) => format!(
            "peak {:.2} GiB in use ({:.2} GiB reserved)",
            gib(peak_bytes),
            gib(res)
        ),
        None => format!("peak RSS {:.2} GiB", gib(peak_bytes)),
    }
}

/// Runs `warmup` + `steps` Block-AP steps of the synthetic block and times the last `steps`.
pub fn run_block_ap_bench(b: &BlockApBench) -> Result<BenchReport> {
    if b.steps == 0 || b.batch == 0 || b.seqlen == 0 {
        return Err(Error::invalid(
            "bench",
            format!(
                "steps {}, batch {} and seqlen {} must be positive",
                b.steps, b.batch, b.seqlen
            ),
        ));
    }
    let cfg = b.shape.config();
    match (&b.device, b.dtype) {
        (_, MatmulDType::F32) => {}
        #[cfg(feature = "cuda")]
        (Device::Cuda(ctx), MatmulDType::Bf16) => ctx.set_matmul_bf16(true),
        (_, MatmulDType::Bf16) => {
            return Err(Error::invalid(
                "bench",
                "--dtype bf16 runs the GEMMs on a GPU: use it with --device cuda",
            ))
        }
    }
    let mut opts = BlockApOptions::recipe(b.quant);
    opts.device = b.device.clone();
    let mut tape = Tape::new();
    let vars = {
        // The generated weights are copied onto the tape; this copy is dropped before anything is measured.
        let w = random_block(&cfg, &b.device, b.seed)?;
        BlockVars::register(&mut tape, &w, Some(b.quant))?
    };
    let mut opt = block_ap_optimizer(&mut tape, &vars, &opts)?;
    // As `engine train` on a GPU does (train::block_ap): the non-finite check moves from every update's
    // gradients to the losses, checked below each step.
    #[cfg(feature = "cuda")]
    if !b.device.is_cpu() {
        opt.skip_device_gradient_check();
    }
    let act = [b.batch, b.seqlen, cfg.hidden];
    let xs = random_activation(&act, &b.device, b.seed + 100)?;
    let ys = random_activation(&act, &b.device, b.seed + 101)?;
    let mut step_ms = Vec::with_capacity(b.steps);
    let mut losses = Vec::with_capacity(b.steps);
    let mut allocs_before = None;
    for i in 0..b.warmup + b.steps {
        if i == b.warmup {
            reset_peak(&b.device);
            allocs_before = alloc_counts(&b.device);
        }
        let t0 = Instant::now();
        let loss = train_step(
            &mut tape,
            &cfg,
            &vars,
            &mut opt,
            (xs.clone(), ys.clone()),
            1.0,
            &mut |_| Ok(()),
        )?;
        synchronize(&b.device)?;
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                what: format!("block-ap bench loss {loss} at step {i}"),
            });
        }
        if i >= b.warmup {
            step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            losses.push(loss);
        }
    }
    let (peak_bytes, peak_reserved_bytes) = peak_memory(&b.device);
    let back_to_back_ms = match b.device.is_cpu() {
        true => None,
        false => Some(back_to_back_step_ms(
            &mut tape,
            &cfg,
            &vars,
            &mut opt,
            (&xs, &ys),
            b,
        )?),
    };
    let allocs_per_step = match (allocs_before, alloc_counts(&b.device)) {
        (Some((d0, r0)), Some((d1, r1))) => Some((
            (d1 - d0) as f64 / b.steps as f64,
            (r1 - r0) as f64 / b.steps as f64,
        )),
        _ => None,
    };
    Ok(BenchReport {
        device: b.device.name(),
        flops: StepFlops::new(&cfg, b.batch, b.seqlen),
        step_ms,
        losses,
        peak_bytes,
        peak_reserved_bytes,
        allocs_per_step,
        back_to_back_ms,
    })
}

/// The mean time of `b.steps` steps queued back to back as `engine train` queues them on a GPU (the losses left
/// on the device and read once at the end), after one synchronisation.
fn back_to_back_step_ms(
    tape: &mut Tape,
    cfg: &LlamaConfig,
    vars: &BlockVars,
    opt: &mut crate::train::adamw::AdamW,
    (xs, ys): (&Tensor, &Tensor),
    b: &BlockApBench,
) -> Result<f64> {
    synchronize(&b.device)?;
    let mut losses = crate::train::device::LossQueue::new();
    let t0 = Instant::now();
    for i in 0..b.steps {
        let batch = (xs.clone(), ys.clone());
        let loss = train_step_queued(tape, cfg, vars, opt, batch, 1.0, &mut |_| Ok(()))?;
        losses.push(i, loss);
    }
    synchronize(&b.device)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3 / b.steps as f64;
    for (i, loss) in losses.read_back()? {
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                what: format!("block-ap bench loss {loss} at back-to-back step {i}"),
            });
        }
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_match_the_pytorch_reference_counts() {
        // gpu.md's step TFLOP for batch 2 x 2048 (its attention count differs a little from ours: within 1%).
        for (shape, tflop) in [
            (BenchShape::Llama2_7b, 5.18),
            (BenchShape::Llama3_8b, 5.57),
            (BenchShape::Llama2_70b, 21.4),
        ] {
            let f = StepFlops::new(&shape.config(), 2, 2048).total() * 1e-12;
            assert!((f / tflop - 1.0).abs() < 0.01, "{shape:?}: {f} vs {tflop}");
        }
        // 7B by hand: params 4·4096² + 3·4096·11008; attention 2·2·32·2048²·128 forward.
        let f = StepFlops::new(&BenchShape::Llama2_7b.config(), 2, 2048);
        let params = 4.0 * 4096f64.powi(2) + 3.0 * 4096.0 * 11008.0;
        assert_eq!(f.gemm_fwd, 2.0 * 4096.0 * params);
        assert_eq!(f.gemm_bwd, 2.0 * f.gemm_fwd);
        assert_eq!(f.attn_fwd, 2.0 * 2.0 * 32.0 * 2048f64.powi(2) * 128.0);
        assert_eq!(f.attn_bwd, 2.5 * f.attn_fwd);
    }

    #[test]
    fn shapes_parse_and_validate() {
        for name in ["smollm2-135m", "llama2-7b", "llama3-8b", "llama2-70b"] {
            let cfg = BenchShape::parse(name).unwrap().config();
            cfg.validate().unwrap();
            assert_eq!(cfg.n_layers, 1);
        }
        let e = BenchShape::parse("llama9").unwrap_err().to_string();
        assert!(e.contains("llama9") && e.contains("llama2-70b"), "{e}");
    }

    #[test]
    fn a_cpu_bench_times_real_steps_and_the_loss_falls() {
        let b = BlockApBench {
            shape: BenchShape::Smollm2_135m,
            quant: QuantConfig::new(2, 64).unwrap(),
            batch: 1,
            seqlen: 16,
            device: Device::Cpu,
            dtype: MatmulDType::F32,
            steps: 3,
            warmup: 1,
            seed: 5,
        };
        let r = run_block_ap_bench(&b).unwrap();
        assert_eq!(r.step_ms.len(), 3);
        assert!(r.median_ms() > 0.0 && r.tflops() > 0.0);
        assert!(r.peak_bytes > 0, "peak RSS read from /proc");
        assert_eq!(r.allocs_per_step, None, "no device allocator on the CPU");
        assert!(r.losses.iter().all(|l| l.is_finite()));
        // Same batch every step at lr factor 1: the optimizer lowers the loss.
        assert!(r.losses[2] < r.losses[0], "{:?}", r.losses);
        let e = run_block_ap_bench(&BlockApBench {
            dtype: MatmulDType::Bf16,
            ..b
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("bf16") && e.contains("cuda"), "{e}");
    }
}
