//! The `engine train` job: calibration data, Block-AP over every block into a resumable checkpoint, E2E-QP of the
//! scales, and perplexity before and after, with a JSONL log of every step. The CLI only parses flags into
//! [`TrainArgs`] and prints what [`run_train`] reports.
use crate::error::{Error, Result};
use crate::eval::{eval_ids, eval_windows, perplexity_of_windows, scorer, EvalOptions};
use crate::io::checkpoint::{CheckpointDir, RunIdentity};
use crate::io::tokenizer::{save_tokenizer_files, Tokenizer};
use crate::model::llama::LlamaConfig;
use crate::model::LlamaModel;
use crate::plan::{human, ComputeDType};
use crate::quant::fake_quant::QuantConfig;
use crate::train::block_ap::BlockApOptions;
use crate::train::calib::calibration_windows;
use crate::train::device::Device;
use crate::train::e2e_data::E2eData;
use crate::train::e2e_qp::{E2eOptions, SaveEvery};
use crate::train::mrem::{run_block_ap_mrem, MremOptions};
use crate::train::pipeline::{
    host_streams, run_block_ap_at, streams_at, BlockSink, Event, PipelineOptions, StreamsAt,
};
use crate::train::store::{BlockInputStore, StoreDType};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

mod checks;
mod data_parallel;
mod e2e_stage;
mod examples;
mod log;
mod models;
mod pause;

use checks::{check_args, e2e_offload, offloads};
pub use checks::{check_host_memory, FORWARD_BATCH};
use data_parallel::{check_ranks, train_e2e_ranks};
pub use data_parallel::{run_e2e_follower, E2eRanks};
use e2e_stage::e2e_stage;
use examples::e2e_examples;
use log::Log;
use models::quantized_model;
pub use models::rtn_model;
use pause::PauseHook;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Calibration {
    File(PathBuf),
    /// Text sampled from the full-precision model itself.
    SelfGenerated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    BlockAp,
    All,
}

#[derive(Clone, Debug)]
pub struct TrainArgs {
    pub model: PathBuf,
    pub out: PathBuf,
    pub quant: QuantConfig,
    pub calib: Calibration,
    pub phase: Phase,
    pub train_size: usize,
    pub val_size: usize,
    pub seqlen: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub quant_lr: f32,
    pub weight_lr: f32,
    /// Block-AP early stop: epochs without a better validation loss before a block stops; 0 = off.
    pub early_stop: usize,
    pub e2e: E2eOptions,
    pub e2e_data: E2eData,
    /// Tokens per E2E-QP sequence (instruction records are cut to it).
    pub e2e_seqlen: usize,
    /// E2E-QP training sequences.
    pub e2e_train_size: usize,
    /// When E2E-QP saves its progress into the checkpoint (also after its last step), for `resume`.
    pub e2e_checkpoint_every: SaveEvery,
    /// GPU E2E-QP: keep checkpoints, scale gradients and moments in pinned host memory (Some(true)), in GPU
    /// memory (Some(false)), or decide from the plan and the free memory (None; `checks::e2e_offload`).
    pub e2e_offload: Option<bool>,
    pub offload_disk: bool,
    /// Host memory budget: the run is checked against it (else against the available memory) before it
    /// starts, and block inputs beyond what it leaves go to disk (unless `offload_disk` puts them all there).
    pub host_mem: Option<u64>,
    /// On a GPU, keep the block inputs in pinned host memory (and files past `host_mem`) and stream each batch
    /// in and out even when they would fit in GPU memory (`--block-inputs host`).
    pub stream_block_inputs: bool,
    pub resume: bool,
    pub seed: u64,
    /// Where Block-AP trains and propagates the block inputs, where E2E-QP trains and where perplexity runs.
    pub device: Device,
    /// The GEMMs of Block-AP and E2E-QP on a GPU: f32, or bf16 operands with f32 accumulation (master weights
    /// and optimizer state stay f32). Evaluation always runs f32 GEMMs.
    pub dtype: ComputeDType,
    /// Perplexity text and protocol; None skips evaluation.
    pub eval: Option<(PathBuf, EvalOptions)>,
    /// Block-AP with K modules trained concurrently (`--parallel modules`); None = one block after another.
    pub mrem: Option<MremOptions>,
    /// Data-parallel E2E-QP: the ranks and how they meet (`--e2e-ranks`, `--e2e-gpus`, `--launcher env`).
    pub e2e_ranks: E2eRanks,
}

