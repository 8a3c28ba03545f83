//! The `engine train` job end to end on stories260K: self-sampled and file calibration, both phases, a
//! checkpoint that `eval` reads back to the same perplexity, and a resume that refuses other settings; E2E-QP on
//! Alpaca instruction records with Block-AP's early stop.
mod shared_data;
use eqat::eval::EvalOptions;
use eqat::io::checkpoint::open_checkpoint_model;
use eqat::model::open_model;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::e2e_data::{read_e2e_file, E2eData, E2eRecords};
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
    let defaults = TrainArgs::new(
        model.clone(),
        out.join("self"),
        QuantConfig::new(4, 4).unwrap(),
    );
    let mut args = TrainArgs {
        train_size: 8,
        val_size: 2,
        seqlen: 32,
        epochs: 1,
        e2e: E2eOptions {
            global_batch: 4,
            ..defaults.e2e.clone()
        },
        e2e_seqlen: 32,
        e2e_train_size: 8,
        seed: 1,
        eval: Some((wiki.clone(), eval)),
        ..defaults
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

#[test]
fn train_job_runs_e2e_on_alpaca_records_and_stops_blocks_early() {
    let Some(model) = shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let (fp, tok) = open_model(&model).unwrap();
    let out = std::env::temp_dir().join(format!("eqat-job-instruct-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let fixture = std::path::PathBuf::from("tests/fixtures/instruct/alpaca.json");
    // Cut 4 tokens past the second-longest prompt: five records keep part of their response, the story's is cut.
    let mut prompts: Vec<usize> = match read_e2e_file(&fixture).unwrap() {
        E2eRecords::Instructions(r) => r.iter().map(|r| r.tokenize(&tok).1).collect(),
        other => panic!("{other:?}"),
    };
    prompts.sort();
    let e2e_seqlen = prompts[4] + 4;
    let defaults = TrainArgs::new(
        model.clone(),
        out.join("run"),
        QuantConfig::new(4, 4).unwrap(),
    );
    let mut args = TrainArgs {
        train_size: 4,
        val_size: 2,
        seqlen: 16,
        epochs: 3,
        // Block-AP learning rates 0: no block changes, so early stop 1 ends each after 2 of its 3 epochs.
        quant_lr: 0.0,
        weight_lr: 0.0,
        early_stop: 1,
        e2e: E2eOptions {
            global_batch: 2,
            ..defaults.e2e.clone()
        },
        e2e_data: E2eData::File(fixture.clone()),
        e2e_seqlen,
        e2e_train_size: 4,
        seed: 2,
        ..defaults
    };
    let mut lines = Vec::new();
    run_train(&args, &tok, &fp, |l| lines.push(l.to_string())).unwrap();
    let data_line = lines
        .iter()
        .find(|l| l.starts_with("E2E-QP data:"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        data_line.contains("4 of 6 Alpaca instruction records")
            && data_line.contains("alpaca.json")
            && data_line.contains(&format!("cut to --e2e-seqlen {e2e_seqlen}")),
        "{data_line}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("early stop after 2 of 3 epochs"))
            .count(),
        5,
        "{lines:?}"
    );
    let log = std::fs::read_to_string(args.out.join("train_log.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let done: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "block_done")
        .collect();
    assert_eq!(done.len(), 5);
    assert!(done.iter().all(|e| e["epochs"] == 2), "{done:?}");
    let block_steps = events.iter().filter(|e| e["phase"] == "block-ap").count();
    assert_eq!(block_steps, 5 * 2 * 2, "5 blocks x 2 epochs x 2 steps");
    let e2e: Vec<f64> = events
        .iter()
        .filter(|e| e["phase"] == "e2e-qp")
        .map(|e| e["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(e2e.len(), 2, "4 records at global batch 2");
    assert!(e2e.iter().all(|l| l.is_finite() && *l > 0.0), "{e2e:?}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(args.out.join("eqat.json")).unwrap()).unwrap();
    assert!(meta["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["epochs"] == 2));
    assert_eq!(meta["recipe"]["early_stop"], 1);
    assert_eq!(meta["e2e"]["steps"], 2);

    // A file of neither text nor instruction records fails before Block-AP starts, naming file and line.
    let bad = out.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"a\"}\n{\"question\": \"b\"}\n").unwrap();
    args.out = out.join("bad");
    args.e2e_data = E2eData::File(bad);
    let e = run_train(&args, &tok, &fp, |_| {}).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    assert!(!args.out.join("eqat.json").exists());
    std::fs::remove_dir_all(&out).unwrap();
}
