//! `engine export`: a finished checkpoint (src/io/checkpoint.rs) as a Hugging Face model directory that other
//! runtimes load, with the tokenizer, HF tensor names and HF-layout q/k (our models hold HF layout throughout:
//! GGUF sources are un-permuted when read, see src/model/gguf.rs), and E2E-QP's scales when the checkpoint has
//! them.
//!
//! ```text
//! gptq  config.json (+ quantization_config), quantize_config.json, model.safetensors:
//!         model.layers.N.<module>.{qweight I32 [in·b/32, out], qzeros I32 [groups, out·b/32], scales F16
//!         [groups, out], g_idx I32 [in]} in the GPTQ layout (formats.md §5), zeros v1 (stored z − 1, what
//!         AutoGPTQ / transformers / vLLM read) or v2 (`checkpoint_format: gptq_v2`, GPTQModel);
//!         norms, embedding and untied lm_head F16
//! fake  config.json, model.safetensors: every weight F16, the linears dequantized
//! both  the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json as present)
//! ```
//! F16 is what the format holds, so the GPTQ directory is the checkpoint with its scales, norms and
//! embeddings rounded to f16 ([`as_exported_gptq`]); its integer weights and zeros are the checkpoint's, and
//! it dequantizes to exactly the weights of that rounded model. The fake directory's linears are the
//! checkpoint's dequantized weights rounded to f16.
//!
//! The directory is built beside `out` under a temporary name and renamed to `out` when complete, so a failed
//! export leaves nothing behind; `out` must not exist or be an empty directory.
use crate::error::{Error, Result};
use crate::io::checkpoint::{hf_config, open_checkpoint, write_atomic};
use crate::io::safetensors::{write_safetensors, Dtype};
use crate::io::tokenizer::{copy_tokenizer_files, save_tokenizer_files, Tokenizer};
use crate::model::gptq::GptqConfig;
use crate::model::hf::LINEAR_NAMES;
use crate::model::quantized::QuantizedModel;
use crate::quant::fake_quant::QuantConfig;
use crate::quant::pack::{PackLayout, ZeroConvention};
use crate::quant::real_quant::gptq::to_gptq_tensors;
use crate::tensor::{DType, Tensor};
use half::f16;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// GPTQ tensors with the given zero-point convention.
    Gptq(ZeroConvention),
    /// Dequantized f16 weights.
    Fake,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub tensors: usize,
    /// Size of model.safetensors.
    pub bytes: u64,
    /// Whether the scales came from E2E-QP (e2e_scales.safetensors) rather than Block-AP.
    pub e2e_scales: bool,
    pub tokenizer_files: Vec<&'static str>,
}

/// An owned tensor to write: name, dtype, shape, bytes.
type Owned = (String, Dtype, Vec<usize>, Vec<u8>);

fn f16_tensor(name: String, t: &Tensor) -> Owned {
    // Round to nearest even, as Tensor::to_dtype(F16) does.
    let half: Vec<f16> = t.to_f32_vec().into_iter().map(f16::from_f32).collect();
    (
        name,
        Dtype::F16,
        t.shape().to_vec(),
        bytemuck::cast_slice(&half).to_vec(),
    )
}

fn i32_tensor(name: String, shape: &[usize], v: &[i32]) -> Owned {
    (
        name,
        Dtype::I32,
        shape.to_vec(),
        bytemuck::cast_slice(v).to_vec(),
    )
}

/// Exports the checkpoint in `checkpoint` to the new directory `out` (module docs).
pub fn export_checkpoint(
    checkpoint: &Path,
    format: ExportFormat,
    out: &Path,
) -> Result<ExportSummary> {
    check_out(out)?;
    let (model, meta) = open_checkpoint(checkpoint)?;
    let field = |k: &str| {
        meta[k]
            .as_i64()
            .ok_or_else(|| Error::format(checkpoint.join("eqat.json"), k, "missing"))
    };
    let quant = QuantConfig::new(field("wbits")? as u32, field("group_size")?)?;
    let tensors = match format {
        ExportFormat::Gptq(zeros) => gptq_tensors(&model, zeros)?,
        ExportFormat::Fake => fake_tensors(&model)?,
    };
    let tokenizer = checkpoint_tokenizer_source(checkpoint, &meta)?;

    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    let staging = out.with_file_name(format!(
        ".{}.partial-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let written = (|| -> Result<ExportSummary> {
        let refs: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
            .collect();
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "pt".to_string());
        let st = staging.join("model.safetensors");
        write_safetensors(&st, &refs, &md)?;
        let mut config = hf_config(&model.cfg, quant);
        let cfg = config.as_object_mut().expect("hf_config is an object");
        cfg.remove("quantization_config");
        // The f32 values in their shortest decimal form (1e-5, not 9.999999747378752e-6); f32 reads them back.
        let short = |x: f32| Value::from(x.to_string().parse::<f64>().expect("a float's own text"));
        cfg.insert("rms_norm_eps".into(), short(model.cfg.rms_eps));
        cfg.insert("rope_theta".into(), short(model.cfg.rope_base));
        cfg.insert("torch_dtype".into(), "float16".into());
        cfg.insert("attention_bias".into(), false.into());
        cfg.insert("mlp_bias".into(), false.into());
        if let ExportFormat::Gptq(zeros) = format {
            let q = GptqConfig {
                bits: quant.wbits,
                group_size: quant.group_size,
                zeros,
            }
            .to_json();
            cfg.insert("quantization_config".into(), q.clone());
            write_json(&staging.join("quantize_config.json"), &q)?;
        }
        let tokenizer_files = match &tokenizer {
            TokenizerSource::Dir(dir) => copy_tokenizer_files(dir, &staging)?,
            TokenizerSource::Gguf(path, tok) => save_tokenizer_files(path, tok, &staging)?,
        };
        let tok = Tokenizer::from_tokenizer_json(staging.join("tokenizer.json"))?;
        for (key, id) in [
            ("bos_token_id", tok.bos_id()),
            ("eos_token_id", tok.eos_id()),
        ] {
            cfg.insert(key.into(), id.into());
        }
        write_json(&staging.join("config.json"), &config)?;
        let bytes = std::fs::metadata(&st).map_err(|e| Error::io(&st, e))?.len();
        // rename(2) replaces an empty directory, so an empty `out` is taken over too.
        std::fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
        Ok(ExportSummary {
            out: out.to_path_buf(),
            tensors: tensors.len(),
            bytes,
            e2e_scales: checkpoint.join("e2e_scales.safetensors").is_file(),
            tokenizer_files,
        })
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(v)?)
}

