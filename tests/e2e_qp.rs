//! E2E-QP on a small random model quantized by Block-AP: only the scales move, the loss falls, and the scale
//! gradient of the whole model agrees with finite differences.
mod common;

use common::{data, rtn_model};
use eqat::model::quantized::QuantizedModel;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::e2e_qp::{train_e2e, E2eOptions};

#[test]
fn e2e_qp_trains_only_scales_and_lowers_the_loss() {
    let quant = QuantConfig::new(2, 8).unwrap();
    let mut model = rtn_model(11, quant);
    let before = model.clone();
    let mut opts = E2eOptions::recipe(2);
    opts.global_batch = 2;
    opts.epochs = 6;
    // 100x the recipe's rate: a few dozen steps on a toy model must move the loss visibly.
    opts.lr = 2e-3;
    let mut norms = Vec::new();
    let losses = train_e2e(&mut model, &data(8, 12, 1), &opts, |s| {
        norms.push(s.grad_norm)
    })
    .unwrap();
    assert_eq!(losses.len(), 24);
    let first: f32 = losses[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = losses[20..].iter().sum::<f32>() / 4.0;
    assert!(last < first - 0.05, "loss did not fall: {losses:?}");
    assert!(norms.iter().all(|n| n.is_finite() && *n > 0.0));
    for (b0, b1) in before.blocks.iter().zip(&model.blocks) {
        for (l0, l1) in b0.linears.iter().zip(&b1.linears) {
            assert_eq!(
                l0.qweight(),
                l1.qweight(),
                "integer weights must stay frozen"
            );
            assert_eq!(l0.zeros(), l1.zeros(), "zero points must stay frozen");
            assert_ne!(
                l0.scales().f32s("t").unwrap(),
                l1.scales().f32s("t").unwrap(),
                "scales must train"
            );
        }
        assert_eq!(
            b0.attn_norm.f32s("t").unwrap(),
            b1.attn_norm.f32s("t").unwrap()
        );
    }
    // The same seed and data replay the same losses.
    let mut again = rtn_model(11, quant);
    assert_eq!(
        train_e2e(&mut again, &data(8, 12, 1), &opts, |_| {}).unwrap(),
        losses
    );
}

#[test]
fn e2e_qp_rejects_too_little_data_and_mismatched_labels() {
    let mut model = rtn_model(3, QuantConfig::new(4, 8).unwrap());
    let opts = E2eOptions {
        global_batch: 4,
        ..E2eOptions::recipe(4)
    };
    let e = train_e2e(&mut model, &data(2, 6, 0), &opts, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 training sequences") && e.contains("global batch of 4"),
        "{e}"
    );
    let mut bad = data(4, 6, 0);
    bad[1].labels.pop();
    let e = train_e2e(&mut model, &bad, &opts, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("example 1") && e.contains("6 ids") && e.contains("5 labels"),
        "{e}"
    );
}

/// Data-parallel E2E-QP: K ranks (threads, loopback communicator) each take a slice of every global batch; the
/// scales end where the single-rank run with the same global batch ends. Not bitwise: the single rank adds the
/// per-sequence gradients one after another into one buffer, the ranks add their own slices and the all-reduce
/// then adds the K partial sums, and f32 addition is not associative (a difference of about 1 ulp of the gradient,
/// which AdamW carries into the scales at about lr * 1e-6 relative per step).
#[test]
fn data_parallel_e2e_matches_the_single_rank_run() {
    use eqat::dist::{loopback, Communicator};
    use eqat::train::e2e_qp::train_e2e_dist;
    // Scales are ~1e-2 and move ~lr = 2e-3 times that per step; 1e-7 absolute is ~1e-5 of a scale, far below
    // one step, far above the reassociation noise.
    const ATOL: f64 = 1e-7;
    const RTOL: f64 = 1e-5;
    let quant = QuantConfig::new(2, 8).unwrap();
    let examples = data(12, 10, 5);
    let mut opts = E2eOptions::recipe(2);
    opts.global_batch = 6;
    opts.epochs = 2;
    opts.lr = 2e-3;
    let mut single = rtn_model(13, quant);
    let single_losses = train_e2e(&mut single, &examples, &opts, |_| {}).unwrap();
    let scales = |m: &QuantizedModel| -> Vec<f32> {
        m.blocks
            .iter()
            .flat_map(|b| b.linears.iter())
            .flat_map(|l| l.scales().f32s("t").unwrap().to_vec())
            .collect()
    };
    let want = scales(&single);
    for world in [2, 3] {
        let comms = loopback::group(world, std::time::Duration::from_secs(120)).unwrap();
        let runs: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    let (examples, opts) = (&examples, &opts);
                    s.spawn(move || {
                        let mut m = rtn_model(13, quant);
                        let l =
                            train_e2e_dist(&mut m, examples, opts, c as &dyn Communicator, |_| {})
                                .unwrap();
                        (scales(&m), l)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (got, losses)) in runs.iter().enumerate() {
            assert_eq!(
                got, &runs[0].0,
                "world {world}: rank {r} drifted from rank 0"
            );
            assert_eq!(losses.len(), single_losses.len());
            for (a, b) in losses.iter().zip(&single_losses) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "world {world} losses {losses:?} vs {single_losses:?}"
                );
            }
        }
        let mut max_diff = 0.0f64;
        for (g, w) in runs[0].0.iter().zip(&want) {
            let d = (*g as f64 - *w as f64).abs();
            max_diff = max_diff.max(d);
            assert!(
                d <= ATOL + RTOL * (*w as f64).abs(),
                "world {world}: scale {g} vs single-rank {w}"
            );
        }
        let moved = want
            .iter()
            .zip(&scales(&rtn_model(13, quant)))
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            moved > want.len() / 2,
            "training must move the scales ({moved} of {} moved)",
            want.len()
        );
        eprintln!("world {world}: max |scale - single-rank scale| = {max_diff:e}");
    }
    let comms = loopback::group(4, std::time::Duration::from_secs(5)).unwrap();
    let mut m = rtn_model(13, quant);
    opts.global_batch = 3;
    let e = train_e2e_dist(&mut m, &examples, &opts, &comms[0], |_| {}).unwrap_err();
    assert!(e.to_string().contains("each of 4 ranks"), "{e}");
}

