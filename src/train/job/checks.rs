//! What `engine train` checks before it starts: the flags (errors name them) and the host memory (plan::host),
//! and where the block inputs go for the memory there is.
use super::{Phase, TrainArgs};
use crate::error::{Error, Result};
use crate::model::llama::LlamaConfig;
use crate::plan::host::{available_memory, check_train, StorePolicy};
use crate::plan::{ComputeDType, PlanInput, StoreSplit};
use crate::quant::pack::SUPPORTED_BITS;
use crate::train::store::Offload;

/// Samples per forward batch when the pipeline propagates the activation streams.
pub const FORWARD_BATCH: usize = 4;

/// The plan's view of the job `args` on `cfg`.
fn plan_input(args: &TrainArgs, cfg: &LlamaConfig) -> PlanInput {
    PlanInput {
        cfg: cfg.clone(),
        quant: args.quant,
        train_size: args.train_size,
        val_size: args.val_size,
        seqlen: args.seqlen,
        batch: args.batch_size,
        epochs: args.epochs,
        dtype: args.dtype,
        e2e_seqlen: args.e2e_seqlen,
    }
}

/// Whether E2E-QP on a GPU keeps its block checkpoints, scale gradients and AdamW moments in pinned host memory:
/// as `--e2e-offload on|off` says, or (auto) only when the plan's whole run, those included (plan::gpu), does not
/// fit in the GPU's free memory with `DEVICE_RESERVE` to spare. Offloading costs time (Llama-2-7B: 716 against
/// 604 ms a step, BENCHMARKS.md), never values: the two give the same bits. Returns the choice and why.
pub fn e2e_offload(args: &TrainArgs, cfg: &LlamaConfig) -> Result<(bool, String)> {
    if let Some(on) = args.e2e_offload {
        return Ok((
            on,
            format!("--e2e-offload {}", if on { "on" } else { "off" }),
        ));
    }
    #[cfg(feature = "cuda")]
    if let crate::train::device::Device::Cuda(ctx) = &args.device {
        let input = plan_input(args, cfg);
        let whole = crate::plan::gpu::e2e_qp(&input)?.total()
            + crate::plan::gpu::e2e_qp_pinned(&input)?.total();
        let (free, _) = ctx.memory_info()?;
        let fits = whole.saturating_add(crate::train::device_store::DEVICE_RESERVE) <= free as u64;
        let why = format!(
            "the whole run needs {} of {} free GPU memory",
            crate::plan::human(whole),
            crate::plan::human(free as u64)
        );
        return Ok((!fits, why));
    }
    let _ = cfg;
    Ok((true, "the CPU ignores it".into()))
}

/// The host-memory check of `args` on `cfg` (plan::host): where the block inputs go, before anything runs.
pub fn check_host_memory(args: &TrainArgs, cfg: &LlamaConfig) -> Result<(StoreSplit, u64)> {
    let input = plan_input(args, cfg);
    let policy = match (args.offload_disk, args.host_mem) {
        (true, _) => StorePolicy::Disk,
        (false, Some(_)) => StorePolicy::Budget,
        (false, None) => StorePolicy::Ram,
    };
    // Without a budget and without /proc/meminfo there is nothing to check against.
    let budget = args.host_mem.or_else(available_memory).unwrap_or(u64::MAX);
    let split = check_train(
        &input,
        FORWARD_BATCH,
        args.phase == Phase::All,
        policy,
        budget,
    )?;
    Ok((split, budget))
}

/// Where the training and validation stores go for a split whose RAM part is `split.ram`: the training store
/// takes RAM first.
pub(super) fn offloads(
    args: &TrainArgs,
    split: StoreSplit,
    train_bytes: u64,
) -> (Offload, Offload) {
    let file = |name: &str| args.out.join(name);
    if split.disk == 0 {
        return (Offload::Ram, Offload::Ram);
    }
    if split.ram == 0 {
        return (
            Offload::Disk(file("block_inputs.train.bin")),
            Offload::Disk(file("block_inputs.val.bin")),
        );
    }
    (
        Offload::Budget {
            ram_bytes: split.ram.min(train_bytes),
            path: file("block_inputs.train.bin"),
        },
        Offload::Budget {
            ram_bytes: split.ram.saturating_sub(train_bytes),
            path: file("block_inputs.val.bin"),
        },
    )
}

/// Refuses settings the run cannot finish with, before anything is read or written; errors name the flag.
pub(super) fn check_args(args: &TrainArgs, cfg: &LlamaConfig) -> Result<()> {
    let bad = |msg: String| Err(Error::invalid("engine train", msg));
    let wbits = args.quant.wbits;
    if !SUPPORTED_BITS.contains(&wbits) {
        return bad(format!(
            "--wbits {wbits}: the checkpoint packs 2, 3, 4 or 8 bits"
        ));
    }
    for (name, _, k) in cfg.linear_shapes() {
        if args.quant.group_len(k).is_err() {
            return bad(format!(
                "--group-size {} does not divide the {k} in_features of {name} in {}; use a divisor of {k} or -1",
                args.quant.group_size,
                args.model.display()
            ));
        }
    }
    if args.batch_size == 0 || args.train_size < args.batch_size {
        return bad(format!(
            "--train-size {} with --batch-size {}: Block-AP needs at least one full batch of training sequences",
            args.train_size, args.batch_size
        ));
    }
    if let Some(m) = &args.mrem {
        crate::train::mrem::module_ranges(cfg.n_layers, m.modules)?;
    }
    if args.dtype == ComputeDType::Bf16 && args.device.is_cpu() {
        return bad(
            "--dtype bf16 runs the GEMMs in bf16 on a GPU: use it with --device cuda (the CPU trains in f32)"
                .into(),
        );
    }
    if args.stream_block_inputs && args.device.is_cpu() {
        return bad(
            "--block-inputs host streams Block-AP's inputs to a GPU: use it with --device cuda (on the CPU they \
             stay in the host store)"
                .into(),
        );
    }
    for (flag, v) in [("seqlen", args.seqlen), ("epochs", args.epochs)] {
        if v == 0 {
            return bad(format!("--{flag} 0: must be at least 1"));
        }
    }
    Ok(())
}
