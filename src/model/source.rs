//! Where a model's weights come from: a [`WeightSource`] hands them out on demand, one block at a time, in the
//! layout the block expects (HF: linears [out, in], q/k rows for half-split RoPE), dequantized to f32 only when
//! asked. [`open_model`] picks the source for a path and builds the model and its tokenizer.
use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::io::tokenizer::Tokenizer;
use crate::model::forward::LlamaModel;
use crate::model::gguf::GgufWeights;
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::tensor::Tensor;
use std::io::Read;
use std::path::Path;

/// A model's weights, read on demand. Every tensor comes back as host f32 in HF layout.
pub trait WeightSource: Send + Sync {
    fn config(&self) -> &LlamaConfig;
    /// The weights of block `i` (< `config().n_layers`).
    fn block(&self, i: usize) -> Result<BlockWeights>;
    /// The token embedding [V, C].
    fn embedding(&self) -> Result<Tensor>;
    /// The weight of the final RMSNorm [C].
    fn final_norm(&self) -> Result<Tensor>;
    /// The output projection [V, C], or None when it is tied to the embedding.
    fn lm_head(&self) -> Result<Option<Tensor>>;
    /// The file or directory the weights come from, for messages.
    fn path(&self) -> &Path;
}

/// The model and tokenizer stored at `path`: a GGUF file (architecture `llama`).
pub fn open_model(path: &Path) -> Result<(LlamaModel, Tokenizer)> {
    if path.is_dir() {
        return Err(Error::format(
            path,
            "model",
            "is a directory; expected a GGUF file (architecture llama)",
        ));
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if &magic[..n] != b"GGUF" {
        return Err(Error::format(
            path,
            "magic",
            "not a GGUF file (supported: GGUF files of architecture llama)",
        ));
    }
    let file = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let model = LlamaModel::new(Box::new(GgufWeights::from_file(file)?))?;
    Ok((model, tokenizer))
}
