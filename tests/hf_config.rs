//! config.json of the supported architectures into `LlamaConfig`, and the refusals.
//!
//! tests/fixtures/hf/*.json are the public config.json files of meta-llama/Llama-2-7b-hf,
//! meta-llama/Meta-Llama-3-8B, mistralai/Mistral-7B-v0.1, HuggingFaceTB/SmolLM2-135M and
//! Qwen/Qwen2-0.5B on the Hugging Face Hub, copied as published.
use eqat::io::hf::{Architecture, HfConfig};
use eqat::model::llama::LlamaConfig;
use eqat::ops::rope::RopeLayout;
use serde_json::{json, Value};
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf");

fn fixture(name: &str) -> HfConfig {
    HfConfig::open(Path::new(FIXTURES).join(name)).unwrap()
}

/// A Llama config of the given sizes with everything else as the HF fixtures have it.
fn llama(
    hidden: usize,
    intermediate: usize,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    n_layers: usize,
    vocab: usize,
    (rms_eps, rope_base): (f32, f32),
    tie_embeddings: bool,
) -> LlamaConfig {
    LlamaConfig {
        hidden,
        intermediate,
        n_heads,
        n_kv_heads,
        head_dim,
        n_layers,
        vocab,
        rms_eps,
        rope_base,
        rope_layout: RopeLayout::HalfSplit,
        tie_embeddings,
        attn_bias: false,
    }
}

#[test]
fn public_configs_parse() {
    let cases = [
        (
            "llama2_7b.json",
            Architecture::Llama,
            llama(4096, 11008, (32, 32, 128), 32, 32000, (1e-5, 1e4), false),
            None,
            4096,
        ),
        (
            "llama3_8b.json",
            Architecture::Llama,
            llama(4096, 14336, (32, 8, 128), 32, 128256, (1e-5, 5e5), false),
            None,
            8192,
        ),
        (
            "mistral_7b_v0.1.json",
            Architecture::Mistral,
            llama(4096, 14336, (32, 8, 128), 32, 32000, (1e-5, 1e4), false),
            Some(4096),
            32768,
        ),
        (
            "smollm2_135m.json",
            Architecture::Llama,
            LlamaConfig::smollm2_135m(),
            None,
            8192,
        ),
        (
            "qwen2_0.5b.json",
            Architecture::Qwen2,
            LlamaConfig {
                attn_bias: true,
                ..llama(896, 4864, (14, 2, 64), 24, 151936, (1e-6, 1e6), true)
            },
            None,
            131072,
        ),
    ];
    for (file, architecture, llama, sliding_window, max_pos) in cases {
        let want = HfConfig {
            architecture,
            llama,
            sliding_window,
            max_position_embeddings: Some(max_pos),
        };
        assert_eq!(fixture(file), want, "{file}");
    }
}

#[test]
fn open_reads_config_json_from_a_model_directory() {
    let dir = std::env::temp_dir().join(format!("eqat_hf_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = HfConfig::open(&dir).unwrap_err().to_string();
    std::fs::copy(
        Path::new(FIXTURES).join("smollm2_135m.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let got = HfConfig::open(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        missing.contains(&*dir.join("config.json").to_string_lossy()),
        "{missing}"
    );
    assert_eq!(got.unwrap().llama, LlamaConfig::smollm2_135m());
}

/// A small valid Llama config to vary.
fn base() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 100,
    })
}

