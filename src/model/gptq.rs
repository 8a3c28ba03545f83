//! Llama weights from a GPTQ Hugging Face directory (shared/formats.md §5), such as `engine export --format
//! gptq` writes: config.json, `model.safetensors` (or shards) and a quantize config. Every linear
//! `model.layers.N.<module>` is `qweight`/`qzeros`/`scales`/`g_idx` and is dequantized exactly,
//! w = scales[g_idx[k], n] · (q − z), in f32 from the f16 scales; everything else is read as in [`HfWeights`].
//!
//! The quantize config is looked up as GPTQModel does: `quantize_config.json`, then `quant_config.json`, then
//! config.json's `quantization_config`. Read: `bits` (alias `w_bit`, `wbits`), `group_size` (alias
//! `q_group_size`; −1 = one group per row), `checkpoint_format` (alias `version`; `gptq` = v1 zeros, the
//! default, or `gptq_v2`). Refused: `desc_act: true` (permuted g_idx), `lm_head: true`, another
//! `quant_method`, other bit widths or formats.
//!
//! [`HfWeights`]: crate::model::hf::HfWeights
use crate::error::{Error, Result};
use crate::io::hf::HfConfig;
use crate::io::safetensors::SafetensorsModel;
use crate::model::hf::LINEAR_NAMES;
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::model::source::WeightSource;
use crate::quant::pack::{check_bits, PackLayout, ZeroConvention};
use crate::quant::real_quant::gptq::{from_gptq_tensors, GptqTensors};
use crate::quant::real_quant::QuantizedLinear;
use crate::tensor::Tensor;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The quantize config of a GPTQ directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqConfig {
    pub bits: u32,
    /// −1: one group per row.
    pub group_size: i64,
    pub zeros: ZeroConvention,
}

impl GptqConfig {
    /// The dict GPTQModel's `QuantizeConfig.to_dict()` writes (formats.md §5.5), asymmetric, no desc_act.
    pub fn to_json(&self) -> Value {
        json!({
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": false,
            "sym": false,
            "lm_head": false,
            "checkpoint_format": match self.zeros {
                ZeroConvention::V1 => "gptq",
                ZeroConvention::V2 => "gptq_v2",
            },
            "pack_dtype": "int32",
            "static_groups": false,
            "true_sequential": true,
            "damp_percent": 0.01,
            "meta": {"quantizer": [concat!("eqat:", env!("CARGO_PKG_VERSION"))]},
        })
    }

    /// The quantize config of `dir` (module docs), or None when it has none (not a GPTQ directory).
    pub fn find(dir: &Path) -> Result<Option<(GptqConfig, PathBuf)>> {
        for name in ["quantize_config.json", "quant_config.json"] {
            let path = dir.join(name);
            if path.is_file() {
                let v = read_json(&path)?;
                return Ok(Some((Self::parse(&path, &v)?, path)));
            }
        }
        let path = dir.join("config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let q = &read_json(&path)?["quantization_config"];
        if q["quant_method"] != "gptq" {
            return Ok(None);
        }
        Ok(Some((Self::parse(&path, q)?, path)))
    }

    fn parse(path: &Path, v: &Value) -> Result<GptqConfig> {
        let bad = |field: &str, msg: String| Error::format(path, field, msg);
        let first = |keys: &[&str]| keys.iter().map(|k| &v[*k]).find(|x| !x.is_null());
        if let Some(m) = v["quant_method"].as_str().filter(|m| *m != "gptq") {
            return Err(bad("quant_method", format!("\"{m}\" is not gptq")));
        }
        let bits = first(&["bits", "w_bit", "wbits"])
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("bits", "missing or not an integer".into()))?;
        let bits = u32::try_from(bits).unwrap_or(u32::MAX);
        check_bits(bits, &path.display().to_string())?;
        let group_size = first(&["group_size", "q_group_size"])
            .and_then(Value::as_i64)
            .filter(|&g| g == -1 || g > 0)
            .ok_or_else(|| {
                bad(
                    "group_size",
                    "missing, or not −1 or a positive integer".into(),
                )
            })?;
        for flag in ["desc_act", "lm_head"] {
            if v[flag] == true {
                return Err(bad(flag, "true is not supported".into()));
            }
        }
        let zeros = match first(&["checkpoint_format", "version"]).map(|f| f.as_str()) {
            None | Some(Some("gptq")) => ZeroConvention::V1,
            Some(Some("gptq_v2")) => ZeroConvention::V2,
            Some(f) => {
                return Err(bad(
                    "checkpoint_format",
                    format!("{f:?} is not supported (gptq or gptq_v2)"),
                ))
            }
        };
        Ok(GptqConfig {
            bits,
            group_size,
            zeros,
        })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, "json", e.to_string()))
}

/// A GPTQ directory: config, quantize config and checkpoint, linears dequantized when asked for.
pub struct GptqWeights {
    dir: PathBuf,
    cfg: LlamaConfig,
    quant: GptqConfig,
    checkpoint: SafetensorsModel,
}

