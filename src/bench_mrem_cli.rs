//! `engine bench mrem`: the arguments and the printout of the MREM Block-AP wall-time benchmark
//! (`eqat::bench::mrem`).
use crate::bench_cli::parse_dtype;
use clap::Args;
use eqat::bench::mrem::{run_mrem_bench, MremBench};
use eqat::bench::BenchShape;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::device::Device;

#[derive(Args)]
pub struct MremArgs {
    /// Block shape: smollm2-135m, llama2-7b, llama3-8b or llama2-70b.
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// Blocks of the synthetic model.
    #[arg(long, default_value_t = 30)]
    layers: usize,
    #[arg(long, default_value_t = 2)]
    wbits: u32,
    #[arg(long, default_value_t = 64)]
    group_size: i64,
    /// Training windows.
    #[arg(long, default_value_t = 64)]
    samples: usize,
    #[arg(long, default_value_t = 1024)]
    seqlen: usize,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// cpu, cuda or cuda:N: the sequential run's device (and the modules' when --gpus is not given).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// GEMM operands: f32, or bf16 (f32 accumulation, master weights and optimizer state).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// One module per listed GPU (0,1,2,3; an ordinal may repeat); sets K.
    #[arg(long)]
    gpus: Option<String>,
    /// K without --gpus (every module on --device).
    #[arg(long, default_value_t = 2)]
    modules: usize,
    /// Time only the MREM run.
    #[arg(long)]
    no_sequential: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn bench_mrem(a: MremArgs) -> eqat::Result<()> {
    let module_devices = match &a.gpus {
        Some(list) => crate::parallel_cli::gpu_devices("engine bench mrem", list)?,
        None => Vec::new(),
    };
    let b = MremBench {
        block: BenchShape::parse(&a.shape)?.config(),
        layers: a.layers,
        quant: QuantConfig::new(a.wbits, a.group_size)?,
        samples: a.samples,
        seqlen: a.seqlen,
        batch: a.batch,
        epochs: a.epochs,
        device: Device::parse(&a.device)?,
        dtype: parse_dtype(&a.dtype)?,
        modules: match module_devices.len() {
            0 => a.modules,
            n => n,
        },
        module_devices,
        sequential: !a.no_sequential,
        seed: a.seed,
    };
    let where_ = match &a.gpus {
        Some(g) => format!("GPUs {g}"),
        None => b.device.name(),
    };
    println!(
        "bench mrem: {} layers of {} w{}g{}, {} samples x {} tokens, batch {}, {} epoch(s), {:?} GEMMs; K = {} on {where_}",
        a.layers, a.shape, a.wbits, a.group_size, a.samples, a.seqlen, a.batch, a.epochs, b.dtype, b.modules
    );
    let r = run_mrem_bench(&b)?;
    let per_block = |s: f64| s / a.layers as f64;
    println!(
        "  synthetic model made in {:.1} s; {} steps a block",
        r.setup_s, r.steps_per_block
    );
    if let Some(s) = r.sequential_s {
        println!(
            "  sequential (--parallel off) on {}: {s:.2} s ({:.3} s a block)",
            b.device.name(),
            per_block(s)
        );
    }
    println!(
        "  MREM (--parallel modules, K = {}): {:.2} s ({:.3} s a block){}",
        b.modules,
        r.mrem_s,
        per_block(r.mrem_s),
        match r.sequential_s {
            Some(s) => format!(", {:.2}x the sequential speed", s / r.mrem_s),
            None => String::new(),
        }
    );
    Ok(())
}
