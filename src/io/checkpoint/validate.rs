//! Checks on what a checkpoint directory holds before it is trusted: eqat.json against the model and the run,
//! and every block tensor's dtype and shape. A damaged or foreign file is an error naming the file and the field
//! or tensor, never a panic or a misread (found by fuzz/fuzz_targets/fuzz_checkpoint.rs).
use super::{RunIdentity, FORMAT, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::io::safetensors::{Dtype, SafetensorsFile};
use crate::model::llama::LlamaConfig;
use crate::quant::fake_quant::QuantConfig;
use serde_json::{json, Value};
use std::path::Path;

/// Checks eqat.json (`meta`, read from `path`) against the model `cfg` and returns its quantization.
pub fn check_meta(path: &Path, meta: &Value, cfg: &LlamaConfig) -> Result<QuantConfig> {
    if meta["format"] != FORMAT || meta["format_version"] != FORMAT_VERSION {
        return Err(Error::format(
            path,
            "format",
            format!("not an {FORMAT} v{FORMAT_VERSION} file"),
        ));
    }
    let int = |k: &str| {
        meta[k]
            .as_i64()
            .ok_or_else(|| Error::format(path, k, format!("{} is not an integer", meta[k])))
    };
    let wbits = u32::try_from(int("wbits")?)
        .map_err(|_| Error::format(path, "wbits", format!("{} is out of range", meta["wbits"])))?;
    let quant = QuantConfig::new(wbits, int("group_size")?)
        .map_err(|e| Error::format(path, "wbits/group_size", e.to_string()))?;
    if meta["n_layers"] != json!(cfg.n_layers) {
        return Err(Error::format(
            path,
            "n_layers",
            format!(
                "{} blocks, but the model has {}",
                meta["n_layers"], cfg.n_layers
            ),
        ));
    }
    let blocks = meta["blocks"]
        .as_array()
        .ok_or_else(|| Error::format(path, "blocks", "not an array"))?;
    if blocks.len() > cfg.n_layers {
        return Err(Error::format(
            path,
            "blocks",
            format!(
                "{} finished blocks of a {}-block model",
                blocks.len(),
                cfg.n_layers
            ),
        ));
    }
    if let Some(i) = (0..blocks.len()).find(|&i| blocks[i]["index"] != json!(i)) {
        return Err(Error::format(
            path,
            format!("blocks[{i}].index"),
            format!("{}, expected {i}", blocks[i]["index"]),
        ));
    }
    Ok(quant)
}

/// Refuses to resume a checkpoint made by another run, naming the first setting that differs.
pub fn check_same_run(
    path: &Path,
    meta: &Value,
    run: &RunIdentity,
    cfg: &LlamaConfig,
) -> Result<()> {
    check_meta(path, meta, cfg)?;
    let mut checks = vec![
        (
            "wbits (--wbits)".to_string(),
            meta["wbits"].clone(),
            json!(run.quant.wbits),
        ),
        (
            "group_size (--group-size)".to_string(),
            meta["group_size"].clone(),
            json!(run.quant.group_size),
        ),
        (
            "source (--model)".to_string(),
            meta["source"].clone(),
            json!(run.source),
        ),
    ];
    // Recipe keys one by one (they are named like their flags), so the message says which flag to change.
    match (meta["recipe"].as_object(), run.recipe.as_object()) {
        (Some(stored), Some(now)) => {
            for key in stored
                .keys()
                .chain(now.keys().filter(|k| !stored.contains_key(*k)))
            {
                checks.push((
                    format!("recipe.{key} (--{})", key.replace('_', "-")),
                    stored.get(key).cloned().unwrap_or(Value::Null),
                    now.get(key).cloned().unwrap_or(Value::Null),
                ));
            }
        }
        _ => checks.push((
            "recipe".to_string(),
            meta["recipe"].clone(),
            run.recipe.clone(),
        )),
    }
    for (field, stored, now) in checks {
        if stored != now {
            return Err(Error::format(
                path,
                field,
                format!("the checkpoint was made with {stored}, this run asks for {now}; resume with the same settings"),
            ));
        }
    }
    Ok(())
}

/// The bytes of tensor `name` in `f` after checking its dtype and shape.
pub fn tensor_bytes_checked<'a>(
    f: &'a SafetensorsFile,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8]> {
    let info = f
        .tensor_info(name)
        .ok_or_else(|| Error::format(f.path(), format!("tensor {name}"), "missing"))?;
    if info.dtype != dtype || info.shape != shape {
        return Err(Error::format(
            f.path(),
            format!("tensor {name}"),
            format!(
                "{} {:?}, expected {} {shape:?}",
                info.dtype.name(),
                info.shape,
                dtype.name()
            ),
        ));
    }
    f.tensor_bytes(name)
}
