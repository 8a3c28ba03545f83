//! MREM-parallel Block-AP: one module is exactly the sequential pipeline; several modules train every block
//! concurrently, use their predecessor's queued outputs, and on stories260K end near the sequential perplexity.
mod common;
mod shared_data;

use common::{block_bits, pipeline_options, random_model, windows, MemorySink, RandomModel};
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::mrem::{run_block_ap_mrem, MremOptions};
use eqat::train::pipeline::{run_block_ap, BlockRecord, Event};
use eqat::train::store::Offload;

fn mrem(modules: usize, anneal_steps: Option<usize>) -> MremOptions {
    MremOptions {
        modules,
        anneal_steps,
        queue_depth: 2,
        devices: Vec::new(),
    }
}

/// Every bit of a block record: packed weights, zeros, scales, norms and the losses.
fn bits(r: &BlockRecord) -> Vec<u32> {
    let mut v = block_bits(r);
    v.extend(
        r.step_losses
            .iter()
            .chain(&r.val_losses)
            .map(|x| x.to_bits()),
    );
    v
}

fn run_mrem(model: &RandomModel, m: &MremOptions) -> (MemorySink, Vec<Event>) {
    let (train, val) = (windows(2, 8), windows(3, 2));
    let mut sink = MemorySink::default();
    let mut events = Vec::new();
    run_block_ap_mrem(
        model,
        &train,
        &val,
        &pipeline_options(Offload::Ram),
        m,
        &mut sink,
        |e| events.push(e),
    )
    .unwrap();
    (sink, events)
}

#[test]
fn one_module_is_exactly_the_sequential_pipeline() {
    let model = random_model(1);
    let mut seq = MemorySink::default();
    run_block_ap(
        &model,
        &windows(2, 8),
        &windows(3, 2),
        &pipeline_options(Offload::Ram),
        &mut seq,
        |_| {},
    )
    .unwrap();
    let (par, _) = run_mrem(&model, &mrem(1, None));
    assert_eq!(par.0.len(), 3);
    for (i, (a, b)) in seq.0.iter().zip(&par.0).enumerate() {
        assert_eq!(bits(a), bits(b), "block {i}");
    }
}

#[test]
fn several_modules_train_every_block_on_their_predecessors_outputs() {
    let model = random_model(1);
    for k in [2, 3] {
        let (sink, events) = run_mrem(&model, &mrem(k, None));
        assert_eq!(sink.0.len(), 3, "K={k}");
        for (i, b) in sink.0.iter().enumerate() {
            assert_eq!(
                b.step_losses.len(),
                8,
                "K={k} block {i}: 8 samples / batch 2 x 2 epochs"
            );
            assert!(
                b.step_losses.iter().all(|l| l.is_finite() && *l > 0.0),
                "K={k} block {i}"
            );
            assert_eq!(b.val_losses.len(), 2);
        }
        let done: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                Event::BlockDone { block, .. } => Some(*block),
                _ => None,
            })
            .collect();
        let mut sorted = done.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2], "K={k}: every block reports once");
    }
    // Module 1 (block 2 of 0..2 | 2..3) sees the queued outputs of module 0 once λ < 1: quantized inputs from
    // the first step (T0 = 0) train it differently from FP inputs throughout (T0 huge), while module 0 is the
    // same either way.
    let (quantized, _) = run_mrem(&model, &mrem(2, Some(0)));
    let (fp_only, _) = run_mrem(&model, &mrem(2, Some(1 << 30)));
    assert_eq!(bits(&quantized.0[0]), bits(&fp_only.0[0]));
    assert_eq!(bits(&quantized.0[1]), bits(&fp_only.0[1]));
    assert_ne!(bits(&quantized.0[2]), bits(&fp_only.0[2]));
}

#[test]
fn bad_module_counts_and_partial_resume_are_refused() {
    let model = random_model(1);
    let (train, val) = (windows(2, 8), windows(3, 2));
    for k in [0, 4] {
        let e = run_block_ap_mrem(
            &model,
            &train,
            &val,
            &pipeline_options(Offload::Ram),
            &mrem(k, None),
            &mut MemorySink::default(),
            |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("--modules {k} with 3 blocks")), "{e}");
    }
    let (mut done, _) = run_mrem(&model, &mrem(2, None));
    done.0.truncate(1);
    let e = run_block_ap_mrem(
        &model,
        &train,
        &val,
        &pipeline_options(Offload::Ram),
        &mrem(2, None),
        &mut done,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("1 of 3 blocks are saved"), "{e}");
}

/// stories260K (5 blocks, hidden 64, FFN 172: g4 is the largest group dividing both) at w3g4: K = 2 modules
/// (blocks 0..3 | 3..5) end within MARGIN (5%) of the sequential run's Block-AP perplexity. Module 1 starts on
/// inputs from a module 0 still in training, so the result is not the sequential one. Measured here: sequential
/// 103.06, 2 modules 103.02 (RTN 119.33, FP 94.03); at w2g4 with 16 samples the two differed by 14% (181 vs 156,
/// RTN 186: a regime where Block-AP barely moves), hence the stronger recipe.
#[test]
fn two_modules_on_stories260k_end_near_the_sequential_perplexity() {
    use eqat::eval::EvalOptions;
    use eqat::model::open_model;
    use eqat::train::job::{run_train, Phase, TrainArgs};
    const MARGIN: f64 = 0.05;
    let (Some(model), Some(wiki)) = (
        shared_data::shared_data("tinyllamas/stories260K/stories260K.gguf"),
        shared_data::shared_data("wikitext-2-raw/wiki.test.raw"),
    ) else {
        return;
    };
    let (fp, tok) = open_model(&model).unwrap();
    let out = std::env::temp_dir().join(format!("eqat-mrem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let args = |name: &str, mrem: Option<MremOptions>| TrainArgs {
        phase: Phase::BlockAp,
        train_size: 32,
        val_size: 2,
        seqlen: 64,
        quant_lr: 1e-3,
        weight_lr: 1e-4,
        e2e_seqlen: 64,
        e2e_train_size: 32,
        seed: 3,
        eval: Some((
            wiki.clone(),
            EvalOptions {
                ctx: 256,
                max_windows: Some(4),
                batch: 4,
            },
        )),
        mrem,
        ..TrainArgs::new(
            model.clone(),
            out.join(name),
            QuantConfig::new(3, 4).unwrap(),
        )
    };
    let seq = run_train(&args("seq", None), &tok, &fp, |_| {}).unwrap();
    let par = run_train(&args("par", Some(mrem(2, None))), &tok, &fp, |_| {}).unwrap();
    let (s, p, rtn) = (
        seq.ppl_block_ap.unwrap(),
        par.ppl_block_ap.unwrap(),
        seq.ppl_rtn.unwrap(),
    );
    println!(
        "stories260K w3g4 Block-AP perplexity: FP {:.3}, RTN {rtn:.3}, sequential {s:.3} ({:.2} s), 2 modules {p:.3} ({:.2} s)",
        seq.ppl_fp.unwrap(),
        seq.block_ap_seconds,
        par.block_ap_seconds
    );
    assert!(p < rtn, "MREM must still beat RTN: {p} vs {rtn}");
    assert!(
        (p - s).abs() <= MARGIN * s,
        "2 modules {p} vs sequential {s}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
