//! Llama-family weights from a Hugging Face model directory: `config.json` (io::hf: Llama, Mistral, Qwen2),
//! `model.safetensors` or the shards of `model.safetensors.index.json` (F32, F16 or BF16), handed out one
//! block at a time. HF checkpoints already hold q/k rows in rotate-half order, so nothing is permuted.
//!
//! Tensor names (transformers' `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`):
//! `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (ignored when `tie_word_embeddings`),
//! and per block `model.layers.N.{input_layernorm, post_attention_layernorm}.weight`,
//! `model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`, plus
//! `model.layers.N.self_attn.{q,k,v}_proj.bias` for Qwen2.
use crate::error::{Error, Result};
use crate::io::hf::HfConfig;
use crate::io::safetensors::SafetensorsModel;
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::model::source::WeightSource;
use crate::tensor::Tensor;
use std::path::{Path, PathBuf};

/// HF module names of the seven linears, in `LlamaConfig::linear_shapes` order.
pub const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A Hugging Face model directory: its config and checkpoint, tensors read when asked for.
pub struct HfWeights {
    dir: PathBuf,
    hf: HfConfig,
    checkpoint: SafetensorsModel,
}

impl HfWeights {
    /// Reads config.json and the checkpoint index, and checks that every tensor the model needs is present
    /// with the right shape.
    pub fn open(dir: impl AsRef<Path>) -> Result<HfWeights> {
        let dir = dir.as_ref().to_path_buf();
        let hf = HfConfig::open(&dir)?;
        let checkpoint = SafetensorsModel::open(&dir)?;
        let w = HfWeights {
            dir,
            hf,
            checkpoint,
        };
        let cfg = &w.hf.llama;
        let (c, v) = (cfg.hidden, cfg.vocab);
        w.check_shape("model.embed_tokens.weight", &[v, c])?;
        w.check_shape("model.norm.weight", &[c])?;
        if !cfg.tie_embeddings {
            w.check_shape("lm_head.weight", &[v, c])?;
        }
        for i in 0..cfg.n_layers {
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                w.check_shape(&format!("model.layers.{i}.{norm}.weight"), &[c])?;
            }
            for (j, (name, (_, n, k))) in LINEAR_NAMES.iter().zip(cfg.linear_shapes()).enumerate() {
                w.check_shape(&format!("model.layers.{i}.{name}.weight"), &[n, k])?;
                // q, k and v (the first three) carry the biases.
                if cfg.attn_bias && j < 3 {
                    w.check_shape(&format!("model.layers.{i}.{name}.bias"), &[n])?;
                }
            }
        }
        Ok(w)
    }

    pub fn hf_config(&self) -> &HfConfig {
        &self.hf
    }

    fn check_shape(&self, name: &str, want: &[usize]) -> Result<()> {
        if !self.checkpoint.contains(name) {
            let msg = "missing from the checkpoint";
            return Err(Error::format(
                self.checkpoint.source(),
                format!("tensor {name}"),
                msg,
            ));
        }
        let info = self.checkpoint.tensor_info(name)?;
        if info.shape != want {
            let msg = format!("shape {:?}, expected {want:?}", info.shape);
            return Err(Error::format(
                self.checkpoint.source(),
                format!("tensor {name}"),
                msg,
            ));
        }
        Ok(())
    }
}

impl WeightSource for HfWeights {
    fn config(&self) -> &LlamaConfig {
        &self.hf.llama
    }

    fn block(&self, i: usize) -> Result<BlockWeights> {
        if i >= self.hf.llama.n_layers {
            let msg = format!(
                "block {i} of a model with {} blocks",
                self.hf.llama.n_layers
            );
            return Err(Error::invalid("HfWeights::block", msg));
        }
        let get = |name: &str| {
            self.checkpoint
                .tensor_f32(&format!("model.layers.{i}.{name}.weight"))
        };
        let mut linears = Vec::with_capacity(7);
        for name in LINEAR_NAMES {
            linears.push(get(name)?);
        }
        Ok(BlockWeights {
            attn_norm: get("input_layernorm")?,
            ffn_norm: get("post_attention_layernorm")?,
            linears: linears.try_into().expect("seven linears"),
        })
    }

    fn qkv_bias(&self, i: usize) -> Result<Option<[Tensor; 3]>> {
        if !self.hf.llama.attn_bias {
            return Ok(None);
        }
        let get = |p: &str| {
            self.checkpoint
                .tensor_f32(&format!("model.layers.{i}.self_attn.{p}_proj.bias"))
        };
        Ok(Some([get("q")?, get("k")?, get("v")?]))
    }

    fn attention_window(&self) -> Option<usize> {
        self.hf.sliding_window
    }

    fn embedding(&self) -> Result<Tensor> {
        self.checkpoint.tensor_f32("model.embed_tokens.weight")
    }

    fn final_norm(&self) -> Result<Tensor> {
        self.checkpoint.tensor_f32("model.norm.weight")
    }

    fn lm_head(&self) -> Result<Option<Tensor>> {
        match self.hf.llama.tie_embeddings {
            true => Ok(None),
            false => self.checkpoint.tensor_f32("lm_head.weight").map(Some),
        }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}
