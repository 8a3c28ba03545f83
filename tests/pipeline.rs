//! Block-AP over a small random model: every block trains, and a run interrupted after a block resumes to the
//! same bits as an uninterrupted one.
mod common;

use common::{block_bits, pipeline_options, random_model, windows};
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::pipeline::{
    run_block_ap, BlockRecord, BlockSink, BlockSource, Event, PipelineOptions,
};
use eqat::train::store::Offload;
use eqat::{Error, Result};

#[derive(Default)]
struct MemorySink {
    blocks: Vec<BlockRecord>,
    fail_at: Option<usize>,
}

impl BlockSink for MemorySink {
    fn save_block(&mut self, i: usize, block: &BlockRecord) -> Result<()> {
        if self.fail_at == Some(i) {
            return Err(Error::invalid(
                "MemorySink",
                format!("simulated crash before saving block {i}"),
            ));
        }
        assert_eq!(i, self.blocks.len(), "blocks are saved in order");
        self.blocks.push(block.clone());
        Ok(())
    }
    fn load_block(&self, i: usize) -> Result<BlockRecord> {
        Ok(self.blocks[i].clone())
    }
    fn blocks_done(&self) -> usize {
        self.blocks.len()
    }
}

#[test]
fn block_ap_trains_every_block_and_resumes_to_identical_bits() {
    let model = random_model(1);
    let (train, val) = (windows(2, 8), windows(3, 2));
    let mut full = MemorySink::default();
    let mut events = Vec::new();
    run_block_ap(
        &model,
        &train,
        &val,
        &pipeline_options(Offload::Ram),
        &mut full,
        |e| events.push(e),
    )
    .unwrap();
    assert_eq!(full.blocks.len(), 3);
    for (i, b) in full.blocks.iter().enumerate() {
        assert_eq!(
            b.step_losses.len(),
            8,
            "block {i}: 8 samples / batch 2 x 2 epochs"
        );
        assert!(b.step_losses.iter().all(|l| l.is_finite() && *l > 0.0));
        assert_eq!(b.val_losses.len(), 2);
    }
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::BlockDone { .. }))
            .count()
            == 3
    );

    // Crash before block 2 is saved, then resume with what was saved, offloading to disk this time.
    let dir = std::env::temp_dir().join(format!("eqat-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sink = MemorySink {
        fail_at: Some(2),
        ..Default::default()
    };
    let e = run_block_ap(
        &model,
        &train,
        &val,
        &pipeline_options(Offload::Ram),
        &mut sink,
        |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("simulated crash"));
    assert_eq!(sink.blocks.len(), 2);
    sink.fail_at = None;
    let mut trained_again = Vec::new();
    let opts = PipelineOptions {
        offload: Offload::Disk(dir.join("train.bin")),
        offload_val: Offload::Disk(dir.join("val.bin")),
        ..pipeline_options(Offload::Ram)
    };
    run_block_ap(&model, &train, &val, &opts, &mut sink, |e| {
        if let Event::BlockStart { block, .. } = e {
            trained_again.push(block)
        }
    })
    .unwrap();
    assert_eq!(
        trained_again,
        vec![2],
        "only the unsaved block trains again"
    );
    for i in 0..3 {
        assert!(
            block_bits(&sink.blocks[i]) == block_bits(&full.blocks[i]),
            "block {i} differs after resume"
        );
        assert_eq!(sink.blocks[i].step_losses, full.blocks[i].step_losses);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Fails before saving block `fail_at`, like a run killed while training that block.
struct CrashingSink<'a> {
    inner: &'a mut eqat::io::checkpoint::CheckpointDir,
    fail_at: usize,
}

impl BlockSink for CrashingSink<'_> {
    fn save_block(&mut self, i: usize, r: &BlockRecord) -> Result<()> {
        if i == self.fail_at {
            return Err(Error::invalid("test", "killed"));
        }
        self.inner.save_block(i, r)
    }
    fn load_block(&self, i: usize) -> Result<BlockRecord> {
        self.inner.load_block(i)
    }
    fn blocks_done(&self) -> usize {
        self.inner.blocks_done()
    }
}

