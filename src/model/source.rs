//! Where a model's weights come from: a [`WeightSource`] hands them out on demand, one block at a time, in the
//! layout the block expects (HF: linears [out, in], q/k rows for half-split RoPE), dequantized to f32 only when
//! asked. [`open_model`] picks the source for a path (a GGUF file, or a Hugging Face model directory) and
//! builds the model and its tokenizer.
use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::io::tokenizer::Tokenizer;
use crate::model::forward::LlamaModel;
use crate::model::gguf::GgufWeights;
use crate::model::gptq::{GptqConfig, GptqWeights};
use crate::model::hf::HfWeights;
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::tensor::Tensor;
use std::io::Read;
use std::path::Path;

/// A model's weights, read on demand. Every tensor comes back as host f32 in HF layout.
pub trait WeightSource: Send + Sync {
    fn config(&self) -> &LlamaConfig;
    /// The weights of block `i` (< `config().n_layers`).
    fn block(&self, i: usize) -> Result<BlockWeights>;
    /// The q, k and v projection biases of block `i` when the architecture has them (Qwen2).
    fn qkv_bias(&self, _i: usize) -> Result<Option<[Tensor; 3]>> {
        Ok(None)
    }
    /// The longest span attention may cover (Mistral's sliding window); attention here is full causal,
    /// which equals the windowed one only for sequences up to this long.
    fn attention_window(&self) -> Option<usize> {
        None
    }
    /// The token embedding [V, C].
    fn embedding(&self) -> Result<Tensor>;
    /// The weight of the final RMSNorm [C].
    fn final_norm(&self) -> Result<Tensor>;
    /// The output projection [V, C], or None when it is tied to the embedding.
    fn lm_head(&self) -> Result<Option<Tensor>>;
    /// The file or directory the weights come from, for messages.
    fn path(&self) -> &Path;
}

/// The model and tokenizer stored at `path`: a GGUF file (architecture `llama`), or a Hugging Face model
/// directory (config.json of Llama, Mistral or Qwen2, safetensors weights, tokenizer.json), GPTQ-quantized
/// ([`GptqWeights`]) or not.
pub fn open_model(path: &Path) -> Result<(LlamaModel, Tokenizer)> {
    if path.is_dir() {
        let weights: Box<dyn WeightSource> = match GptqConfig::find(path)? {
            Some(_) => Box::new(GptqWeights::open(path)?),
            None => Box::new(HfWeights::open(path)?),
        };
        let model = LlamaModel::new(weights)?;
        let tokenizer = Tokenizer::from_tokenizer_json(path.join("tokenizer.json"))?;
        return Ok((model, tokenizer));
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if &magic[..n] != b"GGUF" {
        return Err(Error::format(
            path,
            "magic",
            "not a GGUF file (supported: a GGUF file of architecture llama, or a Hugging Face model \
             directory)",
        ));
    }
    let file = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let model = LlamaModel::new(Box::new(GgufWeights::from_file(file)?))?;
    Ok((model, tokenizer))
}
