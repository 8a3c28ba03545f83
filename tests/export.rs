//! `engine export` on checkpoints: a random one written through CheckpointDir (Block-AP blocks, head, E2E-QP
//! scales, a tokenizer), and stories260K trained by the job (shared/data; "skipped: ..." without it).
//! - GPTQ v1 and v2: read back by GptqWeights, every linear is exactly the checkpoint's with f16 scales, the
//!   perplexity equals that model's exactly, and an independent numpy unpacker
//!   (tests/fixtures/gptq/read_gptq_dir.py) gets the same weights bit for bit.
//! - fake: the dequantized weights rounded to f16; perplexity within f16 rounding of the checkpoint's.
//! - bad input: not a checkpoint, an unfinished one, an occupied --out, layers GPTQ cannot pack, v1 zeros 0.
mod common;
mod shared_data;
use eqat::eval::{eval_ids, eval_windows, perplexity_of_windows};
use eqat::io::checkpoint::{open_checkpoint, CheckpointDir, RunIdentity};
use eqat::io::export::{as_exported_gptq, export_checkpoint, ExportFormat};
use eqat::model::gptq::GptqWeights;
use eqat::model::hf::HfWeights;
use eqat::model::llama::LlamaConfig;
use eqat::model::quantized::{QuantizedBlock, QuantizedModel};
use eqat::model::{open_model, LlamaModel, WeightSource};
use eqat::quant::fake_quant::QuantConfig;
use eqat::quant::pack::ZeroConvention::{V1, V2};
use eqat::quant::real_quant::QuantizedLinear;
use eqat::train::pipeline::{BlockRecord, BlockSink};
use eqat::{DType, Rng, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eqat-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The random model's shape with an lm_head of its own.
fn config() -> LlamaConfig {
    LlamaConfig {
        tie_embeddings: false,
        ..common::tiny_config()
    }
}

/// Writes a checkpoint of `saved` random blocks (all: plus head and E2E-QP scales = 1.01 x Block-AP's) with
/// zero points in `zero_lo..=qmax` and f32 scales that f16 cannot hold exactly; returns the E2E-QP model.
fn checkpoint(dir: &Path, wbits: u32, group: i64, saved: usize, zero_lo: u32) -> QuantizedModel {
    let cfg = config();
    let quant = QuantConfig::new(wbits, group).unwrap();
    let run = RunIdentity {
        source: "random".into(),
        quant,
        recipe: serde_json::json!({}),
    };
    let mut ck = CheckpointDir::create_or_resume(dir, &cfg, &run, false).unwrap();
    let mut rng = Rng::new(u64::from(wbits) * 100 + saved as u64);
    let qmax = (1u32 << wbits) - 1;
    let mut blocks = Vec::new();
    for i in 0..saved {
        let linears = cfg.linear_shapes().map(|(_, n, k)| {
            let g = quant.group_len(k).unwrap();
            let ints: Vec<u32> = (0..n * k)
                .map(|_| rng.below(qmax as usize + 1) as u32)
                .collect();
            let zeros: Vec<u32> = (0..n * k / g)
                .map(|_| zero_lo + rng.below((qmax + 1 - zero_lo) as usize) as u32)
                .collect();
            let scales = Tensor::from_vec(&[n, k / g], rng.uniform_vec(n * k / g, 0.001, 0.1));
            QuantizedLinear::from_ints(wbits, g, k, n, &ints, &zeros, scales.unwrap()).unwrap()
        });
        let norm = |rng: &mut Rng| Tensor::from_vec(&[cfg.hidden], rng.normal_vec(cfg.hidden, 1.0));
        let block = QuantizedBlock {
            attn_norm: norm(&mut rng).unwrap(),
            ffn_norm: norm(&mut rng).unwrap(),
            linears,
        };
        let record = BlockRecord {
            block: block.clone(),
            step_losses: vec![0.5],
            val_losses: vec![],
            epochs_run: 1,
        };
        ck.save_block(i, &record).unwrap();
        blocks.push(block);
    }
    let (v, c) = (cfg.vocab, cfg.hidden);
    let mut model = QuantizedModel {
        embedding: Tensor::from_vec(&[v, c], rng.normal_vec(v * c, 1.0)).unwrap(),
        final_norm: Tensor::from_vec(&[c], rng.normal_vec(c, 1.0)).unwrap(),
        lm_head: Some(Tensor::from_vec(&[v, c], rng.normal_vec(v * c, 0.3)).unwrap()),
        cfg,
        blocks,
        path: dir.to_path_buf(),
    };
    if saved == model.cfg.n_layers {
        ck.save_head(&model).unwrap();
        for l in model.blocks.iter_mut().flat_map(|b| b.linears.iter_mut()) {
            let s: Vec<f32> = l.scales().to_f32_vec().iter().map(|s| s * 1.01).collect();
            l.set_scales(Tensor::from_vec(l.scales().shape(), s).unwrap())
                .unwrap();
        }
        ck.save_e2e_scales(&model.blocks, &[1.0]).unwrap();
    }
    let tok = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer/tiny_bpe_smollm.tokenizer.json"
    );
    std::fs::copy(tok, dir.join("tokenizer.json")).unwrap();
    model
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

fn f16_bits(t: &Tensor) -> Vec<u32> {
    bits(&t.to_dtype(DType::F16).to_dtype(DType::F32))
}

fn ppl(source: Box<dyn WeightSource>, windows: &[Vec<u32>]) -> f64 {
    let model = LlamaModel::new(source).unwrap();
    perplexity_of_windows(&model, windows, 0, 2, |_| {})
        .unwrap()
        .ppl()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// python3 with numpy, required in CI (.ci/run installs numpy); elsewhere its absence skips the check.
fn python_numpy() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "CI must have python3 with numpy"
    );
    if !ok {
        println!("skipped: the numpy cross-check (python3 with numpy not found)");
    }
    ok
}

