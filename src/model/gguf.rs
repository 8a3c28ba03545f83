//! Llama weights from a GGUF file (shared/formats.md §6.3), handed out one block at a time in HF layout.
//!
//! Config keys: `llama.{embedding_length, feed_forward_length, block_count, attention.head_count,
//! attention.layer_norm_rms_epsilon}` are required; `attention.head_count_kv` defaults to the head count,
//! `rope.freq_base` to 10000, `attention.key_length` and `rope.dimension_count` to hidden / heads. The
//! vocabulary is the row count of `token_embd.weight` (`llama.vocab_size`, when present, must agree). A file
//! without `output.weight` ties the output projection to the embedding.
//!
//! llama.cpp's converter permutes the rows of q and k within each head so that RoPE can rotate adjacent pairs
//! (2i, 2i + 1): GGUF row 2i + j of a head holds HF row j·D/2 + i. [`unpermute_rows`] puts them back, so the
//! block runs HF's half-split RoPE on HF-layout weights.
use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, MetaValue};
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::model::source::WeightSource;
use crate::ops::rope::RopeLayout;
use crate::tensor::Tensor;
use std::path::Path;

/// GGUF tensor names of the seven linears, in `LlamaConfig::linear_shapes` order.
const LINEAR_NAMES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// A Llama GGUF file: the config read from its metadata, tensors dequantized when asked for.
pub struct GgufWeights {
    file: GgufFile,
    cfg: LlamaConfig,
}

impl GgufWeights {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufWeights> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Reads the config and checks that every tensor the model needs is present with the right shape.
    pub fn from_file(file: GgufFile) -> Result<GgufWeights> {
        let cfg = llama_config(&file)?;
        let w = GgufWeights { file, cfg };
        let (c, v) = (w.cfg.hidden, w.cfg.vocab);
        w.check_shape("token_embd.weight", &[v, c])?;
        w.check_shape("output_norm.weight", &[c])?;
        if !w.cfg.tie_embeddings {
            w.check_shape("output.weight", &[v, c])?;
        }
        for i in 0..w.cfg.n_layers {
            w.check_shape(&format!("blk.{i}.attn_norm.weight"), &[c])?;
            w.check_shape(&format!("blk.{i}.ffn_norm.weight"), &[c])?;
            for (name, (_, n, k)) in LINEAR_NAMES.iter().zip(w.cfg.linear_shapes()) {
                w.check_shape(&format!("blk.{i}.{name}.weight"), &[n, k])?;
            }
        }
        Ok(w)
    }

    /// The parsed file (for its tokenizer metadata).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn check_shape(&self, name: &str, want: &[usize]) -> Result<()> {
        let field = format!("tensor {name}");
        let info = self
            .file
            .tensor_info(name)
            .ok_or_else(|| Error::format(self.file.path(), &field, "missing"))?;
        if info.shape() != want {
            let msg = format!("shape {:?}, expected {want:?}", info.shape());
            return Err(Error::format(self.file.path(), field, msg));
        }
        Ok(())
    }
}

impl WeightSource for GgufWeights {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn block(&self, i: usize) -> Result<BlockWeights> {
        if i >= self.cfg.n_layers {
            let msg = format!("block {i} of a model with {} blocks", self.cfg.n_layers);
            return Err(Error::invalid("GgufWeights::block", msg));
        }
        let get = |name: &str| self.file.tensor_f32(&format!("blk.{i}.{name}.weight"));
        let mut linears = Vec::with_capacity(7);
        for name in LINEAR_NAMES {
            let t = get(name)?;
            let heads = match name {
                "attn_q" => self.cfg.n_heads,
                "attn_k" => self.cfg.n_kv_heads,
                _ => {
                    linears.push(t);
                    continue;
                }
            };
            let shape = t.shape().to_vec();
            let rows = unpermute_rows(t.f32s("GgufWeights::block")?, heads, self.cfg.head_dim);
            linears.push(Tensor::from_vec(&shape, rows)?);
        }
        Ok(BlockWeights {
            attn_norm: get("attn_norm")?,
            ffn_norm: get("ffn_norm")?,
            linears: linears.try_into().expect("seven linears"),
        })
    }

    fn embedding(&self) -> Result<Tensor> {
        self.file.tensor_f32("token_embd.weight")
    }

    fn final_norm(&self) -> Result<Tensor> {
        self.file.tensor_f32("output_norm.weight")
    }

    fn lm_head(&self) -> Result<Option<Tensor>> {
        match self.cfg.tie_embeddings {
            true => Ok(None),
            false => self.file.tensor_f32("output.weight").map(Some),
        }
    }

    fn path(&self) -> &Path {
        self.file.path()
    }
}

/// HF rows of a q or k weight [heads·D, K] from its GGUF rows: HF row h·D + j·D/2 + i is GGUF row
/// h·D + 2i + j (the inverse of `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py).
pub fn unpermute_rows(w: &[f32], heads: usize, head_dim: usize) -> Vec<f32> {
    let cols = w.len() / (heads * head_dim).max(1);
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                out[hf * cols..][..cols].copy_from_slice(&w[gguf * cols..][..cols]);
            }
        }
    }
    out
}

