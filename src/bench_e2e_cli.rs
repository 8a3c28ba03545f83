//! `engine bench e2e-qp`: the arguments and the printout of the E2E-QP step benchmark (`eqat::bench::e2e`).
use crate::bench_cli::parse_dtype;
use clap::Args;
use eqat::bench::e2e::{run_e2e_qp_bench, E2eQpBench};
use eqat::bench::{describe_peak, BenchShape};
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::device::Device;

#[derive(Args)]
pub struct E2eQpArgs {
    /// smollm2-135m, llama2-7b, llama3-8b or llama2-70b (the whole model: its depth and vocabulary).
    #[arg(long, default_value = "llama2-7b")]
    shape: String,
    #[arg(long, default_value_t = 2)]
    wbits: u32,
    #[arg(long, default_value_t = 64)]
    group_size: i64,
    /// Tokens of the one sequence per step.
    #[arg(long, default_value_t = 4096)]
    seqlen: usize,
    /// Blocks (default: the model's own count).
    #[arg(long)]
    layers: Option<usize>,
    /// Random weights from --seed (the only input this benchmark has; required to say so).
    #[arg(long, required = true)]
    synthetic: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// GEMM operands: f32, or bf16 (f32 accumulation; scales, optimizer and everything else f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (allocator warm-up, kernel compilation).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the block checkpoints, the AdamW moments and the embedding on the GPU (default: in host memory).
    #[arg(long)]
    no_offload: bool,
}

pub fn bench_e2e_qp(a: E2eQpArgs) -> eqat::Result<()> {
    let b = E2eQpBench {
        shape: BenchShape::parse(&a.shape)?,
        quant: QuantConfig::new(a.wbits, a.group_size)?,
        seqlen: a.seqlen,
        layers: a.layers,
        device: Device::parse(&a.device)?,
        dtype: parse_dtype(&a.dtype)?,
        steps: a.steps,
        warmup: a.warmup,
        seed: a.seed,
        offload: !a.no_offload,
    };
    let r = run_e2e_qp_bench(&b)?;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!(
        "e2e-qp {} ({} blocks, {:.3}B linear params) w{}g{} seqlen {} on {} ({:?} GEMMs), synthetic seed {}",
        a.shape,
        r.layers,
        r.params as f64 * 1e-9,
        a.wbits,
        a.group_size,
        a.seqlen,
        r.device,
        b.dtype,
        a.seed
    );
    let times: Vec<String> = r.step_ms.iter().map(|t| format!("{t:.1}")).collect();
    println!("  step ms: {}", times.join(" "));
    println!(
        "  losses: first {:.6} last {:.6}",
        r.losses.first().copied().unwrap_or(f32::NAN),
        r.losses.last().copied().unwrap_or(f32::NAN)
    );
    let peak = describe_peak(r.peak_bytes, r.peak_reserved_bytes);
    println!(
        "  median step {:.1} ms, {:.0} tokens/s, {:.1} TFLOP/s (8·params·tokens), {peak}; packed weights {:.2} GiB; host peak RSS {:.2} GiB{}",
        r.median_ms(),
        r.tokens_per_s(),
        r.tflops(),
        gib(r.packed_bytes),
        gib(r.host_peak_bytes),
        if b.offload { "" } else { " (no offload)" }
    );
    Ok(())
}