impl TrainArgs {
    /// The `engine train` defaults (src/main.rs) for `model` at `quant`, without evaluation: self-generated
    /// calibration, Block-AP then E2E-QP, 64 + 8 sequences of 256 tokens, 2 epochs of batch 2, the recipe's
    /// learning rates, E2E-QP on the calibration windows with batch 8 saving its progress every 5 minutes, block
    /// inputs in RAM, on the CPU, seed 0.
    /// `e2e_seqlen` and `e2e_train_size` are copies of `seqlen` and `train_size`: set them with those.
    pub fn new(model: PathBuf, out: PathBuf, quant: QuantConfig) -> TrainArgs {
        let block_ap = BlockApOptions::recipe(quant);
        let (train_size, seqlen) = (64, 256);
        TrainArgs {
            model,
            out,
            quant,
            calib: Calibration::SelfGenerated,
            phase: Phase::All,
            train_size,
            val_size: 8,
            seqlen,
            epochs: block_ap.epochs,
            batch_size: block_ap.batch_size,
            quant_lr: block_ap.quant_lr,
            weight_lr: block_ap.weight_lr,
            early_stop: 0,
            e2e: E2eOptions {
                global_batch: 8,
                ..E2eOptions::recipe(quant.wbits)
            },
            e2e_data: E2eData::Calibration,
            e2e_seqlen: seqlen,
            e2e_train_size: train_size,
            e2e_checkpoint_every: SaveEvery::DEFAULT,
            e2e_offload: None,
            offload_disk: false,
            host_mem: None,
            stream_block_inputs: false,
            resume: false,
            seed: 0,
            device: Device::Cpu,
            dtype: ComputeDType::F32,
            eval: None,
            mrem: None,
            e2e_ranks: E2eRanks::Single,
        }
    }
}

/// Perplexities and wall times of a finished job.
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    pub ppl_fp: Option<f64>,
    pub ppl_rtn: Option<f64>,
    pub ppl_block_ap: Option<f64>,
    pub ppl_e2e: Option<f64>,
    pub block_ap_seconds: f64,
    pub e2e_seconds: f64,
    pub block_losses: Vec<(usize, f32, Option<f32>)>,
}

/// Perplexity on `device` with f32 GEMMs.
fn ppl(
    model: &LlamaModel,
    windows: &[Vec<u32>],
    opts: &EvalOptions,
    device: &Device,
) -> Result<f64> {
    device.set_matmul_bf16(false)?;
    let scorer = scorer(model, device)?;
    Ok(perplexity_of_windows(&*scorer, windows, 0, opts.batch, |_| {})?.ppl())
}

/// Runs `phase` with the GEMM mode of `args.dtype`, then goes back to f32.
fn with_dtype<T>(args: &TrainArgs, phase: impl FnOnce() -> Result<T>) -> Result<T> {
    args.device
        .set_matmul_bf16(args.dtype == ComputeDType::Bf16)?;
    let out = phase();
    args.device.set_matmul_bf16(false)?;
    out
}

