//! The whole-model forward from Hugging Face directories: tiny Qwen2 and sharded Llama directories against a
//! NumPy forward (tests/fixtures/model/hf_tiny_reference.py), stories260K rewritten as an HF directory against
//! llama2.c's logits, errors on broken directories, and the model as Block-AP's block source.
mod shared_data;
use eqat::model::gguf::GgufWeights;
use eqat::model::hf::HfWeights;
use eqat::model::{open_model, LlamaModel, WeightSource};
use eqat::testing::assert_close;
use eqat::train::pipeline::BlockSource;
use serde_json::Value;
use shared_data::shared_data;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> Value {
    let path = fixture_dir(name);
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

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

/// Both tiny HF directories of tests/fixtures/model/hf_tiny_reference.py against its NumPy forward in f64:
/// Qwen2 with q/k/v biases, tied embeddings and F16/BF16 weights; Llama with an untied lm_head in two shards.
#[test]
fn hf_directories_match_numpy_reference() {
    let want = fixture("hf_tiny.json");
    let ids = u32s(&want["ids"]);
    for (name, arch_bias, tied) in [("qwen2_tiny", true, true), ("llama_sharded", false, false)] {
        let weights = HfWeights::open(fixture_dir(name)).unwrap();
        let cfg = weights.config().clone();
        assert_eq!(
            (cfg.attn_bias, cfg.tie_embeddings),
            (arch_bias, tied),
            "{name}"
        );
        assert_eq!(weights.qkv_bias(1).unwrap().is_some(), arch_bias, "{name}");
        let model = LlamaModel::new(Box::new(weights)).unwrap();
        let got = model.logits(&ids).unwrap();
        let rows: Vec<f64> = want[name]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(f64s)
            .collect();
        // Logits of magnitude ~10 from an f32 forward of 2 blocks against f64.
        assert_close(name, got.f32s("t").unwrap(), &rows, 1e-4, 1e-5);
    }
}

/// stories260K written out as a Hugging Face directory (HF-layout weights from the GGUF, config.json,
/// tokenizer.json) opens through `open_model` and gives llama2.c's logits: HF names, no q/k permutation.
#[test]
fn stories260k_as_hf_directory_matches_reference() {
    let Some(path) = shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let src = GgufWeights::open(&path).unwrap();
    let cfg = src.config().clone();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut put = |name: String, t: eqat::Tensor| {
        let bytes = t
            .f32s("t")
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        tensors.push((name, t.shape().to_vec(), bytes));
    };
    put("model.embed_tokens.weight".into(), src.embedding().unwrap());
    put("model.norm.weight".into(), src.final_norm().unwrap());
    put("lm_head.weight".into(), src.lm_head().unwrap().unwrap());
    let names = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    for i in 0..cfg.n_layers {
        let b = src.block(i).unwrap();
        put(
            format!("model.layers.{i}.input_layernorm.weight"),
            b.attn_norm,
        );
        put(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            b.ffn_norm,
        );
        for (name, w) in names.iter().zip(b.linears) {
            put(format!("model.layers.{i}.{name}.weight"), w);
        }
    }
    let dir = std::env::temp_dir().join(format!("eqat-hf-stories-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let refs: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.as_str(),
                eqat::io::safetensors::Dtype::F32,
                s.as_slice(),
                b.as_slice(),
            )
        })
        .collect();
    eqat::io::safetensors::write_safetensors(
        dir.join("model.safetensors"),
        &refs,
        &Default::default(),
    )
    .unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokenizer_json = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer/tok512_legacy.tokenizer.json");
    std::fs::copy(tokenizer_json, dir.join("tokenizer.json")).unwrap();

    let (model, tok) = open_model(&dir).unwrap();
    assert!(tok.add_bos());
    let want = fixture("stories260k_logits.json");
    let ids = u32s(&want["ids"]);
    let got = model.logits(&ids).unwrap();
    let got = got.f32s("t").unwrap();
    for (p, row) in want["positions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(want["logits"].as_array().unwrap())
    {
        let p = p.as_u64().unwrap() as usize;
        assert_close(
            &format!("position {p}"),
            &got[p * 512..][..512],
            &f64s(row),
            1e-4,
            1e-5,
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Broken or unsupported HF directories: errors name the file and the tensor or field.
#[test]
fn hf_directory_errors_name_the_tensor() {
    let dir = std::env::temp_dir().join(format!("eqat-hf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_dir("llama_sharded");
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        HfWeights::open(&dir).err().map(|e| e.to_string())
    };
    // One more block than the checkpoint holds.
    let e = with(&|c| c["num_hidden_layers"] = 3.into()).unwrap();
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("tensor model.layers.2.input_layernorm.weight: missing"),
        "{e}"
    );
    // A wider FFN than the weights.
    let e = with(&|c| c["intermediate_size"] = 32.into()).unwrap();
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight: shape [24, 16], expected [32, 16]"),
        "{e}"
    );
    let e = with(&|c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])).unwrap();
    assert!(e.contains("supported: LlamaForCausalLM"), "{e}");
    // Mistral's sliding window: sequences longer than it are refused, shorter ones run.
    assert!(with(&|c| {
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        c["sliding_window"] = 8.into();
    })
    .is_none());
    let model = LlamaModel::new(Box::new(HfWeights::open(&dir).unwrap())).unwrap();
    assert!(model.logits(&[1; 8]).is_ok());
    let e = model.logits(&[1; 9]).unwrap_err().to_string();
    assert!(e.contains("sliding attention window of 8"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Block-AP reads blocks and embeddings through `BlockSource`; blocks with biases are refused, not dropped.
#[test]
fn model_serves_block_ap() {
    let llama = LlamaModel::new(Box::new(
        HfWeights::open(fixture_dir("llama_sharded")).unwrap(),
    ))
    .unwrap();
    let ids = [1, 7, 3, 30, 12, 12];
    let x = llama.embed(&ids, 2, 3).unwrap();
    assert_eq!(x.shape(), &[2, 3, 16]);
    let table = llama.source().embedding().unwrap();
    assert_eq!(
        &x.f32s("t").unwrap()[16 * 3..16 * 4],
        &table.f32s("t").unwrap()[16 * 30..16 * 31]
    );
    assert!(llama.embed(&ids, 2, 2).is_err());
    assert!(llama.embed(&[1, 40], 1, 2).is_err());
    let b = BlockSource::block(&llama, 1).unwrap();
    assert_eq!(b.linears[6].shape(), &[16, 24]);

    let qwen = LlamaModel::new(Box::new(
        HfWeights::open(fixture_dir("qwen2_tiny")).unwrap(),
    ))
    .unwrap();
    let e = BlockSource::block(&qwen, 0).unwrap_err().to_string();
    assert!(
        e.contains("qwen2_tiny") && e.contains("q/k/v biases"),
        "{e}"
    );
}