/// A float metadata value stored as f32 or f64.
fn get_float(file: &GgufFile, key: &str) -> Result<Option<f32>> {
    match file.metadata(key) {
        None => Ok(None),
        Some(MetaValue::F32(x)) => Ok(Some(*x)),
        Some(MetaValue::F64(x)) => Ok(Some(*x as f32)),
        Some(v) => Err(Error::format(
            file.path(),
            key,
            format!("expected f32, found {}", v.type_name()),
        )),
    }
}

fn opt_usize(file: &GgufFile, key: &str) -> Result<Option<usize>> {
    file.metadata(key).map(|_| file.get_usize(key)).transpose()
}

/// The Llama config a GGUF file's metadata describes.
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let path = file.path();
    let arch = file.get_str("general.architecture")?;
    if arch != "llama" {
        let msg = format!("\"{arch}\" is not supported (supported architectures: llama)");
        return Err(Error::format(path, "general.architecture", msg));
    }
    if let Some(MetaValue::Str(kind)) = file.metadata("llama.rope.scaling.type") {
        if kind != "none" {
            let msg = format!("RoPE scaling \"{kind}\" is not supported (only none)");
            return Err(Error::format(path, "llama.rope.scaling.type", msg));
        }
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        let msg = "per-frequency RoPE factors (Llama 3.1 rope scaling) are not supported";
        return Err(Error::format(path, "tensor rope_freqs.weight", msg));
    }
    let hidden = file.get_usize("llama.embedding_length")?;
    let n_heads = file.get_usize("llama.attention.head_count")?;
    if n_heads == 0 || !hidden.is_multiple_of(n_heads) {
        let msg = format!("{n_heads} heads do not divide embedding_length {hidden}");
        return Err(Error::format(path, "llama.attention.head_count", msg));
    }
    let head_dim = opt_usize(file, "llama.attention.key_length")?.unwrap_or(hidden / n_heads);
    for key in ["llama.attention.value_length", "llama.rope.dimension_count"] {
        if let Some(d) = opt_usize(file, key)? {
            if d != head_dim {
                let msg = format!("{d} differs from the head dim {head_dim} (unsupported)");
                return Err(Error::format(path, key, msg));
            }
        }
    }
    let embd = file
        .tensor_info("token_embd.weight")
        .ok_or_else(|| Error::format(path, "tensor token_embd.weight", "missing"))?;
    let vocab = match embd.shape()[..] {
        [v, c] if c == hidden => v,
        ref s => {
            let msg = format!("shape {s:?}, expected [V, {hidden}]");
            return Err(Error::format(path, "tensor token_embd.weight", msg));
        }
    };
    if let Some(v) = opt_usize(file, "llama.vocab_size")? {
        if v != vocab {
            let msg = format!("{v}, but token_embd.weight has {vocab} rows");
            return Err(Error::format(path, "llama.vocab_size", msg));
        }
    }
    let rms_eps = get_float(file, "llama.attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
        Error::format(
            path,
            "llama.attention.layer_norm_rms_epsilon",
            "missing metadata key",
        )
    })?;
    let cfg = LlamaConfig {
        hidden,
        intermediate: file.get_usize("llama.feed_forward_length")?,
        n_heads,
        n_kv_heads: opt_usize(file, "llama.attention.head_count_kv")?.unwrap_or(n_heads),
        head_dim,
        n_layers: file.get_usize("llama.block_count")?,
        vocab,
        rms_eps,
        rope_base: get_float(file, "llama.rope.freq_base")?.unwrap_or(10_000.0),
        rope_layout: RopeLayout::HalfSplit,
        tie_embeddings: file.tensor_info("output.weight").is_none(),
        attn_bias: false,
    };
    cfg.validate()
        .map_err(|e| Error::format(path, "llama.*", e.to_string()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;

    /// llama.cpp's `permute`: w.reshape(heads, 2, D/2, K).swapaxes(1, 2).reshape(heads·D, K), in index form.
    fn permute_like_convert_hf_to_gguf(w: &[f32], heads: usize, d: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; w.len()];
        for h in 0..heads {
            for a in 0..d / 2 {
                for b in 0..2 {
                    // Output index (h, a, b) of the swapped array reads input (h, b, a).
                    let dst = h * d + a * 2 + b;
                    let src = h * d + b * (d / 2) + a;
                    out[dst * k..][..k].copy_from_slice(&w[src * k..][..k]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_rows_inverts_the_converter_permutation() {
        let mut rng = Rng::new(5);
        for (heads, d, k) in [(1, 4, 1), (3, 8, 5), (9, 64, 7)] {
            let hf = rng.normal_vec(heads * d * k, 1.0);
            let gguf = permute_like_convert_hf_to_gguf(&hf, heads, d, k);
            assert_ne!(gguf, hf, "the permutation moves rows ({heads}, {d}, {k})");
            assert_eq!(unpermute_rows(&gguf, heads, d), hf);
        }
    }
}
