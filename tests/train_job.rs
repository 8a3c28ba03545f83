//! The `engine train` job end to end on stories260K: self-sampled and file calibration, both phases, a
//! checkpoint that `eval` reads back to the same perplexity, and a resume that refuses other settings.
mod shared_data;
use eqat::eval::EvalOptions;
use eqat::io::checkpoint::open_checkpoint_model;
use eqat::model::open_model;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::e2e_qp::E2eOptions;
use eqat::train::job::{run_train, Calibration, Phase, TrainArgs};
use shared_data::shared_data;

#[test]
fn train_job_quantizes_stories260k_and_its_checkpoint_evaluates_the_same() {
    let (Some(model), Some(wiki)) = (
        shared_data("tinyllamas/stories260K/stories260K.gguf"),
        shared_data("wikitext-2-raw/wiki.test.raw"),
    ) else {
        return;
    };
    let (fp, tok) = open_model(&model).unwrap();
    let out = std::env::temp_dir().join(format!("eqat-job-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let eval = EvalOptions {
        ctx: 256,
        max_windows: Some(2),
        batch: 2,
    };
    let mut args = TrainArgs {
        model: model.clone(),
        out: out.join("self"),
        quant: QuantConfig::new(4, 4).unwrap(),
        calib: Calibration::SelfGenerated,
        phase: Phase::All,
        train_size: 8,
        val_size: 2,
        seqlen: 32,
        epochs: 1,
        batch_size: 2,
        quant_lr: 1e-4,
        weight_lr: 1e-5,
        e2e: E2eOptions {
            global_batch: 4,
            ..E2eOptions::recipe(4)
        },
        offload_disk: false,
        resume: false,
        seed: 1,
        device: eqat::train::device::Device::Cpu,
        eval: Some((wiki.clone(), eval)),
    };
    let mut lines = Vec::new();
    let s = run_train(&args, &tok, &fp, |l| lines.push(l.to_string())).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sampling 10 sequences of 32 tokens")),
        "{lines:?}"
    );
    let (e2e, bap, rtn) = (
        s.ppl_e2e.unwrap(),
        s.ppl_block_ap.unwrap(),
        s.ppl_rtn.unwrap(),
    );
    assert!(e2e.is_finite() && bap.is_finite() && rtn.is_finite() && s.ppl_fp.unwrap() > 1.0);
    assert_eq!(s.block_losses.len(), 5);
    let log = std::fs::read_to_string(args.out.join("train_log.jsonl")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"phase\":\"block-ap\""))
            .count(),
        5 * 4
    );

    // The checkpoint evaluates to the perplexity the job reported after E2E-QP.
    let (q, _) = open_checkpoint_model(&args.out).unwrap();
    let windows = eqat::eval::eval_windows(
        &eqat::eval::eval_ids(&tok, &eqat::eval::data::read_eval_text(&wiki).unwrap()),
        256,
        Some(2),
    )
    .unwrap();
    let p = eqat::eval::perplexity_of_windows(&q, &windows, 0, 2, |_| {})
        .unwrap()
        .ppl();
    assert!(
        (p - e2e).abs() <= 1e-9 * e2e,
        "checkpoint ppl {p} vs reported {e2e}"
    );

    // Running again into the same directory needs --resume, and --resume with other settings is refused.
    let e = run_train(&args, &tok, &fp, |_| {}).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    args.resume = true;
    args.quant_lr = 2e-4;
    let e = run_train(&args, &tok, &fp, |_| {}).unwrap_err().to_string();
    assert!(e.contains("recipe"), "{e}");

    // File calibration, Block-AP only, block inputs on disk.
    args.out = out.join("file");
    args.resume = false;
    args.calib = Calibration::File(wiki);
    args.phase = Phase::BlockAp;
    args.offload_disk = true;
    let s = run_train(&args, &tok, &fp, |_| {}).unwrap();
    assert!(s.ppl_block_ap.unwrap().is_finite() && s.ppl_e2e.is_none());
    std::fs::remove_dir_all(&out).unwrap();
}