fn dir_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["", "blocks"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names.into_iter().filter(|p| p.is_file()) {
            out.push((
                p.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn checkpoint_directory_resumes_to_identical_bytes_and_refuses_other_runs() {
    use eqat::io::checkpoint::{CheckpointDir, RunIdentity};
    let model = random_model(5);
    let (train, val) = (windows(6, 4), windows(7, 2));
    let root = std::env::temp_dir().join(format!("eqat-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let opts = pipeline_options(Offload::Ram);
    let run = RunIdentity {
        source: "random:5".into(),
        quant: opts.block_ap.quant,
        recipe: serde_json::json!({"seed": 7, "train": 4}),
    };
    let (a, b) = (root.join("a"), root.join("b"));
    let mut ck = CheckpointDir::create_or_resume(&a, model.config(), &run, false).unwrap();
    run_block_ap(&model, &train, &val, &opts, &mut ck, |_| {}).unwrap();

    let mut ck = CheckpointDir::create_or_resume(&b, model.config(), &run, false).unwrap();
    let e = run_block_ap(
        &model,
        &train,
        &val,
        &opts,
        &mut CrashingSink {
            inner: &mut ck,
            fail_at: 1,
        },
        |_| {},
    );
    assert!(e.unwrap_err().to_string().contains("killed"));
    // A second start without --resume must refuse, and so must a resume with other settings.
    let e = CheckpointDir::create_or_resume(&b, model.config(), &run, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("already holds a checkpoint") && e.contains("--resume"),
        "{e}"
    );
    let other = RunIdentity {
        quant: eqat::quant::fake_quant::QuantConfig::new(3, 8).unwrap(),
        ..run.clone()
    };
    let e = CheckpointDir::create_or_resume(&b, model.config(), &other, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("eqat.json") && e.contains("wbits") && e.contains('2') && e.contains('3'),
        "{e}"
    );

    let mut ck = CheckpointDir::create_or_resume(&b, model.config(), &run, true).unwrap();
    assert_eq!(ck.blocks_done(), 1);
    run_block_ap(&model, &train, &val, &opts, &mut ck, |_| {}).unwrap();
    let (da, db) = (dir_bytes(&a), dir_bytes(&b));
    assert_eq!(
        da.len(),
        5,
        "eqat.json, config.json and three block files: {:?}",
        da.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    assert!(
        da == db,
        "the resumed checkpoint differs from the uninterrupted one"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// Where the block inputs live never changes the result: all in RAM, split by a budget between RAM and a file
/// (the FP stream's first samples in RAM, the rest in the file), and all on disk give byte-identical
/// checkpoints.
#[test]
fn block_input_placement_gives_byte_identical_checkpoints() {
    use eqat::io::checkpoint::{CheckpointDir, RunIdentity};
    let model = random_model(8);
    let (train, val) = (windows(9, 6), windows(10, 2));
    let root = std::env::temp_dir().join(format!("eqat-placement-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let files = root.join("offload");
    std::fs::create_dir_all(&files).unwrap();
    // One sample: 12 tokens × hidden 32 × 2 B (f16); the training store holds 2 streams × 6 samples.
    let sample = 12 * 32 * 2;
    let budget = |ram_bytes: u64, name: &str| Offload::Budget {
        ram_bytes,
        path: files.join(name),
    };
    let placements = [
        ("ram", Offload::Ram, Offload::Ram),
        (
            "split",
            budget(5 * sample + 100, "split.train.bin"),
            budget(sample, "split.val.bin"),
        ),
        (
            "disk",
            Offload::Disk(files.join("train.bin")),
            Offload::Disk(files.join("val.bin")),
        ),
    ];
    let mut results = Vec::new();
    for (name, offload, offload_val) in placements {
        let opts = PipelineOptions {
            offload,
            offload_val,
            ..pipeline_options(Offload::Ram)
        };
        let run = RunIdentity {
            source: "random:8".into(),
            quant: opts.block_ap.quant,
            recipe: serde_json::json!({"train": 6}),
        };
        let dir = root.join(name);
        let mut ck = CheckpointDir::create_or_resume(&dir, model.config(), &run, false).unwrap();
        run_block_ap(&model, &train, &val, &opts, &mut ck, |_| {}).unwrap();
        results.push((name, dir_bytes(&dir)));
    }
    // The split really split: 7 of the 12 training samples and 3 of the 4 validation samples in the files.
    let len = |f: &str| std::fs::metadata(files.join(f)).unwrap().len();
    assert_eq!(
        (len("split.train.bin"), len("split.val.bin")),
        (7 * sample, 3 * sample)
    );
    assert_eq!(results[0].1.len(), 5, "eqat.json, config.json, 3 blocks");
    for (name, bytes) in &results[1..] {
        assert!(
            *bytes == results[0].1,
            "{name}: checkpoint differs from the all-RAM run"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// `engine train`'s host check on the job's own arguments: a budget below Block-AP's working set is refused
/// before anything runs, a budget between that and the whole store splits it, --offload disk puts it all in
/// files.
#[test]
fn train_job_checks_host_memory_before_starting() {
    use eqat::train::job::{check_host_memory, Phase, TrainArgs};
    let model = random_model(1);
    let mut args = TrainArgs {
        phase: Phase::BlockAp,
        seqlen: 128,
        epochs: 1,
        weight_lr: 1e-5,
        e2e_seqlen: 128,
        host_mem: Some(1 << 16),
        ..TrainArgs::new(
            "random".into(),
            std::env::temp_dir().join("eqat-unused"),
            QuantConfig::new(2, 8).unwrap(),
        )
    };
    let e = check_host_memory(&args, model.config())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("engine train") && e.contains("smaller --batch"),
        "{e}"
    );
    // Store: 2 streams × 72 samples × 128 tokens × 32 × 2 B = 1.125 MiB; Block-AP's own need as planned.
    let store = 2 * 72 * 128 * 32 * 2;
    let plan = eqat::plan::PlanInput {
        cfg: model.config().clone(),
        quant: args.quant,
        train_size: 64,
        val_size: 8,
        seqlen: 128,
        batch: 2,
        epochs: 1,
        dtype: eqat::plan::ComputeDType::F32,
        e2e_seqlen: 128,
    };
    let fixed = eqat::plan::host::block_ap_cpu(&plan, eqat::train::job::FORWARD_BATCH)
        .unwrap()
        .total();
    args.host_mem = Some(fixed + store / 3);
    let (split, budget) = check_host_memory(&args, model.config()).unwrap();
    assert_eq!(
        (split.ram, split.disk, budget),
        (store / 3, store - store / 3, fixed + store / 3)
    );
    args.offload_disk = true;
    let (split, _) = check_host_memory(&args, model.config()).unwrap();
    assert_eq!((split.ram, split.disk), (0, store));
}
/// Learning rates 0: the blocks never change, so every epoch after the first fails to beat the best
/// validation loss.
fn frozen_options(epochs: usize, early_stop: usize) -> PipelineOptions {
    let mut o = pipeline_options(Offload::Ram);
    o.block_ap.epochs = epochs;
    o.block_ap.quant_lr = 0.0;
    o.block_ap.weight_lr = 0.0;
    o.block_ap.early_stop = early_stop;
    o
}

#[test]
fn early_stop_ends_blocks_that_stop_improving_and_resumes_to_identical_bytes() {
    use eqat::io::checkpoint::{CheckpointDir, RunIdentity};
    let model = random_model(8);
    let (train, val) = (windows(9, 4), windows(10, 2));
    // (early stop, epochs each block runs of 4): 1 and 2 stop after 2 and 3 epochs; 3 reaches its count only
    // at the last epoch, 0 is off.
    for (early_stop, epochs) in [(1, 2), (2, 3), (3, 4), (0, 4)] {
        let mut sink = MemorySink::default();
        let mut done = Vec::new();
        run_block_ap(
            &model,
            &train,
            &val,
            &frozen_options(4, early_stop),
            &mut sink,
            |e| {
                if let Event::BlockDone { epochs_run, .. } = e {
                    done.push(epochs_run)
                }
            },
        )
        .unwrap();
        assert_eq!(done, vec![epochs; 3], "early stop {early_stop}");
        for b in &sink.blocks {
            assert_eq!(b.epochs_run, epochs);
            assert_eq!(b.step_losses.len(), 2 * epochs, "2 steps per epoch");
            assert_eq!(b.val_losses.len(), epochs);
        }
    }

    // Training whose validation loss improves in epoch 2 goes on to epoch 3 at early stop 1 (whatever epoch 3
    // brings, it is the last).
    let mut improving = pipeline_options(Offload::Ram);
    improving.block_ap.epochs = 3;
    improving.block_ap.early_stop = 1;
    let mut sink = MemorySink::default();
    run_block_ap(&model, &train, &val, &improving, &mut sink, |_| {}).unwrap();
    for b in &sink.blocks {
        assert_eq!(b.epochs_run, 3, "val losses {:?}", b.val_losses);
        assert!(b.val_losses[1] < b.val_losses[0], "{:?}", b.val_losses);
    }

    // Early stop needs validation samples.
    let e = run_block_ap(
        &model,
        &train,
        &[],
        &frozen_options(4, 1),
        &mut MemorySink::default(),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("validation"), "{e}");

    // A run killed after block 0 resumes to the bytes of an uninterrupted one, epochs recorded per block.
    let root = std::env::temp_dir().join(format!("eqat-early-stop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let opts = frozen_options(4, 1);
    let run = RunIdentity {
        source: "random:8".into(),
        quant: opts.block_ap.quant,
        recipe: serde_json::json!({"epochs": 4, "early_stop": 1}),
    };
    let (a, b) = (root.join("a"), root.join("b"));
    let mut ck = CheckpointDir::create_or_resume(&a, model.config(), &run, false).unwrap();
    run_block_ap(&model, &train, &val, &opts, &mut ck, |_| {}).unwrap();
    let mut ck = CheckpointDir::create_or_resume(&b, model.config(), &run, false).unwrap();
    let mut crashing = CrashingSink {
        inner: &mut ck,
        fail_at: 1,
    };
    assert!(run_block_ap(&model, &train, &val, &opts, &mut crashing, |_| {}).is_err());
    let mut ck = CheckpointDir::create_or_resume(&b, model.config(), &run, true).unwrap();
    run_block_ap(&model, &train, &val, &opts, &mut ck, |_| {}).unwrap();
    let (da, db) = (dir_bytes(&a), dir_bytes(&b));
    assert_eq!(da.len(), db.len());
    for ((na, ba), (nb, bb)) in da.iter().zip(&db) {
        assert!(
            na == nb && ba == bb,
            "the resumed checkpoint differs at {na} / {nb}:\n{}\n{}",
            String::from_utf8_lossy(ba),
            String::from_utf8_lossy(bb)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("eqat.json")).unwrap()).unwrap();
    let epochs: Vec<u64> = meta["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["epochs"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![2, 2, 2]);
    assert!((0..3).all(|i| ck.load_block(i).unwrap().epochs_run == 2));
    std::fs::remove_dir_all(&root).unwrap();
}