#[test]
fn gptq_export_dequantizes_exactly_and_an_independent_unpacker_agrees() {
    let root = tmp("gptq");
    let ck = root.join("ck");
    let want_e2e = checkpoint(&ck, 4, 16, 3, 1);
    let (loaded, _) = open_checkpoint(&ck).unwrap();
    // The checkpoint serves E2E-QP's scales, and the export must too.
    assert_eq!(
        bits(loaded.blocks[1].linears[2].scales()),
        bits(want_e2e.blocks[1].linears[2].scales())
    );
    let want = as_exported_gptq(&loaded).unwrap();
    let mut rng = Rng::new(3);
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..24).map(|_| rng.below(50) as u32).collect())
        .collect();
    let want_ppl = ppl(Box::new(want.clone()), &windows);
    for (conv, name) in [(V1, "gptq"), (V2, "gptq_v2")] {
        let out = root.join(name);
        let s = export_checkpoint(&ck, ExportFormat::Gptq(conv), &out).unwrap();
        assert!(s.e2e_scales && s.tokenizer_files == ["tokenizer.json"]);
        let q = &json(&out.join("config.json"))["quantization_config"];
        assert!(q["quant_method"] == "gptq" && q["checkpoint_format"] == name);
        assert!(q["bits"] == 4 && q["group_size"] == 16 && q["desc_act"] == false);
        assert_eq!(&json(&out.join("quantize_config.json")), q);
        let gw = GptqWeights::open(&out).unwrap();
        for (i, b) in want.blocks.iter().enumerate() {
            for (m, l) in b.linears.iter().enumerate() {
                let got = gw.linear(i, m).unwrap();
                assert_eq!(got.int_weights().unwrap(), l.int_weights().unwrap());
                assert_eq!(got.zeros(), l.zeros());
                assert_eq!(
                    bits(&got.dequantize().unwrap()),
                    bits(&l.dequantize().unwrap())
                );
            }
            let block = gw.block(i).unwrap();
            assert_eq!(bits(&block.attn_norm), bits(&b.attn_norm));
            assert_eq!(bits(&block.ffn_norm), bits(&b.ffn_norm));
        }
        assert_eq!(bits(&gw.embedding().unwrap()), bits(&want.embedding));
        let head = gw.lm_head().unwrap().unwrap();
        assert_eq!(bits(&head), bits(want.lm_head.as_ref().unwrap()));
        // Through open_model, as `engine eval` reads it: the same perplexity, exactly.
        let (model, _tokenizer) = open_model(&out).unwrap();
        let got = perplexity_of_windows(&model, &windows, 0, 2, |_| {})
            .unwrap()
            .ppl();
        assert_eq!(got, want_ppl, "{name}");

        if python_numpy() {
            let py = root.join(format!("{name}-numpy"));
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/gptq/read_gptq_dir.py"
            );
            let run = Command::new("python3")
                .arg(script)
                .arg(&out)
                .arg(&py)
                .output()
                .unwrap();
            assert!(
                run.status.success(),
                "{}",
                String::from_utf8_lossy(&run.stderr)
            );
            for (i, b) in want.blocks.iter().enumerate() {
                for (m, l) in eqat::model::hf::LINEAR_NAMES.iter().zip(&b.linears) {
                    let raw = std::fs::read(py.join(format!("model.layers.{i}.{m}.f32"))).unwrap();
                    let theirs: Vec<u32> = raw
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    assert_eq!(theirs, bits(&l.dequantize().unwrap()), "{name} {i} {m}");
                }
            }
        }
    }
    // Against the f32 checkpoint itself, only the f16 rounding of scales, norms and embeddings differs.
    let ck_ppl = ppl(Box::new(loaded), &windows);
    assert!(
        ((want_ppl - ck_ppl) / ck_ppl).abs() < 1e-3,
        "{want_ppl} vs {ck_ppl}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn fake_export_holds_the_dequantized_weights_in_f16() {
    let root = tmp("fake");
    let ck = root.join("ck");
    checkpoint(&ck, 2, -1, 3, 0);
    let (loaded, _) = open_checkpoint(&ck).unwrap();
    let out = root.join("fake");
    let s = export_checkpoint(&ck, ExportFormat::Fake, &out).unwrap();
    assert_eq!(s.tensors, 2 + 1 + 3 * 9);
    assert!(json(&out.join("config.json"))["quantization_config"].is_null());
    let hf = HfWeights::open(&out).unwrap();
    for (i, b) in loaded.blocks.iter().enumerate() {
        let got = hf.block(i).unwrap();
        for (g, l) in got.linears.iter().zip(&b.linears) {
            assert_eq!(bits(g), f16_bits(&l.dequantize().unwrap()));
        }
        assert_eq!(bits(&got.ffn_norm), f16_bits(&b.ffn_norm));
    }
    let windows = vec![(0..40).map(|i| (i * 7 % 50) as u32).collect::<Vec<u32>>()];
    let (model, _) = open_model(&out).unwrap();
    let got = perplexity_of_windows(&model, &windows, 0, 1, |_| {})
        .unwrap()
        .ppl();
    let want = ppl(Box::new(loaded), &windows);
    assert!(((got - want) / want).abs() < 1e-3, "{got} vs {want}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_input_is_refused_naming_the_path_and_leaves_nothing_behind() {
    let root = tmp("bad");
    let err = |ck: &Path, f: ExportFormat, out: &Path| {
        export_checkpoint(ck, f, out).unwrap_err().to_string()
    };
    let gptq = ExportFormat::Gptq(V2);
    let out = root.join("out");
    std::fs::create_dir_all(root.join("plain")).unwrap();
    let e = err(&root.join("plain"), gptq, &out);
    assert!(
        e.contains("plain") && e.contains("not an eqat checkpoint"),
        "{e}"
    );

    let unfinished = root.join("unfinished");
    checkpoint(&unfinished, 4, 16, 2, 0);
    let e = err(&unfinished, gptq, &out);
    assert!(
        e.contains("unfinished") && e.contains("2 of 3 blocks"),
        "{e}"
    );

    let ck = root.join("ck");
    checkpoint(&ck, 4, 16, 3, 0);
    std::fs::create_dir_all(out.join("x")).unwrap();
    let e = err(&ck, gptq, &out);
    assert!(e.contains("out") && e.contains("not empty"), "{e}");
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::write(&out, b"").unwrap();
    assert!(err(&ck, gptq, &out).contains("is a file"));
    std::fs::remove_file(&out).unwrap();

    // Zero points 0 cannot be stored in v1; 3-bit GPTQ packs 32 values at a time, k_proj has 16 outputs.
    let e = err(&ck, ExportFormat::Gptq(V1), &out);
    assert!(
        e.contains("model.layers.0.") && e.contains("--zero-convention v2"),
        "{e}"
    );
    let three = root.join("three");
    checkpoint(&three, 3, 16, 3, 0);
    let e = err(&three, gptq, &out);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.qzeros") && e.contains("16"),
        "{e}"
    );
    // Failed exports leave neither `out` nor a partial directory.
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // An empty --out is fine.
    std::fs::create_dir_all(&out).unwrap();
    export_checkpoint(&ck, gptq, &out).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn stories260k_checkpoint_exports_evaluate_like_the_checkpoint() {
    use eqat::train::job::{run_train, TrainArgs};
    let (Some(gguf), Some(wiki)) = (
        shared_data::shared_data("tinyllamas/stories260K/stories260K.gguf"),
        shared_data::shared_data("wikitext-2-raw/wiki.test.raw"),
    ) else {
        return;
    };
    let root = tmp("stories");
    let (fp, tok) = open_model(&gguf).unwrap();
    // 8 bits, group 4: the FFN width 172 is a multiple of 4 (GPTQ 8-bit packing) but not of 8 (4-bit).
    let defaults = TrainArgs::new(gguf, root.join("ck"), QuantConfig::new(8, 4).unwrap());
    let args = TrainArgs {
        train_size: 4,
        val_size: 1,
        seqlen: 16,
        epochs: 1,
        e2e: eqat::train::e2e_qp::E2eOptions {
            global_batch: 2,
            ..defaults.e2e.clone()
        },
        e2e_seqlen: 16,
        e2e_train_size: 4,
        seed: 2,
        ..defaults
    };
    run_train(&args, &tok, &fp, |_| {}).unwrap();
    let text = eqat::eval::data::read_eval_text(&wiki).unwrap();
    let windows = eval_windows(&eval_ids(&tok, &text), 128, Some(2)).unwrap();
    let (loaded, _) = open_checkpoint(&args.out).unwrap();
    let exact = ppl(Box::new(as_exported_gptq(&loaded).unwrap()), &windows);
    let ck_ppl = ppl(Box::new(loaded), &windows);
    for format in [ExportFormat::Gptq(V2), ExportFormat::Fake] {
        let out = root.join(format!("{format:?}"));
        export_checkpoint(&args.out, format, &out).unwrap();
        let (model, tokenizer) = open_model(&out).unwrap();
        // The exported tokenizer.json gives the GGUF tokenizer's windows.
        let ids = eval_ids(&tokenizer, &text);
        assert_eq!(eval_windows(&ids, 128, Some(2)).unwrap(), windows);
        let got = perplexity_of_windows(&model, &windows, 0, 2, |_| {})
            .unwrap()
            .ppl();
        println!("{format:?}: ppl {got} (checkpoint {ck_ppl}, f16-rounded checkpoint {exact})");
        match format {
            ExportFormat::Fake => assert!(((got - ck_ppl) / ck_ppl).abs() < 1e-3),
            _ => assert_eq!(got, exact),
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}
