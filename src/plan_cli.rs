//! `engine plan`: the memory plan of a GPU run, printed before anything is loaded.
use clap::Args;
use eqat::io::hf::HfConfig;
use eqat::plan::report::{render, Budgets};
use eqat::plan::{parse_size, shape, ComputeDType, PlanInput, SHAPES};
use eqat::quant::fake_quant::QuantConfig;
use std::path::PathBuf;

#[derive(Args)]
pub struct PlanArgs {
    /// A known shape: smollm2-135m, llama2-7b, llama3-8b, llama2-70b.
    #[arg(long, conflicts_with = "model")]
    shape: Option<String>,
    /// A Hugging Face model directory or config.json (only the config is read).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    wbits: u32,
    #[arg(long, default_value_t = 64)]
    group_size: i64,
    /// GPU memory budget (K, M, G, T are binary: 80G = 80 GiB).
    #[arg(long, default_value = "80G")]
    gpu_mem: String,
    /// Host RAM budget; block inputs beyond it go to disk.
    #[arg(long, default_value = "64G")]
    host_mem: String,
    /// Block-AP calibration sequences (recipe 4096).
    #[arg(long, default_value_t = 4096)]
    train_size: usize,
    /// Block-AP validation sequences (recipe 64).
    #[arg(long, default_value_t = 64)]
    val_size: usize,
    /// Block-AP tokens per sequence (recipe 2048).
    #[arg(long, default_value_t = 2048)]
    seqlen: usize,
    /// Block-AP sequences per step (recipe 2).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Block-AP epochs (recipe 2).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// E2E-QP tokens per sequence (recipe 4096).
    #[arg(long, default_value_t = 4096)]
    e2e_seqlen: usize,
    /// Compute dtype of activations and fake-quantized weights: bf16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Measured milliseconds of one Block-AP step (engine bench block-ap); without it the time is unknown.
    #[arg(long)]
    block_step_ms: Option<f64>,
    /// Measured milliseconds of one E2E-QP micro-step (one sequence).
    #[arg(long)]
    e2e_step_ms: Option<f64>,
}

pub fn plan(a: PlanArgs) -> eqat::Result<()> {
    let bad = |msg: String| eqat::Error::invalid("engine plan", msg);
    let (cfg, name) = match (&a.shape, &a.model) {
        (Some(s), None) => (shape(s)?, s.clone()),
        (None, Some(m)) => (HfConfig::open(m)?.llama, m.display().to_string()),
        _ => {
            return Err(bad(format!(
                "pass --shape ({}) or --model DIR",
                SHAPES.join(", ")
            )))
        }
    };
    let dtype = match a.dtype.as_str() {
        "bf16" => ComputeDType::Bf16,
        "f32" => ComputeDType::F32,
        other => return Err(bad(format!("--dtype {other}: expected bf16 or f32"))),
    };
    if a.batch == 0 || a.train_size < a.batch {
        return Err(bad(format!(
            "--train-size {} cannot fill one --batch {}",
            a.train_size, a.batch
        )));
    }
    let input = PlanInput {
        cfg,
        quant: QuantConfig::new(a.wbits, a.group_size)?,
        train_size: a.train_size,
        val_size: a.val_size,
        seqlen: a.seqlen,
        batch: a.batch,
        epochs: a.epochs,
        dtype,
        e2e_seqlen: a.e2e_seqlen,
    };
    let budgets = Budgets {
        gpu_mem: parse_size(&a.gpu_mem)?,
        host_mem: parse_size(&a.host_mem)?,
        block_step_ms: a.block_step_ms,
        e2e_step_ms: a.e2e_step_ms,
    };
    let report = render(&input, &budgets)?;
    println!("plan for {name}");
    print!("{}", report.text);
    if report.refusals.is_empty() {
        return Ok(());
    }
    Err(bad(format!(
        "this run cannot fit:\n  {}",
        report.refusals.join("\n  ")
    )))
}
