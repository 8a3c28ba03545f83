//! The job's E2E-QP stage: with `--resume` it continues from the progress saved in the checkpoint directory,
//! then steps the run, logs every step, and saves the progress as `--e2e-checkpoint-every` asks and after the
//! last step, so that a killed run loses at most the steps since the last save.
use super::pause::PauseHook;
use super::{Log, TrainArgs};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::io::checkpoint::CheckpointDir;
use crate::model::quantized::QuantizedModel;
use crate::train::e2e_qp::{
    scale_shapes, share_progress, E2eIdentity, E2eOptions, E2eRun, Example,
};
use serde_json::json;
use std::time::Instant;

/// E2E-QP of `qm` on `data` with `opts`, as rank 0 of `comm` (the other ranks run `E2eRun` on the progress
/// this rank shares); the trained scales end in `qm`. Returns every step's loss, those of an interrupted attempt
/// included.
pub(super) fn e2e_stage(
    args: &TrainArgs,
    qm: &mut QuantizedModel,
    data: &[Example],
    (opts, comm): (&E2eOptions, &dyn Communicator),
    (ckpt, log): (&CheckpointDir, &mut Log),
    pause: &mut PauseHook,
    say: &mut impl FnMut(&str),
) -> Result<Vec<f32>> {
    let identity = E2eIdentity::new(opts, data);
    let progress = match args.resume {
        true => ckpt.load_e2e_progress(&identity)?,
        false => None,
    };
    if let Some(p) = &progress {
        say(&format!(
            "E2E-QP: continuing after step {}/{} saved in {}",
            p.steps_done(),
            identity.total_steps,
            ckpt.e2e_progress_path().display()
        ));
    }
    let progress = match comm.world_size() {
        1 => progress,
        _ => share_progress(comm, progress, &scale_shapes(qm))?,
    };
    let mut run = E2eRun::new_dist(qm, data, opts, progress, comm)?;
    let mut last_save = Instant::now();
    while !run.is_done() {
        let s = run.step(qm, comm)?;
        if (s.step + 1) % 4 == 0 || s.step + 1 == s.total_steps {
            say(&format!(
                "E2E-QP step {}/{} loss {:.4} grad norm {:.3}",
                s.step + 1,
                s.total_steps,
                s.loss,
                s.grad_norm
            ));
        }
        log.write(json!({"event": "step", "phase": "e2e-qp", "step": s.step, "loss": s.loss, "grad_norm": s.grad_norm}))?;
        let every = args.e2e_checkpoint_every;
        if run.is_done() || every.due(run.steps_done(), last_save.elapsed()) {
            let t0 = Instant::now();
            ckpt.save_e2e_progress(&run.progress()?, &identity)?;
            let path = ckpt.e2e_progress_path();
            let bytes = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            say(&format!(
                "E2E-QP progress after step {}/{} saved: {:.1} MiB in {:.2} s",
                run.steps_done(),
                run.total_steps(),
                bytes as f64 / (1 << 20) as f64,
                t0.elapsed().as_secs_f64()
            ));
            last_save = Instant::now();
        }
        pause.step(say);
    }
    run.finish(qm)
}
