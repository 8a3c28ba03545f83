//! `engine train`: its flags and the run they describe (Block-AP, E2E-QP, the perplexities before and after).
use crate::{dp_cli, model_path, parallel_cli};
use eqat::eval::data::default_eval_data;
use eqat::eval::EvalOptions;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::block_ap::BlockApOptions;
use eqat::train::e2e_data::E2eData;
use eqat::train::e2e_qp::{E2eOptions, SaveEvery};
use eqat::train::job::{run_train, Calibration, Phase, TrainArgs};
use std::path::PathBuf;

/// The flags of `engine train` (see `engine train --help`).
#[derive(clap::Args)]
pub struct TrainFlags {
    /// A GGUF file (architecture llama).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    wbits: u32,
    /// Weights per (scale, zero) group along the input dimension; -1 = one group per row.
    #[arg(long, default_value_t = 64)]
    group_size: i64,
    /// Calibration text (plain, *.raw WikiText, or *.jsonl with "text"), or `self` to sample it from the model.
    #[arg(long, default_value = "self")]
    calib: String,
    /// The checkpoint directory.
    #[arg(long, default_value = "eqat-out")]
    out: PathBuf,
    /// block-ap, or all (Block-AP then E2E-QP).
    #[arg(long, default_value = "all")]
    phase: String,
    /// Calibration sequences for training (recipe: 4096).
    #[arg(long, default_value_t = 64)]
    train_size: usize,
    /// Calibration sequences for validation (recipe: 64).
    #[arg(long, default_value_t = 8)]
    val_size: usize,
    /// Tokens per calibration sequence (recipe: 2048).
    #[arg(long, default_value_t = 256)]
    seqlen: usize,
    /// Block-AP epochs (recipe: 2).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Block-AP batch (recipe: 2).
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Stop a block after N epochs whose validation loss does not beat its best (official --early_stop);
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    early_stop: usize,
    /// Block-AP learning rate of scales and zeros (recipe: 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    quant_lr: f32,
    /// Block-AP learning rate of weights and norms (recipe: 2e-5 at 2 bits, 1e-5 otherwise).
    #[arg(long)]
    weight_lr: Option<f32>,
    /// E2E-QP learning rate (recipe: 2e-5 at 2 bits, 1e-5 otherwise).
    #[arg(long)]
    e2e_lr: Option<f32>,
    /// E2E-QP sequences per optimizer step (recipe: 32).
    #[arg(long, default_value_t = 8)]
    e2e_batch: usize,
    /// E2E-QP epochs (recipe: 1).
    #[arg(long, default_value_t = 1)]
    e2e_epochs: usize,
    /// E2E-QP training data: `calib` (the calibration text), a text file as for --calib, or Alpaca
    /// instruction records (.json array or .jsonl with "instruction", "input", "output"; loss on the
    /// response only).
    #[arg(long, default_value = "calib")]
    e2e_data: String,
    /// Tokens per E2E-QP sequence; instruction records are cut to it (default: --seqlen).
    #[arg(long)]
    e2e_seqlen: Option<usize>,
    /// E2E-QP training sequences (default: --train-size).
    #[arg(long)]
    e2e_train_size: Option<usize>,
    /// Save E2E-QP's progress into --out every N optimizer steps (`50`) or every interval (`90s`, `5m`,
    /// `1h`), and after the last step; --resume continues from the last save.
    #[arg(long, default_value = "5m")]
    e2e_checkpoint_every: String,
    /// GPU E2E-QP: block checkpoints, scale gradients and AdamW moments in pinned host memory (on), in GPU
    /// memory (off), or off when the whole run fits in the free GPU memory (auto). Same results either way.
    #[arg(long, default_value = "auto")]
    e2e_offload: String,
    /// Where Block-AP keeps its block inputs: ram, or disk (files in --out).
    #[arg(long, default_value = "ram")]
    offload: String,
    /// Host memory budget (80G = 80 GiB): the run is checked against it before it starts (default: the
    /// available memory), and with --offload ram the block inputs beyond it go to disk.
    #[arg(long)]
    host_mem: Option<String>,
    /// Where Block-AP keeps its block inputs with --device cuda: auto (GPU memory when they fit, else
    /// pinned host memory and --offload/--host-mem files, streamed to the GPU batch by batch), or host
    /// (always streamed from host memory).
    #[arg(long, default_value = "auto")]
    block_inputs: String,
    /// Continue an interrupted run in --out (the settings must match).
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where Block-AP, E2E-QP and the perplexity evaluations run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GEMMs of the training on a GPU: f32, or bf16 (bf16 operands, f32 accumulation, f32 master weights
    /// and optimizer state). Evaluation runs f32 GEMMs.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Perplexity text (default: shared/data/wikitext-2-raw/wiki.test.raw); `none` skips evaluation.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    eval_ctx: usize,
    /// Evaluate only the first N windows (CPU-sized default).
    #[arg(long, default_value_t = 8)]
    eval_windows: usize,
    #[command(flatten)]
    parallel: parallel_cli::ParallelFlags,
    #[command(flatten)]
    data_parallel: dp_cli::DataParallelFlags,
}

pub fn train(flags: TrainFlags) -> eqat::Result<()> {
    let TrainFlags {
        model,
        wbits,
        group_size,
        calib,
        out,
        phase,
        train_size,
        val_size,
        seqlen,
        epochs,
        batch_size,
        early_stop,
        quant_lr,
        weight_lr,
        e2e_lr,
        e2e_batch,
        e2e_epochs,
        e2e_data,
        e2e_seqlen,
        e2e_train_size,
        e2e_checkpoint_every,
        e2e_offload,
        offload,
        host_mem,
        block_inputs,
        resume,
        seed,
        device,
        dtype,
        eval_data,
        eval_ctx,
        eval_windows,
        parallel,
        data_parallel,
    } = flags;
    let flag = |name: &str, value: &str, allowed: &str| {
        eqat::Error::invalid(
            "engine train",
            format!("--{name} {value}: expected {allowed}"),
        )
    };
    let quant = QuantConfig::new(wbits, group_size).map_err(|e| {
        eqat::Error::invalid(
            "engine train",
            format!("--wbits {wbits} --group-size {group_size}: {e}"),
        )
    })?;
    let phase = match phase.as_str() {
        "block-ap" => Phase::BlockAp,
        "all" => Phase::All,
        other => return Err(flag("phase", other, "block-ap or all")),
    };
    let offload_disk = match offload.as_str() {
        "ram" => false,
        "disk" => true,
        other => return Err(flag("offload", other, "ram or disk")),
    };
    let stream_block_inputs = match block_inputs.as_str() {
        "auto" => false,
        "host" => true,
        other => return Err(flag("block-inputs", other, "auto or host")),
    };
    let calib = if calib == "self" {
        Calibration::SelfGenerated
    } else {
        Calibration::File(calib.into())
    };
    let eval = match eval_data {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => Some(default_eval_data()?),
    };
    let (device, e2e_ranks) = data_parallel.resolve(&device)?;
    let recipe = BlockApOptions::recipe(quant);
    let mut e2e = E2eOptions::recipe(wbits);
    e2e.lr = e2e_lr.unwrap_or(e2e.lr);
    e2e.global_batch = e2e_batch;
    e2e.epochs = e2e_epochs;
    let args = TrainArgs {
        model: model_path(model)?,
        out,
        quant,
        calib,
        phase,
        train_size,
        val_size,
        seqlen,
        epochs,
        batch_size,
        quant_lr,
        weight_lr: weight_lr.unwrap_or(recipe.weight_lr),
        early_stop,
        e2e,
        e2e_data: if e2e_data == "calib" {
            E2eData::Calibration
        } else {
            E2eData::File(e2e_data.into())
        },
        e2e_seqlen: e2e_seqlen.unwrap_or(seqlen),
        e2e_train_size: e2e_train_size.unwrap_or(train_size),
        e2e_checkpoint_every: SaveEvery::parse(&e2e_checkpoint_every)?,
        e2e_offload: match e2e_offload.as_str() {
            "auto" => None,
            "on" => Some(true),
            "off" => Some(false),
            other => {
                return Err(eqat::Error::invalid(
                    "engine train",
                    format!("--e2e-offload {other}: expected auto, on or off"),
                ))
            }
        },
        offload_disk,
        host_mem: host_mem
            .as_deref()
            .map(eqat::plan::parse_size)
            .transpose()?,
        stream_block_inputs,
        resume,
        seed,
        device,
        dtype: match dtype.as_str() {
            "f32" => eqat::plan::ComputeDType::F32,
            "bf16" => eqat::plan::ComputeDType::Bf16,
            other => return Err(flag("dtype", other, "f32 or bf16")),
        },
        eval: eval.map(|p| {
            (
                p,
                EvalOptions {
                    ctx: eval_ctx,
                    max_windows: Some(eval_windows),
                    batch: 4,
                },
            )
        }),
        mrem: parallel.mrem()?,
        e2e_ranks,
    };
    if args.e2e_ranks.follows() {
        return eqat::train::job::run_e2e_follower(&args, |line| println!("{line}")).map(|_| ());
    }
    let (fp, tokenizer) = eqat::model::open_model(&args.model)?;
    println!(
        "model {}: {} blocks, hidden {}; w{}g{}",
        args.model.display(),
        fp.config().n_layers,
        fp.config().hidden,
        wbits,
        group_size
    );
    let s = run_train(&args, &tokenizer, &fp, |line| println!("{line}"))?;
    println!("\nsummary ({}):", args.out.display());
    let show = |p: Option<f64>| p.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    println!(
        "  perplexity  FP {}  RTN {}  Block-AP {}  +E2E-QP {}",
        show(s.ppl_fp),
        show(s.ppl_rtn),
        show(s.ppl_block_ap),
        show(s.ppl_e2e)
    );
    println!(
        "  wall time   Block-AP {:.1} s  E2E-QP {:.1} s",
        s.block_ap_seconds, s.e2e_seconds
    );
    println!("  block  final train loss  final val loss");
    for (i, t, v) in &s.block_losses {
        println!(
            "  {i:>5}  {t:>16.4e}  {:>14}",
            v.map(|v| format!("{v:.4e}")).unwrap_or("-".into())
        );
    }
    Ok(())
}
