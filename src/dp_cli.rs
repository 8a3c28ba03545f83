//! `engine train` flags for data-parallel E2E-QP (`eqat::train::job::E2eRanks`): K ranks each take a slice of
//! every global batch and sum their scale gradients. `--parallel` (parallel_cli.rs) is Block-AP's and combines
//! freely with these.
use clap::Args;
use eqat::dist::launch::{LaunchEnv, Launcher};
use eqat::train::device::Device;
use eqat::train::job::E2eRanks;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct DataParallelFlags {
    /// Data-parallel E2E-QP with K ranks as threads of this process, all on --device (on a GPU they sum
    /// through host memory: for tests; use --e2e-gpus for speed). --e2e-batch must be at least K.
    #[arg(long)]
    e2e_ranks: Option<usize>,
    /// Data-parallel E2E-QP on this host's GPUs, one rank per entry (0,1,2,3; rank 0 on the first), summed with
    /// NCCL; sets K. An ordinal may repeat (the ranks then sum through host memory).
    #[arg(long)]
    e2e_gpus: Option<String>,
    /// none, or env: this process is one rank of a job that torchrun or srun started (RANK, WORLD_SIZE,
    /// LOCAL_RANK or SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR and MASTER_PORT). Rank 0 runs the
    /// whole job and alone writes --out; every rank joins E2E-QP through NCCL, on GPU LOCAL_RANK with
    /// --device cuda, and reads rank 0's Block-AP model from --out (shared storage across hosts).
    #[arg(long, default_value = "none")]
    launcher: String,
    /// With --launcher env: seconds the ranks wait for each other at the rendezvous on MASTER_ADDR (ranks other
    /// than 0 wait there while rank 0 runs Block-AP).
    #[arg(long, default_value_t = 172_800)]
    rendezvous_timeout: u64,
}

fn bad(msg: String) -> eqat::Error {
    eqat::Error::invalid("engine train", msg)
}

impl DataParallelFlags {
    /// The job's device (from `--device`) and its E2E-QP ranks; errors name the flags.
    pub fn resolve(&self, device: &str) -> eqat::Result<(Device, E2eRanks)> {
        let launched = match self.launcher.as_str() {
            "none" => false,
            "env" => true,
            other => return Err(bad(format!("--launcher {other}: expected none or env"))),
        };
        if launched {
            if self.e2e_ranks.is_some() || self.e2e_gpus.is_some() {
                return Err(bad(
                    "--launcher env takes the ranks from the launcher: drop --e2e-ranks and --e2e-gpus"
                        .to_string(),
                ));
            }
            return self.launched(device);
        }
        let job = Device::parse(device)?;
        let devices = match (&self.e2e_gpus, self.e2e_ranks) {
            (None, None) => return Ok((job, E2eRanks::Single)),
            (None, Some(0)) => return Err(bad("--e2e-ranks 0: at least 1".to_string())),
            // Every rank but 0 gets a context of its own: ranks are threads, and a context's cuBLAS handle
            // serves one thread.
            (None, Some(k)) => (0..k)
                .map(|r| match r {
                    0 => Ok(job.clone()),
                    _ => Device::parse(device),
                })
                .collect::<eqat::Result<Vec<_>>>()?,
            (Some(list), k) => {
                let ordinals = gpu_ordinals(list)?;
                if let Some(k) = k.filter(|&k| k != ordinals.len()) {
                    return Err(bad(format!(
                        "--e2e-ranks {k} with --e2e-gpus {list} ({} GPUs): one rank per listed GPU; drop --e2e-ranks",
                        ordinals.len()
                    )));
                }
                open_gpus(list, &ordinals, &job)?
            }
        };
        let ranks = match devices.len() {
            1 => E2eRanks::Single,
            _ => E2eRanks::Threads(devices),
        };
        Ok((job, ranks))
    }

    /// `--launcher env`: the rank from the environment, its GPU from LOCAL_RANK (SLURM_LOCALID) unless
    /// `--device cuda:N` names one.
    fn launched(&self, device: &str) -> eqat::Result<(Device, E2eRanks)> {
        let env = LaunchEnv::from_env()?;
        if env.launcher == Launcher::Single {
            return Err(bad(
                "--launcher env: no launcher variables (RANK and WORLD_SIZE from torchrun, or SLURM_PROCID and SLURM_NTASKS from srun)"
                    .to_string(),
            ));
        }
        let job = match device {
            "cuda" => Device::parse(&format!("cuda:{}", env.local_rank.unwrap_or(0)))?,
            "cpu" => {
                return Err(bad(
                    "--launcher env sums with NCCL: it needs --device cuda (each rank on GPU LOCAL_RANK)"
                        .to_string(),
                ))
            }
            other => Device::parse(other)?,
        };
        let timeout = Duration::from_secs(self.rendezvous_timeout);
        Ok((job, E2eRanks::Launched { env, timeout }))
    }
}

/// `--e2e-gpus 0,1,3` as ordinals; errors name the flag.
fn gpu_ordinals(list: &str) -> eqat::Result<Vec<usize>> {
    list.split(',')
        .map(|g| {
            g.trim().parse::<usize>().map_err(|_| {
                bad(format!(
                    "--e2e-gpus {list}: `{g}` is not a GPU ordinal (expected e.g. 0,1,2,3)"
                ))
            })
        })
        .collect()
}

/// One device per listed ordinal: the job's own context for rank 0 where it is the job's GPU (the other ranks
/// are other threads, each with a context of its own), a new one elsewhere.
fn open_gpus(list: &str, ordinals: &[usize], job: &Device) -> eqat::Result<Vec<Device>> {
    ordinals
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            if r == 0 && job.ordinal() == Some(n) {
                return Ok(job.clone());
            }
            Device::parse(&format!("cuda:{n}"))
                .map_err(|e| bad(format!("--e2e-gpus {list}: GPU {n}: {e}")))
        })
        .collect()
}