/// Refuses an `out` that is a file or a non-empty directory.
fn check_out(out: &Path) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::invalid(
            "export",
            format!("--out {} {what}; choose a new directory", out.display()),
        ))
    };
    if out.is_file() {
        return refuse("is a file");
    }
    if out.is_dir() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return refuse("exists and is not empty");
        }
    }
    Ok(())
}

enum TokenizerSource {
    /// A directory holding tokenizer.json: the checkpoint, or an HF source model.
    Dir(PathBuf),
    /// A GGUF source model and the tokenizer read from it (checkpoints written before they stored one).
    Gguf(PathBuf, Box<Tokenizer>),
}

fn checkpoint_tokenizer_source(checkpoint: &Path, meta: &Value) -> Result<TokenizerSource> {
    if checkpoint.join("tokenizer.json").is_file() {
        return Ok(TokenizerSource::Dir(checkpoint.to_path_buf()));
    }
    let source = meta["source"].as_str().map(PathBuf::from);
    match source {
        Some(s) if s.is_dir() => Ok(TokenizerSource::Dir(s)),
        Some(s) if s.is_file() => {
            let file = crate::io::gguf::GgufFile::open(&s)?;
            let tok = Tokenizer::from_gguf(&file)?;
            Ok(TokenizerSource::Gguf(s, Box::new(tok)))
        }
        _ => Err(Error::format(
            checkpoint.join("tokenizer.json"),
            "tokenizer",
            format!(
                "missing, and the source model {:?} recorded in eqat.json is not there to take it from",
                meta["source"]
            ),
        )),
    }
}

/// The resident tensors under their HF names, f16.
fn resident_tensors(model: &QuantizedModel, out: &mut Vec<Owned>) {
    out.push(f16_tensor(
        "model.embed_tokens.weight".into(),
        &model.embedding,
    ));
    out.push(f16_tensor("model.norm.weight".into(), &model.final_norm));
    if let Some(h) = &model.lm_head {
        out.push(f16_tensor("lm_head.weight".into(), h));
    }
    for (i, b) in model.blocks.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push(f16_tensor(
            format!("{p}.input_layernorm.weight"),
            &b.attn_norm,
        ));
        out.push(f16_tensor(
            format!("{p}.post_attention_layernorm.weight"),
            &b.ffn_norm,
        ));
    }
}

fn gptq_tensors(model: &QuantizedModel, zeros: ZeroConvention) -> Result<Vec<Owned>> {
    let mut out = Vec::new();
    resident_tensors(model, &mut out);
    for (i, b) in model.blocks.iter().enumerate() {
        for (m, l) in LINEAR_NAMES.iter().zip(&b.linears) {
            let p = format!("model.layers.{i}.{m}");
            let t = to_gptq_tensors(l, zeros, PackLayout::Gptq, &p).map_err(|e| {
                let hint = if zeros == ZeroConvention::V1 {
                    " (--zero-convention v2)"
                } else {
                    ""
                };
                Error::invalid("export", format!("{e}{hint}"))
            })?;
            out.push(i32_tensor(
                format!("{p}.qweight"),
                &t.qweight_shape,
                &t.qweight,
            ));
            out.push(i32_tensor(
                format!("{p}.qzeros"),
                &t.qzeros_shape,
                &t.qzeros,
            ));
            out.push(f16_tensor(format!("{p}.scales"), &t.scales));
            out.push(i32_tensor(format!("{p}.g_idx"), &[t.g_idx.len()], &t.g_idx));
        }
    }
    Ok(out)
}

fn fake_tensors(model: &QuantizedModel) -> Result<Vec<Owned>> {
    let mut out = Vec::new();
    resident_tensors(model, &mut out);
    for (i, b) in model.blocks.iter().enumerate() {
        for (m, l) in LINEAR_NAMES.iter().zip(&b.linears) {
            out.push(f16_tensor(
                format!("model.layers.{i}.{m}.weight"),
                &l.dequantize()?,
            ));
        }
    }
    Ok(out)
}

/// The model a GPTQ export of `model` holds: scales, norms, embedding and lm_head rounded to f16, integer
/// weights and zeros unchanged.
pub fn as_exported_gptq(model: &QuantizedModel) -> Result<QuantizedModel> {
    let round = |t: &Tensor| t.to_dtype(DType::F16).to_dtype(DType::F32);
    let mut m = model.clone();
    m.embedding = round(&m.embedding);
    m.final_norm = round(&m.final_norm);
    m.lm_head = m.lm_head.as_ref().map(round);
    for b in &mut m.blocks {
        b.attn_norm = round(&b.attn_norm);
        b.ffn_norm = round(&b.ffn_norm);
        for l in &mut b.linears {
            let s = round(l.scales());
            l.set_scales(s)?;
        }
    }
    Ok(m)
}
