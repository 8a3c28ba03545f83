//! `engine train` flags for MREM-parallel Block-AP (`--parallel modules`), see `eqat::train::mrem`.
use clap::Args;
use eqat::train::device::Device;
use eqat::train::mrem::MremOptions;

#[derive(Args, Debug)]
pub struct ParallelFlags {
    /// Block-AP order: off (one block after another), or modules (K contiguous modules trained at the same
    /// time, MREM-style, one thread each, on the --device or the --gpus).
    #[arg(long, default_value = "off")]
    parallel: String,
    /// K for --parallel modules (default 2).
    #[arg(long)]
    modules: Option<usize>,
    /// T0 of the annealed module input λ·FP + (1−λ)·quantized, λ = max(1 − t/T0, 0) over a module's training
    /// steps (default: all of the module's steps, its blocks × epochs × train-size / batch-size).
    #[arg(long)]
    mrem_anneal_steps: Option<usize>,
    /// GPUs for --parallel modules, one module per entry: 0,1,2,3 trains module m on GPU m (an ordinal may
    /// repeat: 0,0 runs two modules on GPU 0). Sets K; needs the cuda build.
    #[arg(long)]
    gpus: Option<String>,
}

impl ParallelFlags {
    /// The MREM options, or None for the sequential order; errors name the flag.
    pub fn mrem(&self) -> eqat::Result<Option<MremOptions>> {
        let bad = |msg: String| Err(eqat::Error::invalid("engine train", msg));
        match self.parallel.as_str() {
            "off" => {
                if self.modules.is_some() || self.mrem_anneal_steps.is_some() || self.gpus.is_some()
                {
                    return bad(
                        "--modules, --gpus and --mrem-anneal-steps need --parallel modules"
                            .to_string(),
                    );
                }
                Ok(None)
            }
            "modules" => {
                let devices = match &self.gpus {
                    Some(g) => gpu_devices("engine train", g)?,
                    None => Vec::new(),
                };
                let modules = match (self.modules, devices.len()) {
                    (Some(k), 0) => k,
                    (None, 0) => 2,
                    (None, n) => n,
                    (Some(k), n) if k == n => k,
                    (Some(k), n) => {
                        return bad(format!(
                            "--modules {k} with --gpus {} ({n} GPUs): one module per listed GPU; drop --modules",
                            self.gpus.as_deref().unwrap_or_default()
                        ))
                    }
                };
                Ok(Some(MremOptions {
                    modules,
                    anneal_steps: self.mrem_anneal_steps,
                    queue_depth: 4,
                    devices,
                }))
            }
            other => bad(format!("--parallel {other}: expected off or modules")),
        }
    }
}

/// `0,1,3` as one GPU context per entry (an ordinal may repeat); the list is read whole before any GPU is
/// opened, and errors name `command` and the flag.
pub(crate) fn gpu_devices(command: &'static str, list: &str) -> eqat::Result<Vec<Device>> {
    let bad = |msg: String| eqat::Error::invalid(command, format!("--gpus {list}: {msg}"));
    let ordinals = list
        .split(',')
        .map(|g| {
            g.trim().parse::<usize>().map_err(|_| {
                bad(format!(
                    "`{g}` is not a GPU ordinal (expected e.g. 0,1,2,3)"
                ))
            })
        })
        .collect::<eqat::Result<Vec<usize>>>()?;
    ordinals
        .into_iter()
        .map(|n| Device::parse(&format!("cuda:{n}")).map_err(|e| bad(format!("GPU {n}: {e}"))))
        .collect()
}