impl GptqWeights {
    /// Reads the configs and checks that every tensor the model needs is present.
    pub fn open(dir: impl AsRef<Path>) -> Result<GptqWeights> {
        let dir = dir.as_ref().to_path_buf();
        let (quant, _) = GptqConfig::find(&dir)?.ok_or_else(|| {
            Error::format(
                &dir,
                "quantize_config.json",
                "no GPTQ quantize config found",
            )
        })?;
        let hf = HfConfig::open(&dir)?;
        if hf.llama.attn_bias {
            let msg = "q/k/v biases (Qwen2) are not supported in GPTQ directories";
            return Err(Error::format(dir.join("config.json"), "architectures", msg));
        }
        let checkpoint = SafetensorsModel::open(&dir)?;
        let cfg = hf.llama;
        let mut names = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".into(),
        ];
        if !cfg.tie_embeddings {
            names.push("lm_head.weight".into());
        }
        for i in 0..cfg.n_layers {
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                names.push(format!("model.layers.{i}.{norm}.weight"));
            }
            for m in LINEAR_NAMES {
                for t in ["qweight", "qzeros", "scales", "g_idx"] {
                    names.push(format!("model.layers.{i}.{m}.{t}"));
                }
            }
        }
        if let Some(name) = names.iter().find(|n| !checkpoint.contains(n)) {
            let field = format!("tensor {name}");
            return Err(Error::format(checkpoint.source(), field, "missing"));
        }
        Ok(GptqWeights {
            dir,
            cfg,
            quant,
            checkpoint,
        })
    }

    pub fn quant(&self) -> GptqConfig {
        self.quant
    }

    /// Linear `module` of block `i` as a [`QuantizedLinear`] (shapes checked against the config).
    pub fn linear(&self, i: usize, module: usize) -> Result<QuantizedLinear> {
        let (_, n, k) = self.cfg.linear_shapes()[module];
        let p = format!("model.layers.{i}.{}", LINEAR_NAMES[module]);
        let ck = &self.checkpoint;
        let shape2 = |name: &str| -> Result<[usize; 2]> {
            let info = ck.tensor_info(name)?;
            <[usize; 2]>::try_from(info.shape.as_slice()).map_err(|_| {
                let msg = format!("shape {:?}, expected 2-D", info.shape);
                Error::format(ck.source(), format!("tensor {name}"), msg)
            })
        };
        let t = GptqTensors {
            qweight: ck.tensor_i32(&format!("{p}.qweight"))?,
            qweight_shape: shape2(&format!("{p}.qweight"))?,
            qzeros: ck.tensor_i32(&format!("{p}.qzeros"))?,
            qzeros_shape: shape2(&format!("{p}.qzeros"))?,
            scales: ck.tensor_f32(&format!("{p}.scales"))?,
            g_idx: ck.tensor_i32(&format!("{p}.g_idx"))?,
        };
        let group = match self.quant.group_size {
            -1 => k,
            g => g as usize,
        };
        let q = from_gptq_tensors(
            &t,
            self.quant.bits,
            group,
            self.quant.zeros,
            PackLayout::Gptq,
            &p,
        )
        .map_err(|e| Error::format(ck.source(), format!("tensor {p}"), e.to_string()))?;
        if (q.out_features(), q.in_features()) != (n, k) {
            let msg = format!(
                "[out {}, in {}], the config says [{n}, {k}]",
                q.out_features(),
                q.in_features()
            );
            return Err(Error::format(ck.source(), format!("tensor {p}"), msg));
        }
        Ok(q)
    }
}

impl WeightSource for GptqWeights {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn block(&self, i: usize) -> Result<BlockWeights> {
        if i >= self.cfg.n_layers {
            let msg = format!("block {i} of a model with {} blocks", self.cfg.n_layers);
            return Err(Error::invalid("GptqWeights::block", msg));
        }
        let mut linears = Vec::with_capacity(7);
        for m in 0..7 {
            linears.push(self.linear(i, m)?.dequantize()?);
        }
        let norm = |n: &str| {
            self.checkpoint
                .tensor_f32(&format!("model.layers.{i}.{n}.weight"))
        };
        Ok(BlockWeights {
            attn_norm: norm("input_layernorm")?,
            ffn_norm: norm("post_attention_layernorm")?,
            linears: linears.try_into().expect("seven linears"),
        })
    }

    fn embedding(&self) -> Result<Tensor> {
        self.checkpoint.tensor_f32("model.embed_tokens.weight")
    }

    fn final_norm(&self) -> Result<Tensor> {
        self.checkpoint.tensor_f32("model.norm.weight")
    }

    fn lm_head(&self) -> Result<Option<Tensor>> {
        match self.cfg.tie_embeddings {
            true => Ok(None),
            false => self.checkpoint.tensor_f32("lm_head.weight").map(Some),
        }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}
