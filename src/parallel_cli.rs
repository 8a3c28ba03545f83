//! `engine train` flags for MREM-parallel Block-AP (`--parallel modules`), see `eqat::train::mrem`.
use clap::Args;
use eqat::train::mrem::MremOptions;

#[derive(Args, Debug)]
pub struct ParallelFlags {
    /// Block-AP order: off (one block after another), or modules (K contiguous modules trained at the same
    /// time, MREM-style, one CPU thread each).
    #[arg(long, default_value = "off")]
    parallel: String,
    /// K for --parallel modules (default 2).
    #[arg(long)]
    modules: Option<usize>,
    /// T0 of the annealed module input λ·FP + (1−λ)·quantized, λ = max(1 − t/T0, 0) over a module's training
    /// steps (default: the steps of one block, epochs × train-size / batch-size).
    #[arg(long)]
    mrem_anneal_steps: Option<usize>,
    /// GPUs for the modules, e.g. 0,1 (needs the cuda build and NCCL: not available yet).
    #[arg(long)]
    gpus: Option<String>,
}

impl ParallelFlags {
    /// The MREM options, or None for the sequential order; errors name the flag.
    pub fn mrem(&self) -> eqat::Result<Option<MremOptions>> {
        let bad = |msg: String| Err(eqat::Error::invalid("engine train", msg));
        if let Some(g) = &self.gpus {
            return bad(format!(
                "--gpus {g}: modules on several GPUs need the cuda build, several GPUs and an NCCL communicator, \
                 which this engine does not have yet; --parallel modules without --gpus runs the modules as CPU threads"
            ));
        }
        match self.parallel.as_str() {
            "off" => {
                if self.modules.is_some() || self.mrem_anneal_steps.is_some() {
                    return bad(
                        "--modules and --mrem-anneal-steps need --parallel modules".to_string()
                    );
                }
                Ok(None)
            }
            "modules" => Ok(Some(MremOptions {
                modules: self.modules.unwrap_or(2),
                anneal_steps: self.mrem_anneal_steps,
                queue_depth: 4,
            })),
            other => bad(format!("--parallel {other}: expected off or modules")),
        }
    }
}