/// Runs the job; `say` hears progress lines.
pub fn run_train(
    args: &TrainArgs,
    tokenizer: &Tokenizer,
    fp: &LlamaModel,
    mut say: impl FnMut(&str),
) -> Result<TrainSummary> {
    let cfg: LlamaConfig = fp.config().clone();
    check_args(args, &cfg)?;
    check_ranks(args)?;
    let (split, budget) = check_host_memory(args, &cfg)?;
    let mut pause = PauseHook::from_env();
    let mut summary = TrainSummary::default();
    let eval_windows_ids = match &args.eval {
        Some((path, opts)) => {
            let text = crate::eval::data::read_eval_text(path)?;
            Some((
                eval_windows(&eval_ids(tokenizer, &text), opts.ctx, opts.max_windows)?,
                *opts,
            ))
        }
        None => None,
    };

    // Calibration windows.
    let n = args.train_size + args.val_size;
    let mut calib_ids = None;
    let (train, val) = match &args.calib {
        Calibration::File(path) => {
            let text = crate::eval::data::read_eval_text(path)?;
            let ids = calib_ids.insert(tokenizer.encode(&text));
            say(&format!(
                "calibration: {} tokens from {}",
                ids.len(),
                path.display()
            ));
            calibration_windows(ids, args.seqlen, args.train_size, args.val_size, args.seed)?
        }
        Calibration::SelfGenerated => {
            say(&format!(
                "calibration: sampling {n} sequences of {} tokens from the model itself (temperature 1, seed {})",
                args.seqlen, args.seed
            ));
            let start = crate::model::generate::StartTokens::for_tokenizer(tokenizer);
            let mut all = crate::model::generate::sample_sequences(
                fp,
                n,
                args.seqlen,
                1.0,
                args.seed,
                start,
            )?;
            let val = all.split_off(args.train_size);
            (all, val)
        }
    };

    // E2E-QP's data is read before Block-AP so that a bad file fails in seconds, not after hours.
    let e2e_data = match args.phase {
        Phase::All => Some(e2e_examples(
            args,
            tokenizer,
            fp,
            calib_ids.as_deref(),
            &train,
            &mut say,
        )?),
        Phase::BlockAp => None,
    };

    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let mut recipe = json!({
        "calib": format!("{:?}", args.calib), "train_size": args.train_size, "val_size": args.val_size,
        "seqlen": args.seqlen, "epochs": args.epochs, "batch_size": args.batch_size,
        "quant_lr": args.quant_lr, "weight_lr": args.weight_lr, "seed": args.seed,
    });
    // Recorded only when on, so that checkpoints made before the flag existed still resume.
    if args.early_stop > 0 {
        recipe["early_stop"] = json!(args.early_stop);
    }
    if args.dtype == ComputeDType::Bf16 {
        recipe["dtype"] = json!("bf16");
    }
    let run = RunIdentity {
        source: fp.source().path().display().to_string(),
        quant: args.quant,
        recipe,
    };
    let mut ckpt = CheckpointDir::create_or_resume(&args.out, &cfg, &run, args.resume)?;
    save_tokenizer_files(fp.source().path(), tokenizer, &args.out)?;
    let mut log = Log::open(&args.out)?;

    if let Some((w, o)) = &eval_windows_ids {
        let p = ppl(fp, w, o, &args.device)?;
        say(&format!("perplexity FP: {p:.3}"));
        log.write(json!({"event": "eval", "model": "fp", "ppl": p}))?;
        summary.ppl_fp = Some(p);
        let rtn = rtn_model(fp, args.quant)?;
        let p = ppl(&LlamaModel::new(Box::new(rtn))?, w, o, &args.device)?;
        say(&format!(
            "perplexity RTN w{}g{}: {p:.3}",
            args.quant.wbits, args.quant.group_size
        ));
        log.write(json!({"event": "eval", "model": "rtn", "ppl": p}))?;
        summary.ppl_rtn = Some(p);
    }

    // Block-AP.
    let mut block_ap = BlockApOptions::recipe(args.quant);
    block_ap.epochs = args.epochs;
    block_ap.batch_size = args.batch_size;
    block_ap.quant_lr = args.quant_lr;
    block_ap.weight_lr = args.weight_lr;
    block_ap.device = args.device.clone();
    say(&format!(
        "Block-AP on {}, {} GEMMs",
        args.device.name(),
        args.dtype.name()
    ));
    let train_bytes =
        BlockInputStore::bytes_needed(args.train_size, args.seqlen, cfg.hidden, StoreDType::F16)?;
    let (offload, offload_val) = offloads(args, split, train_bytes);
    block_ap.early_stop = args.early_stop;
    let popts = PipelineOptions {
        block_ap,
        offload,
        offload_val,
        store_dtype: StoreDType::F16,
        forward_batch: FORWARD_BATCH,
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let inputs = format!(
        "block inputs: {:.1} MiB for {} samples x {} tokens (FP and quantized streams, f16)",
        mib(split.total),
        n,
        args.seqlen
    );
    // MREM places each module's streams itself (its GPU's memory when they fit, else a `BlockInputStore` with a
    // 1/K share of this split); the line below gives the host split.
    if args.mrem.is_some() {
        say("MREM: each module keeps its block inputs in its GPU's memory when they fit there, else as below");
    }
    let at = match (args.mrem.is_some(), args.stream_block_inputs) {
        (true, _) => StreamsAt::Host,
        (false, true) => host_streams(&popts),
        (false, false) => streams_at(&popts, n, args.seqlen, cfg.hidden)?,
    };
    match at {
        StreamsAt::Device => say(&format!("{inputs}: in GPU memory")),
        StreamsAt::Host | StreamsAt::Pinned => say(&format!(
            "{inputs}: {:.1} MiB in {}RAM, {:.1} MiB in files beside the checkpoint (host budget {}){}",
            mib(split.ram),
            if at == StreamsAt::Pinned { "pinned " } else { "" },
            mib(split.disk),
            match budget {
                u64::MAX => "unknown".to_string(),
                b => human(b),
            },
            if at == StreamsAt::Pinned {
                ", streamed to the GPU"
            } else {
                ""
            }
        )),
    }
    let start = Instant::now();
    let mut block_start = Instant::now();
    let mut log_err = None;
    with_dtype(args, || {
        block_ap_stage(args, fp, (&train, &val), &popts, at, &mut ckpt, |e| {
            let line = match e {
                Event::BlockStart { block, blocks } => {
                    block_start = Instant::now();
                    say(&format!("block {}/{blocks}", block + 1));
                    json!({"event": "block_start", "block": block})
                }
                Event::Step { block, info } => {
                    pause.step(&mut say);
                    let done = info.step + 1;
                    if done % 16 == 0 || done == info.total_steps {
                        let per = block_start.elapsed().as_secs_f64() / done as f64;
                        say(&format!(
                        "  block {} step {done}/{} epoch {} loss {:.4e} ({:.0} s left in this block)",
                        block + 1,
                        info.total_steps,
                        info.epoch + 1,
                        info.loss,
                        per * (info.total_steps - done) as f64
                    ));
                    }
                    json!({"event": "step", "phase": "block-ap", "block": block, "step": info.step, "epoch": info.epoch, "loss": info.loss})
                }
                Event::BlockDone {
                    block,
                    train_loss,
                    val_loss,
                    epochs_run,
                } => {
                    say(&format!(
                        "block {} done: train loss {train_loss:.4e}, val loss {} ({:.1} s){}",
                        block + 1,
                        val_loss.map(|v| format!("{v:.4e}")).unwrap_or("-".into()),
                        block_start.elapsed().as_secs_f64(),
                        if epochs_run < args.epochs {
                            format!("; early stop after {epochs_run} of {} epochs", args.epochs)
                        } else {
                            String::new()
                        }
                    ));
                    json!({"event": "block_done", "block": block, "train_loss": train_loss, "val_loss": val_loss, "epochs": epochs_run})
                }
            };
            if let Err(e) = log.write(line) {
                log_err.get_or_insert(e);
            }
        })
    })?;
    if let Some(e) = log_err {
        return Err(e);
    }
    summary.block_ap_seconds = start.elapsed().as_secs_f64();
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let r = ckpt.load_block(i)?;
        summary.block_losses.push((
            i,
            r.step_losses.last().copied().unwrap_or(f32::NAN),
            r.val_losses.last().copied(),
        ));
        blocks.push(r.block);
    }
    let mut qm = quantized_model(fp, blocks)?;
    ckpt.save_head(&qm)?;
    if let Some((w, o)) = &eval_windows_ids {
        let p = ppl(&LlamaModel::new(Box::new(qm.clone()))?, w, o, &args.device)?;
        say(&format!("perplexity Block-AP: {p:.3}"));
        log.write(json!({"event": "eval", "model": "block-ap", "ppl": p}))?;
        summary.ppl_block_ap = Some(p);
    }
    if args.phase == Phase::BlockAp {
        return Ok(summary);
    }

    // E2E-QP on the job's device (the trained scales come back to the host).
    let data = e2e_data.expect("read for Phase::All");
    let start = Instant::now();
    let (offload, why) = e2e_offload(args, &cfg)?;
    let e2e = E2eOptions {
        device: args.device.clone(),
        offload,
        ..args.e2e.clone()
    };
    if !args.device.is_cpu() {
        say(&format!(
            "E2E-QP: checkpoints, scale gradients and AdamW moments in {} ({why})",
            if offload {
                "pinned host memory"
            } else {
                "GPU memory"
            }
        ));
    }
    if args.e2e_ranks.world_size() > 1 {
        say(&format!(
            "E2E-QP data-parallel over {} ranks, each a slice of every global batch of {}",
            args.e2e_ranks.world_size(),
            e2e.global_batch
        ));
    }
    let e2e_losses = with_dtype(args, || {
        train_e2e_ranks(args, &mut qm, &data, &e2e, |qm, opts, comm| {
            e2e_stage(
                args,
                qm,
                &data,
                (opts, comm),
                (&ckpt, &mut log),
                &mut pause,
                &mut say,
            )
        })
    })?;
    summary.e2e_seconds = start.elapsed().as_secs_f64();
    ckpt.save_e2e_scales(&qm.blocks, &e2e_losses)?;
    if let Some((w, o)) = &eval_windows_ids {
        let p = ppl(&LlamaModel::new(Box::new(qm.clone()))?, w, o, &args.device)?;
        say(&format!("perplexity Block-AP + E2E-QP: {p:.3}"));
        log.write(json!({"event": "eval", "model": "e2e-qp", "ppl": p}))?;
        summary.ppl_e2e = Some(p);
    }
    Ok(summary)
}

/// Block-AP over every block: sequential with its streams `at` that place, or MREM-parallel when `args.mrem`
/// says so.
fn block_ap_stage(
    args: &TrainArgs,
    fp: &LlamaModel,
    (train, val): (&[Vec<u32>], &[Vec<u32>]),
    popts: &PipelineOptions,
    at: StreamsAt,
    ckpt: &mut CheckpointDir,
    on_event: impl FnMut(Event),
) -> Result<()> {
    match &args.mrem {
        Some(m) => run_block_ap_mrem(fp, train, val, popts, m, ckpt, on_event),
        None => run_block_ap_at(fp, train, val, popts, at, ckpt, on_event),
    }
}
