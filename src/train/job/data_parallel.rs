//! Data-parallel E2E-QP in the `engine train` job: how its ranks are made ([`E2eRanks`]), rank 0's side (inside
//! `run_train`, which alone writes the checkpoint, the log and the output), and the other ranks' side.
//!
//! Every rank other than 0 does the same thing, whether it is a thread of this process or a process a launcher
//! started ([`run_e2e_follower`]): it receives rank 0's training sequences through the communicator
//! (`share_examples`), reads the Block-AP model from rank 0's checkpoint directory (`--out`, which rank 0 has
//! finished writing before E2E-QP starts; several hosts need it on shared storage), takes rank 0's scales
//! (`train_e2e_dist` broadcasts them) and trains its slice of every global batch. So the CPU runs with K
//! threads (CI) go through the code that launched GPU ranks run, the communicator aside.
use super::{Phase, TrainArgs, TrainSummary};
use crate::dist::launch::LaunchEnv;
use crate::dist::{loopback, Communicator, SingleRank};
use crate::error::{Error, Result};
use crate::io::checkpoint::open_checkpoint;
use crate::model::quantized::QuantizedModel;
use crate::train::device::Device;
use crate::train::e2e_qp::{
    scale_shapes, share_examples, share_progress, E2eOptions, E2eRun, Example,
};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long an in-process rank waits for the others at one collective before it reports that one failed: the
/// ranks' slices differ by at most one sequence, so a healthy wait is one sequence's forward and backward.
const THREAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The ranks of data-parallel E2E-QP.
#[derive(Clone, Debug, Default)]
pub enum E2eRanks {
    /// One rank: no communicator.
    #[default]
    Single,
    /// K ranks as threads of this process, rank i on `devices[i]` (rank 0 is the job's own thread). GPUs with
    /// distinct ordinals sum through NCCL (one communicator per GPU, ncclCommInitAll); otherwise (the CPU, or a
    /// GPU listed twice) through the in-process loopback group, GPU buffers staged in host memory.
    Threads(Vec<Device>),
    /// This process is rank `env.rank` of a job a launcher started (torchrun, srun): NCCL on the job's device,
    /// the unique id handed out by the TCP rendezvous on MASTER_ADDR:MASTER_PORT. `timeout` bounds the wait
    /// there; the other ranks wait through rank 0's Block-AP.
    Launched { env: LaunchEnv, timeout: Duration },
}

impl E2eRanks {
    pub fn world_size(&self) -> usize {
        match self {
            E2eRanks::Single => 1,
            E2eRanks::Threads(d) => d.len(),
            E2eRanks::Launched { env, .. } => env.world_size,
        }
    }

    /// Whether this process is a launched rank other than 0: it runs [`run_e2e_follower`], not `run_train`.
    pub fn follows(&self) -> bool {
        matches!(self, E2eRanks::Launched { env, .. } if env.rank > 0)
    }
}

/// The checks that need no model, made before any work starts.
pub(super) fn check_ranks(args: &TrainArgs) -> Result<()> {
    let world = args.e2e_ranks.world_size();
    if world == 1 {
        return Ok(());
    }
    let bad = |msg: String| Err(Error::invalid("engine train", msg));
    if args.phase != Phase::All {
        return bad(format!(
            "{world} E2E-QP ranks with --phase block-ap: the ranks only share E2E-QP (use --phase all)"
        ));
    }
    if args.e2e.global_batch < world {
        return bad(format!(
            "--e2e-batch {} cannot give each of {world} E2E-QP ranks a sequence",
            args.e2e.global_batch
        ));
    }
    Ok(())
}

