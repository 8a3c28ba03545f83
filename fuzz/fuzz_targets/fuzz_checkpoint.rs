//! Raw bytes as the files of our checkpoint directory, then everything that reads one: open, load every block,
//! load the whole model and run it on a few tokens, and resume (check the stored run, save the next block).
//! Must never panic; memory stays bounded (every tensor is checked against the model's shapes before it is read).
//!
//! The input is the files' contents joined by SEPARATOR, in the order of FILES; a missing part is a missing
//! file. The model is a fixed 2-block Llama small enough that a whole checkpoint is a few KiB.
//!
//! cargo +nightly fuzz run fuzz_checkpoint fuzz/corpus/fuzz_checkpoint fuzz/seeds/fuzz_checkpoint
//! (seeds: python3 fuzz/make_checkpoint_seeds.py)
#![no_main]
use eqat::io::checkpoint::{CheckpointDir, RunIdentity};
use eqat::model::llama::{BlockWeights, LlamaConfig};
use eqat::model::quantized::QuantizedBlock;
use eqat::model::LlamaModel;
use eqat::ops::rope::RopeLayout;
use eqat::quant::fake_quant::{init_minmax, QuantConfig};
use eqat::train::pipeline::{BlockRecord, BlockSink};
use eqat::Rng;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

const SEPARATOR: &[u8] = b"\n#eqat-file#\n";
const FILES: [&str; 5] = [
    "eqat.json",
    "blocks/layer_0000.safetensors",
    "blocks/layer_0001.safetensors",
    "head.safetensors",
    "e2e_scales.safetensors",
];

/// hidden 8, FFN 12, 2 query heads and 1 key-value head of 4, 2 blocks, vocab 16 (make_checkpoint_seeds.py).
fn config() -> LlamaConfig {
    LlamaConfig {
        hidden: 8,
        intermediate: 12,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        n_layers: 2,
        vocab: 16,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_layout: RopeLayout::HalfSplit,
        tie_embeddings: true,
        attn_bias: false,
    }
}

/// The run the seeds were made by: resuming with it passes the run check and saves a block.
fn run() -> RunIdentity {
    RunIdentity {
        source: "fuzz.gguf".into(),
        quant: QuantConfig::new(4, 4).unwrap(),
        recipe: serde_json::json!({"seed": 0}),
    }
}

fn record() -> &'static BlockRecord {
    static RECORD: OnceLock<BlockRecord> = OnceLock::new();
    RECORD.get_or_init(|| {
        let w = BlockWeights::random(&config(), &mut Rng::new(1));
        let (scales, zeros): (Vec<_>, Vec<_>) = w
            .linears
            .iter()
            .map(|l| init_minmax(l, run().quant).unwrap())
            .unzip();
        let block = QuantizedBlock::freeze(
            &w,
            &scales.try_into().unwrap(),
            &zeros.try_into().unwrap(),
            run().quant,
        )
        .unwrap();
        BlockRecord {
            block,
            step_losses: vec![0.5],
            val_losses: vec![],
            epochs_run: 1,
        }
    })
}

/// One scratch directory per process, in memory when /dev/shm exists.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::path::Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        base.join(format!("eqat-fuzz-checkpoint-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("blocks")).unwrap();
    let mut rest = data;
    for name in FILES {
        if rest.is_empty() {
            break;
        }
        let end = rest
            .windows(SEPARATOR.len())
            .position(|w| w == SEPARATOR)
            .unwrap_or(rest.len());
        std::fs::write(dir.join(name), &rest[..end]).unwrap();
        rest = &rest[(end + SEPARATOR.len()).min(rest.len())..];
    }
    let cfg = config();
    if let Ok(ckpt) = CheckpointDir::open(dir, &cfg) {
        for i in 0..cfg.n_layers {
            let _ = ckpt.load_block(i);
        }
        if let Ok(m) = ckpt.load_model() {
            if let Ok(model) = LlamaModel::new(Box::new(m)) {
                let _ = model.logits(&[1, 2, 3]);
            }
        }
    }
    if let Ok(mut ckpt) = CheckpointDir::create_or_resume(dir, &cfg, &run(), true) {
        let i = ckpt.blocks_done();
        if i < cfg.n_layers {
            ckpt.save_block(i, record()).unwrap();
            assert_eq!(ckpt.blocks_done(), i + 1);
            ckpt.load_block(i).unwrap();
        }
    }
});