fn with(changes: Value) -> String {
    let mut v = base();
    for (k, x) in changes.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

fn parse(text: &str) -> eqat::Result<HfConfig> {
    HfConfig::from_json("config.json", text)
}

#[test]
fn omitted_fields_take_the_transformers_defaults() {
    let c = parse(&base().to_string()).unwrap();
    assert_eq!(
        c.llama,
        llama(64, 96, (4, 4, 16), 2, 100, (1e-6, 1e4), false)
    );
    assert_eq!((c.sliding_window, c.max_position_embeddings), (None, None));
    // Without architectures, model_type decides; MistralConfig's window defaults to 4096, null is none.
    let mut v = base();
    v.as_object_mut().unwrap().remove("architectures");
    v["model_type"] = json!("mistral");
    assert_eq!(parse(&v.to_string()).unwrap().sliding_window, Some(4096));
    v["sliding_window"] = Value::Null;
    let c = parse(&v.to_string()).unwrap();
    assert_eq!(
        (c.architecture, c.sliding_window),
        (Architecture::Mistral, None)
    );
}

#[test]
fn explicit_head_dim_and_rope_parameters_are_read() {
    // Mistral-Nemo style: head_dim is not hidden / heads.
    let c = parse(&with(json!({"hidden_size": 80, "head_dim": 32}))).unwrap();
    assert_eq!((c.llama.head_dim, c.llama.hidden), (32, 80));
    // transformers 5 moves rope_theta into rope_parameters.
    let c = parse(&with(
        json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    ));
    assert_eq!(c.unwrap().llama.rope_base, 5e5);
    let c = parse(&with(
        json!({"num_key_value_heads": 2, "tie_word_embeddings": true}),
    ));
    let c = c.unwrap().llama;
    assert_eq!((c.n_kv_heads, c.tie_embeddings), (2, true));
}

#[test]
fn unsupported_configs_are_errors_naming_the_field() {
    let llama31_rope = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"});
    let supported = "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";
    let cases = [
        (
            with(json!({"rope_scaling": llama31_rope})),
            "rope_scaling",
            "\"llama3\" is not supported yet",
        ),
        (
            with(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})),
            "rope_scaling",
            "\"linear\"",
        ),
        (
            with(json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})),
            "rope_parameters",
            "\"yarn\"",
        ),
        (
            with(json!({"architectures": ["GPT2LMHeadModel"]})),
            "architectures",
            supported,
        ),
        (
            with(json!({"architectures": []})),
            "architectures",
            supported,
        ),
        (
            json!({"model_type": "gemma", "hidden_size": 8}).to_string(),
            "model_type",
            supported,
        ),
        (
            json!({"hidden_size": 8}).to_string(),
            "model_type",
            supported,
        ),
        (
            with(json!({"hidden_act": "gelu"})),
            "hidden_act",
            "silu only",
        ),
        (
            with(json!({"attention_bias": true})),
            "attention_bias",
            "not supported",
        ),
        (with(json!({"mlp_bias": true})), "mlp_bias", "not supported"),
        (
            with(json!({"attention_bias": "yes"})),
            "attention_bias",
            "expected true or false",
        ),
        (
            with(json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true})),
            "use_sliding_window",
            "not supported",
        ),
        (with(json!({"hidden_size": null})), "hidden_size", "missing"),
        (
            with(json!({"vocab_size": 0})),
            "vocab_size",
            "positive integer, found 0",
        ),
        (
            with(json!({"num_hidden_layers": -2})),
            "num_hidden_layers",
            "found -2",
        ),
        (
            with(json!({"intermediate_size": 96.5})),
            "intermediate_size",
            "found 96.5",
        ),
        (
            with(json!({"num_attention_heads": "4"})),
            "num_attention_heads",
            "found \"4\"",
        ),
        (
            with(json!({"num_attention_heads": 5})),
            "head_dim",
            "not a multiple of num_attention_heads 5",
        ),
        (
            with(json!({"num_key_value_heads": 3})),
            "config",
            "n_heads 4 must be a positive multiple of n_kv_heads 3",
        ),
        (with(json!({"head_dim": 15})), "config", "head_dim 15"),
        (
            with(json!({"rms_norm_eps": -1e-5})),
            "rms_norm_eps",
            "positive number",
        ),
        (
            with(json!({"rope_theta": "big"})),
            "rope_theta",
            "positive number",
        ),
        (
            with(json!({"max_position_embeddings": 0})),
            "max_position_embeddings",
            "found 0",
        ),
        ("[1]".to_string(), "json", "not an object"),
        ("{\"hidden_size\": ".to_string(), "json", "EOF"),
    ];
    for (text, field, said) in cases {
        let err = parse(&text)
            .err()
            .unwrap_or_else(|| panic!("parsed: {text}"));
        let err = err.to_string();
        assert!(
            err.starts_with(&format!("config.json: {field}: ")),
            "{text}: {err}"
        );
        assert!(err.contains(said), "{text}: {err}");
    }
}
