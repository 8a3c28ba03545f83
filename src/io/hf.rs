//! Hugging Face `config.json` of the Llama family, into `LlamaConfig`.
//!
//! Supported: `LlamaForCausalLM` (Llama 2, Llama 3 without rope scaling, SmolLM/SmolLM2 with tied
//! embeddings), `MistralForCausalLM`, `Qwen2ForCausalLM` (biases on q/k/v). Omitted fields take
//! transformers' defaults (`num_key_value_heads` = heads, `head_dim` = hidden / heads,
//! `rms_norm_eps` 1e-6, `rope_theta` 1e4, untied embeddings); the sizes themselves are required.
//! HF checkpoints keep q/k rows in rotate-half order, so the layout is always `HalfSplit`.
use crate::error::{Error, Result};
use crate::model::llama::LlamaConfig;
use crate::ops::rope::RopeLayout;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
    ];

    /// The `architectures` entry in config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// The `model_type` in config.json, used when `architectures` is absent.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// A parsed config.json: the block configuration plus what the forward pass must respect.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub architecture: Architecture,
    pub llama: LlamaConfig,
    /// Sliding-window attention span (Mistral v0.1: 4096). Attention here is full causal, which is
    /// the same thing for sequences of up to this many tokens.
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: Option<usize>,
}

impl HfConfig {
    /// Reads `config.json` from a model directory, or the config file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<HfConfig> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json(file, &text)
    }

    /// Parses config.json text; `name` stands for the file in error messages.
    pub fn from_json(name: impl Into<PathBuf>, text: &str) -> Result<HfConfig> {
        let path = name.into();
        let root: Value =
            serde_json::from_str(text).map_err(|e| Error::format(&path, "json", e.to_string()))?;
        let obj = root
            .as_object()
            .ok_or_else(|| Error::format(&path, "json", "not an object"))?;
        Fields { path: &path, obj }.parse()
    }
}

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn bad(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::format(self.path, field, msg)
    }

    /// The field's value, with JSON null read as absent.
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// A positive integer field; None when absent or null.
    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .filter(|&x| x > 0)
                    .ok_or_else(|| {
                        self.bad(field, format!("expected a positive integer, found {v}"))
                    })
            })
            .transpose()
    }

    fn usize_or(&self, field: &str, default: Option<usize>) -> Result<usize> {
        self.opt_usize(field)?
            .or(default)
            .ok_or_else(|| self.bad(field, "missing"))
    }

    fn positive_f32(&self, v: &Value, field: &str) -> Result<f32> {
        v.as_f64()
            .map(|x| x as f32)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| self.bad(field, format!("expected a positive number, found {v}")))
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(field, format!("expected true or false, found {v}"))),
        }
    }

    fn architecture(&self) -> Result<Architecture> {
        let supported = || {
            let names: Vec<&str> = Architecture::ALL.iter().map(|a| a.hf_name()).collect();
            format!("supported: {}", names.join(", "))
        };
        if let Some(v) = self.get("architectures") {
            let name = v.get(0).and_then(Value::as_str).unwrap_or_default();
            return Architecture::ALL
                .into_iter()
                .find(|a| a.hf_name() == name)
                .ok_or_else(|| {
                    self.bad(
                        "architectures",
                        format!("{v} is not supported; {}", supported()),
                    )
                });
        }
        let v = self.get("model_type").unwrap_or(&Value::Null);
        Architecture::ALL
            .into_iter()
            .find(|a| v.as_str() == Some(a.model_type()))
            .ok_or_else(|| {
                let msg = format!(
                    "no architectures, and model_type {v} is not supported; {}",
                    supported()
                );
                self.bad("model_type", msg)
            })
    }

    /// rope_theta, after refusing any rope scaling. transformers 5 writes `rope_parameters`
    /// {rope_type, rope_theta}; earlier versions `rope_theta` and `rope_scaling`.
    fn rope_base(&self) -> Result<f32> {
        for field in ["rope_scaling", "rope_parameters"] {
            if let Some(v) = self.get(field) {
                let kind = v.get("rope_type").or_else(|| v.get("type"));
                if kind.and_then(Value::as_str) != Some("default") {
                    let kind = kind.unwrap_or(&Value::Null);
                    return Err(self.bad(
                        field,
                        format!("rope type {kind} is not supported yet (only unscaled rope): {v}"),
                    ));
                }
            }
        }
        let nested = self
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"));
        match nested.or_else(|| self.get("rope_theta")) {
            None => Ok(10_000.0),
            Some(v) => self.positive_f32(v, "rope_theta"),
        }
    }

    fn parse(&self) -> Result<HfConfig> {
        let architecture = self.architecture()?;
        let act = self.get("hidden_act").unwrap_or(&Value::Null);
        if !(act.is_null() || act == "silu") {
            return Err(self.bad("hidden_act", format!("{act} is not supported (silu only)")));
        }
        if architecture == Architecture::Llama {
            for field in ["attention_bias", "mlp_bias"] {
                if self.bool_or(field, false)? {
                    return Err(self.bad(field, "biases on Llama linears are not supported"));
                }
            }
        }
        let sliding_window = match architecture {
            // MistralConfig's default when the key is absent; null means no window.
            Architecture::Mistral if !self.obj.contains_key("sliding_window") => Some(4096),
            Architecture::Mistral => self.opt_usize("sliding_window")?,
            Architecture::Qwen2 if self.bool_or("use_sliding_window", false)? => {
                return Err(self.bad(
                    "use_sliding_window",
                    "per-layer sliding-window attention is not supported",
                ))
            }
            _ => None,
        };
        let hidden = self.usize_or("hidden_size", None)?;
        let n_heads = self.usize_or("num_attention_heads", None)?;
        let head_dim = match self.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden % n_heads == 0 => hidden / n_heads,
            None => {
                return Err(self.bad(
                    "head_dim",
                    format!("missing, and hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}"),
                ))
            }
        };
        let rms_eps = match self.get("rms_norm_eps") {
            None => 1e-6,
            Some(v) => self.positive_f32(v, "rms_norm_eps")?,
        };
        let llama = LlamaConfig {
            hidden,
            intermediate: self.usize_or("intermediate_size", None)?,
            n_heads,
            n_kv_heads: self.usize_or("num_key_value_heads", Some(n_heads))?,
            head_dim,
            n_layers: self.usize_or("num_hidden_layers", None)?,
            vocab: self.usize_or("vocab_size", None)?,
            rms_eps,
            rope_base: self.rope_base()?,
            rope_layout: RopeLayout::HalfSplit,
            tie_embeddings: self.bool_or("tie_word_embeddings", false)?,
            attn_bias: architecture == Architecture::Qwen2,
        };
        llama
            .validate()
            .map_err(|e| self.bad("config", e.to_string()))?;
        Ok(HfConfig {
            architecture,
            llama,
            sliding_window,
            max_position_embeddings: self.opt_usize("max_position_embeddings")?,
        })
    }
}
