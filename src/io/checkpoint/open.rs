//! Opening a finished checkpoint directory: its metadata, quantized model and tokenizer.
use super::{CheckpointDir, FORMAT, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::model::quantized::QuantizedModel;
use serde_json::Value;
use std::path::Path;

/// The parsed eqat.json of `dir`, checked to be ours.
pub fn read_meta(dir: &Path) -> Result<Value> {
    let path = dir.join("eqat.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let meta: Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&path, "json", e.to_string()))?;
    if meta["format"] != FORMAT || meta["format_version"] != FORMAT_VERSION {
        return Err(Error::format(
            &path,
            "format",
            format!("not an {FORMAT} v{FORMAT_VERSION} file"),
        ));
    }
    Ok(meta)
}

/// The model and tokenizer of a checkpoint directory: its config.json, and its tokenizer.json (checkpoints
/// written before the tokenizer was stored use the source model's tokenizer recorded in eqat.json).
pub fn open_checkpoint_model(
    dir: &Path,
) -> Result<(crate::model::LlamaModel, crate::io::tokenizer::Tokenizer)> {
    let (model, _) = open_checkpoint(dir)?;
    let tokenizer = checkpoint_tokenizer(dir)?;
    Ok((crate::model::LlamaModel::new(Box::new(model))?, tokenizer))
}

/// The finished quantized model in `dir` (an error names the directory when it is not a checkpoint or is
/// unfinished), with the checkpoint's eqat.json.
pub fn open_checkpoint(dir: &Path) -> Result<(QuantizedModel, Value)> {
    if !dir.join("eqat.json").is_file() {
        return Err(Error::invalid(
            "checkpoint",
            format!("{} is not an eqat checkpoint (no eqat.json)", dir.display()),
        ));
    }
    let meta = read_meta(dir)?;
    let cfg = crate::io::hf::HfConfig::open(dir.join("config.json"))?.llama;
    let model = CheckpointDir::open(dir, &cfg)?.load_model()?;
    Ok((model, meta))
}

/// The tokenizer of checkpoint `dir`: DIR/tokenizer.json, else the source model's.
pub fn checkpoint_tokenizer(dir: &Path) -> Result<crate::io::tokenizer::Tokenizer> {
    let own = dir.join("tokenizer.json");
    if own.is_file() {
        return crate::io::tokenizer::Tokenizer::from_tokenizer_json(own);
    }
    let source = read_meta(dir)?["source"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| Error::format(dir.join("eqat.json"), "source", "missing"))?;
    Ok(crate::model::open_model(Path::new(&source))?.1)
}