/// Rank 0's E2E-QP on `model` (trained in place by `rank0`, the job's E2E-QP stage, given its options and
/// communicator): alone, or with the other ranks `args.e2e_ranks` makes.
pub(super) fn train_e2e_ranks(
    args: &TrainArgs,
    model: &mut QuantizedModel,
    data: &[Example],
    opts: &E2eOptions,
    rank0: impl FnOnce(&mut QuantizedModel, &E2eOptions, &dyn Communicator) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let bf16 = args.dtype == crate::plan::ComputeDType::Bf16;
    match &args.e2e_ranks {
        E2eRanks::Single => rank0(model, opts, &SingleRank),
        E2eRanks::Threads(devices) => {
            let mut comms = thread_comms(devices)?.into_iter();
            let mine = comms.next().expect("a group has rank 0");
            let mut followers = comms
                .zip(&devices[1..])
                .map(|(comm, d)| {
                    let out = args.out.clone();
                    let opts = E2eOptions {
                        device: d.clone(),
                        ..opts.clone()
                    };
                    std::thread::Builder::new()
                        .name(format!("e2e-qp rank {}", comm.rank()))
                        .spawn(move || follow(&out, &opts, &*comm, bf16))
                        .map_err(|e| Error::invalid("engine train", format!("a rank thread: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let opts = E2eOptions {
                device: devices[0].clone(),
                ..opts.clone()
            };
            // On an error rank 0 returns at once: the other ranks then fail at their next collective (loopback
            // timeout) or, in NCCL, end with the process. When a rank failed first (rank 0 then waited for it in
            // vain), its error says why.
            opts.device.set_matmul_bf16(bf16)?;
            let losses = lead(model, data, &opts, &*mine, rank0).map_err(|e| {
                followers
                    .iter()
                    .position(|h| h.is_finished())
                    .map(|r| followers.swap_remove(r).join())
                    .and_then(|j| j.ok()?.err())
                    .unwrap_or(e)
            })?;
            opts.device.set_matmul_bf16(false)?;
            for (r, h) in followers.into_iter().enumerate() {
                h.join().map_err(|_| {
                    Error::invalid("engine train", format!("E2E-QP rank {} panicked", r + 1))
                })??;
            }
            Ok(losses)
        }
        E2eRanks::Launched { env, timeout } => {
            let comm = launched_comm(env, &opts.device, *timeout)?;
            lead(model, data, opts, &*comm, rank0)
        }
    }
}

fn lead(
    model: &mut QuantizedModel,
    data: &[Example],
    opts: &E2eOptions,
    comm: &dyn Communicator,
    rank0: impl FnOnce(&mut QuantizedModel, &E2eOptions, &dyn Communicator) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    share_examples(comm, Some(data))?;
    rank0(model, opts, comm)
}

/// A rank other than 0: rank 0's sequences, the Block-AP model from `out`, rank 0's saved progress when it
/// resumes, then its slice of every batch.
fn follow(out: &Path, opts: &E2eOptions, comm: &dyn Communicator, bf16: bool) -> Result<Vec<f32>> {
    let data = share_examples(comm, None)?;
    let (mut model, _) = open_checkpoint(out)?;
    opts.device.set_matmul_bf16(bf16)?;
    let losses = follow_steps(&mut model, &data, opts, comm);
    opts.device.set_matmul_bf16(false)?;
    losses
}

/// A following rank's E2E-QP on `model`: rank 0's progress when it resumes, then every step.
fn follow_steps(
    model: &mut QuantizedModel,
    data: &[Example],
    opts: &E2eOptions,
    comm: &dyn Communicator,
) -> Result<Vec<f32>> {
    let progress = share_progress(comm, None, &scale_shapes(model))?;
    let mut run = E2eRun::new_dist(model, data, opts, progress, comm)?;
    while !run.is_done() {
        run.step(model, comm)?;
    }
    run.finish(model)
}

/// One communicator per rank of an in-process group (module docs of [`E2eRanks::Threads`]).
fn thread_comms(devices: &[Device]) -> Result<Vec<Box<dyn Communicator>>> {
    #[cfg(feature = "cuda")]
    {
        let ctxs: Vec<_> = devices
            .iter()
            .filter_map(|d| match d {
                Device::Cuda(c) => Some(c.clone()),
                Device::Cpu => None,
            })
            .collect();
        let mut ordinals: Vec<usize> = ctxs.iter().map(|c| c.ordinal()).collect();
        ordinals.sort_unstable();
        ordinals.dedup();
        if ctxs.len() == devices.len() && ordinals.len() == ctxs.len() {
            let comms = crate::dist::nccl::NcclComm::group(&ctxs)?;
            return Ok(comms
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Communicator>)
                .collect());
        }
    }
    Ok(loopback::group(devices.len(), THREAD_TIMEOUT)?
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect())
}

/// This launched rank's NCCL communicator on `device`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn launched_comm(
    env: &LaunchEnv,
    device: &Device,
    timeout: Duration,
) -> Result<Box<dyn Communicator>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => Ok(Box::new(crate::dist::nccl::NcclComm::from_launch(
            env, ctx, timeout,
        )?)),
        Device::Cpu => Err(Error::invalid(
            "engine train",
            "--launcher env sums with NCCL: it needs --device cuda (and the cuda build)"
                .to_string(),
        )),
    }
}

/// A launched rank other than 0 (`args.e2e_ranks.follows()`): waits at the rendezvous while rank 0 runs
/// Block-AP, then trains its share of E2E-QP on `args.device`. It writes nothing: rank 0 writes `args.out`.
pub fn run_e2e_follower(args: &TrainArgs, mut say: impl FnMut(&str)) -> Result<TrainSummary> {
    let E2eRanks::Launched { env, timeout } = &args.e2e_ranks else {
        return Err(Error::invalid(
            "engine train",
            "only a launched rank other than 0 follows rank 0".to_string(),
        ));
    };
    check_ranks(args)?;
    let who = format!("rank {} of {}", env.rank, env.world_size);
    let (host, port) = env.master.clone().unwrap_or_default();
    say(&format!(
        "{who} ({:?} launcher) on {}: waiting up to {timeout:?} for rank 0 at {host}:{port}, which runs Block-AP first",
        env.launcher,
        args.device.name()
    ));
    let comm = launched_comm(env, &args.device, *timeout)?;
    say(&format!(
        "{who}: E2E-QP, the model from {}",
        args.out.display()
    ));
    let start = Instant::now();
    let opts = E2eOptions {
        device: args.device.clone(),
        ..args.e2e.clone()
    };
    let bf16 = args.dtype == crate::plan::ComputeDType::Bf16;
    let losses = follow(&args.out, &opts, &*comm, bf16)?;
    let seconds = start.elapsed().as_secs_f64();
    say(&format!(
        "{who}: E2E-QP done, {} steps, final loss {:.4} ({seconds:.1} s)",
        losses.len(),
        losses.last().copied().unwrap_or(f32::NAN)
    ));
    Ok(TrainSummary {
        e2e_seconds: seconds,
        ..TrainSummary::default()
    })
}