/// llm.c's determinism check on E2E-QP: train 3 steps, take the progress, continue it on a fresh copy of the
/// model (as a restarted process would) and end with the losses and scales of the uninterrupted run, bit for
/// bit; progress that does not fit the model is refused.
#[test]
fn e2e_run_continued_from_its_progress_ends_as_the_uninterrupted_run() {
    use eqat::dist::SingleRank;
    use eqat::train::e2e_qp::E2eRun;
    let quant = QuantConfig::new(2, 8).unwrap();
    let examples = data(8, 12, 1);
    let opts = E2eOptions {
        global_batch: 2,
        epochs: 2,
        lr: 2e-3,
        ..E2eOptions::recipe(2)
    };
    let mut whole = rtn_model(11, quant);
    let want = train_e2e(&mut whole, &examples, &opts, |_| {}).unwrap();
    assert_eq!(want.len(), 8);

    let first = rtn_model(11, quant);
    let mut run = E2eRun::new(&first, &examples, &opts, None).unwrap();
    for _ in 0..3 {
        run.step(&first, &SingleRank).unwrap();
    }
    let progress = run.progress().unwrap();
    assert_eq!(progress.adamw.steps, 3);

    let mut restarted = rtn_model(11, quant);
    let mut run = E2eRun::new(&restarted, &examples, &opts, Some(progress.clone())).unwrap();
    assert_eq!(run.steps_done(), 3);
    while !run.is_done() {
        run.step(&restarted, &SingleRank).unwrap();
    }
    assert_eq!(run.finish(&mut restarted).unwrap(), want);
    for (b0, b1) in whole.blocks.iter().zip(&restarted.blocks) {
        for (l0, l1) in b0.linears.iter().zip(&b1.linears) {
            assert_eq!(
                l0.scales().f32s("t").unwrap(),
                l1.scales().f32s("t").unwrap()
            );
        }
    }

    let mut short = progress.clone();
    short.scales.pop();
    let e = E2eRun::new(&restarted, &examples, &opts, Some(short))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("holds 20 scales, the model has 21"),
        "{e}"
    );
    let mut ahead = progress;
    ahead.losses = vec![1.0; 9];
    let e = E2eRun::new(&restarted, &examples, &opts, Some(ahead))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("has 9 steps, the run makes 8"),
        "{e}"
    );
}
