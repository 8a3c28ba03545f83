//! `engine bench`: the arguments and the printout of the speed benchmarks (the work is in `eqat::bench`).
use clap::{Args, Subcommand};
use eqat::bench::{describe_peak, run_block_ap_bench, BenchShape, BlockApBench, MatmulDType};
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::device::Device;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchKind,
}

#[derive(Subcommand)]
pub enum BenchKind {
    /// One Block-AP training step on a random block (fake-quant of the 7 linears, forward, MSE, backward,
    /// AdamW): median step time, achieved TFLOP/s and peak memory.
    BlockAp {
        /// smollm2-135m, llama2-7b, llama3-8b or llama2-70b.
        #[arg(long, default_value = "llama2-7b")]
        shape: String,
        #[arg(long, default_value_t = 2)]
        wbits: u32,
        #[arg(long, default_value_t = 64)]
        group_size: i64,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        seqlen: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// GEMM operands: f32, or bf16 (f32 master weights, accumulation and everything outside the GEMMs).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first (allocator warm-up, kernel compilation).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Streamed: a model of --blocks blocks whose weights arrive block by block and whose --samples
        /// block inputs live in pinned host memory up to --host-mem (the rest in a file), copied to the GPU
        /// double-buffered; compared with the resident step. GPU only.
        #[command(flatten)]
        stream: crate::bench_stream_cli::StreamArgs,
    },
    /// One E2E-QP training step on a synthetic quantized model (packed integer weights generated where the step
    /// runs): median step time, tokens/s, TFLOP/s (8·params·tokens) and peak memory.
    E2eQp(crate::bench_e2e_cli::E2eQpArgs),
    /// Block-AP's wall time over a synthetic model (random blocks of a known shape), in the sequential order and
    /// MREM-parallel with K modules (one per --gpus entry): the speed-up of `engine train --parallel modules`.
    Mrem(crate::bench_mrem_cli::MremArgs),
}

pub fn bench(args: BenchArgs) -> eqat::Result<()> {
    let (shape, wbits, group_size, batch, seqlen, device, dtype, steps, warmup, seed, stream) =
        match args.which {
            BenchKind::E2eQp(a) => return crate::bench_e2e_cli::bench_e2e_qp(a),
            BenchKind::Mrem(a) => return crate::bench_mrem_cli::bench_mrem(a),
            BenchKind::BlockAp {
                shape,
                wbits,
                group_size,
                batch,
                seqlen,
                device,
                dtype,
                steps,
                warmup,
                seed,
                stream,
            } => (
                shape, wbits, group_size, batch, seqlen, device, dtype, steps, warmup, seed, stream,
            ),
        };
    let dtype = parse_dtype(&dtype)?;
    let b = BlockApBench {
        shape: BenchShape::parse(&shape)?,
        quant: QuantConfig::new(wbits, group_size)?,
        batch,
        seqlen,
        device: Device::parse(&device)?,
        dtype,
        steps,
        warmup,
        seed,
    };
    if stream.stream {
        return crate::bench_stream_cli::bench_stream(b, &stream);
    }
    let r = run_block_ap_bench(&b)?;
    println!(
        "block-ap {shape} w{wbits}g{group_size} batch {batch} seqlen {seqlen} on {} ({dtype:?} GEMMs)",
        r.device
    );
    println!("  flops: {}", r.flops.describe());
    let times: Vec<String> = r.step_ms.iter().map(|t| format!("{t:.2}")).collect();
    println!("  step ms: {}", times.join(" "));
    println!(
        "  losses: first {:.6e} last {:.6e}",
        r.losses.first().copied().unwrap_or(f32::NAN),
        r.losses.last().copied().unwrap_or(f32::NAN)
    );
    let peak = describe_peak(r.peak_bytes, r.peak_reserved_bytes);
    println!(
        "  median step {:.2} ms, {:.2} TFLOP/s, {peak}",
        r.median_ms(),
        r.tflops()
    );
    if let (Some(ms), Some(tflops)) = (r.back_to_back_ms, r.back_to_back_tflops()) {
        println!(
            "  back to back (as engine train runs them): {ms:.2} ms a step, {tflops:.2} TFLOP/s"
        );
    }
    if let Some((driver, cached)) = r.allocs_per_step {
        println!(
            "  device buffers per step: {driver:.1} from cuMemAlloc, {cached:.1} from the cache"
        );
    }
    Ok(())
}

/// `--dtype`: f32, or bf16 GEMM operands.
pub fn parse_dtype(dtype: &str) -> eqat::Result<MatmulDType> {
    match dtype {
        "f32" => Ok(MatmulDType::F32),
        "bf16" => Ok(MatmulDType::Bf16),
        other => Err(eqat::Error::invalid(
            "engine bench",
            format!("--dtype {other}: expected f32 or bf16"),
        )),
    }
}
