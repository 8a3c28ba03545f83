//! E2E-QP's progress in a checkpoint directory, so that a killed run continues E2E-QP from its last save
//! instead of its start (`train::e2e_qp::E2eProgress` says why this is the whole state):
//!
//! ```text
//! DIR/e2e_progress.safetensors
//!   model.layers.N.<module>.scales    F32 [out, groups]   the trained scales
//!   model.layers.N.<module>.adamw_m   F32 [out, groups]   AdamW's moments, absent while the scale's step is 0
//!   model.layers.N.<module>.adamw_v   F32 [out, groups]
//!   losses                            F32 [steps done]    the mean loss of every step so far
//!   __metadata__  format "eqat-e2e-progress", format_version "1", wbits, group_size,
//!                 settings (E2eIdentity's JSON), adamw_steps, adamw_param_steps (JSON, one per scale)
//! ```
//! Written atomically (temporary file, sync, rename) like every file of the directory. Reading trusts nothing:
//! a truncated, foreign or mismatched file is an error naming the file and the field or tensor.
use super::validate::tensor_bytes_checked;
use super::{CheckpointDir, MODULES};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_safetensors, Dtype, SafetensorsFile};
use crate::tensor::Tensor;
use crate::train::adamw::{AdamWState, ParamState};
use crate::train::e2e_qp::{identity_flags, E2eIdentity, E2eProgress};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[cfg(test)]
mod tests;

const E2E_PROGRESS_FILE: &str = "e2e_progress.safetensors";
const PROGRESS_FORMAT: &str = "eqat-e2e-progress";
const PROGRESS_VERSION: &str = "1";

/// One scale of the model: its tensor-name prefix and shape.
struct ScaleSlot {
    prefix: String,
    shape: Vec<usize>,
}

impl CheckpointDir {
    pub fn e2e_progress_path(&self) -> PathBuf {
        self.dir.join(E2E_PROGRESS_FILE)
    }

    /// Every scale of the model, [block][linear] order.
    fn scale_slots(&self) -> Result<Vec<ScaleSlot>> {
        let mut slots = Vec::with_capacity(self.cfg.n_layers * MODULES.len());
        for i in 0..self.cfg.n_layers {
            for (m, (_, n, k)) in MODULES.iter().zip(self.cfg.linear_shapes()) {
                let g = self.quant.group_len(k)?;
                slots.push(ScaleSlot {
                    prefix: format!("model.layers.{i}.{m}"),
                    shape: vec![n, k / g],
                });
            }
        }
        Ok(slots)
    }

    /// Saves `progress` of the run `identity` describes, replacing the previous save.
    pub fn save_e2e_progress(&self, progress: &E2eProgress, identity: &E2eIdentity) -> Result<()> {
        let slots = self.scale_slots()?;
        let params = &progress.adamw.params;
        if progress.scales.len() != slots.len() || params.len() != slots.len() {
            return Err(Error::invalid(
                "save_e2e_progress",
                format!(
                    "{} scales and {} AdamW states for a model of {} scales",
                    progress.scales.len(),
                    params.len(),
                    slots.len()
                ),
            ));
        }
        // The tensors' bytes are borrowed from `progress`: a save of a large model holds no second copy.
        let mut tensors: Vec<(String, &[usize], &[f32])> = Vec::new();
        for ((slot, s), st) in slots.iter().zip(&progress.scales).zip(params) {
            let p = &slot.prefix;
            if s.shape() != slot.shape {
                return Err(Error::shape(
                    "save_e2e_progress",
                    format!("{p}.scales is {:?}, expected {:?}", s.shape(), slot.shape),
                ));
            }
            tensors.push((
                format!("{p}.scales"),
                s.shape(),
                s.f32s("save_e2e_progress")?,
            ));
            if st.step > 0 {
                tensors.push((format!("{p}.adamw_m"), s.shape(), &st.m));
                tensors.push((format!("{p}.adamw_v"), s.shape(), &st.v));
            }
        }
        let losses_shape = [progress.losses.len()];
        tensors.push(("losses".into(), &losses_shape, &progress.losses));
        let refs: Vec<_> = tensors
            .iter()
            .map(|&(ref n, s, v)| (n.as_str(), Dtype::F32, s, bytemuck::cast_slice(v)))
            .collect();
        let steps: Vec<u64> = params.iter().map(|p| p.step).collect();
        let md = BTreeMap::from([
            ("format".to_string(), PROGRESS_FORMAT.to_string()),
            ("format_version".to_string(), PROGRESS_VERSION.to_string()),
            ("wbits".to_string(), self.quant.wbits.to_string()),
            ("group_size".to_string(), self.quant.group_size.to_string()),
            ("settings".to_string(), identity.settings.to_string()),
            ("adamw_steps".to_string(), progress.adamw.steps.to_string()),
            (
                "adamw_param_steps".to_string(),
                serde_json::to_string(&steps)?,
            ),
        ]);
        write_safetensors(self.e2e_progress_path(), &refs, &md)
    }

    /// The progress saved by an earlier attempt of the run `identity` describes, or None when there is no file.
    /// A file of another run (other bits, groups, settings or data) or a damaged one is an error.
    pub fn load_e2e_progress(&self, identity: &E2eIdentity) -> Result<Option<E2eProgress>> {
        self.remove_unfinished_saves()?;
        let path = self.e2e_progress_path();
        if !path.exists() {
            return Ok(None);
        }
        let f = SafetensorsFile::open(&path)?;
        let meta = Meta(&f);
        if meta.text("format")? != PROGRESS_FORMAT
            || meta.text("format_version")? != PROGRESS_VERSION
        {
            let msg = format!("not an {PROGRESS_FORMAT} v{PROGRESS_VERSION} file");
            return Err(Error::format(&path, "format", msg));
        }
        for (key, flag, now) in [
            ("wbits", "--wbits", self.quant.wbits.to_string()),
            (
                "group_size",
                "--group-size",
                self.quant.group_size.to_string(),
            ),
        ] {
            let saved = meta.text(key)?;
            if saved != now {
                return Err(mismatch(&path, key, flag, saved, &now));
            }
        }
        let settings: Value = meta.json("settings")?;
        check_settings(&path, &settings, &identity.settings)?;

        let losses = read_losses(&f, identity.total_steps)?;
        let adamw_steps: u64 = meta.json("adamw_steps")?;
        if adamw_steps != losses.len() as u64 {
            let msg = format!("{adamw_steps}, but {} losses", losses.len());
            return Err(Error::format(&path, "adamw_steps", msg));
        }
        let param_steps: Vec<u64> = meta.json("adamw_param_steps")?;
        let slots = self.scale_slots()?;
        if param_steps.len() != slots.len() || param_steps.iter().any(|&s| s > adamw_steps) {
            let msg = format!(
                "{param_steps:?}: expected {} step counts of at most {adamw_steps}",
                slots.len()
            );
            return Err(Error::format(&path, "adamw_param_steps", msg));
        }
        let expected = slots.len() + 1 + 2 * param_steps.iter().filter(|&&s| s > 0).count();
        if f.tensors().len() != expected {
            let msg = format!("{} tensors, expected {expected}", f.tensors().len());
            return Err(Error::format(&path, "tensors", msg));
        }
        let mut scales = Vec::with_capacity(slots.len());
        let mut params = Vec::with_capacity(slots.len());
        for (slot, &step) in slots.iter().zip(&param_steps) {
            let read = |what: &str| read_f32s(&f, &format!("{}.{what}", slot.prefix), &slot.shape);
            scales.push(Tensor::from_vec(&slot.shape, read("scales")?)?);
            params.push(match step {
                0 => ParamState::default(),
                _ => ParamState {
                    step,
                    m: read("adamw_m")?,
                    v: read("adamw_v")?,
                },
            });
        }
        Ok(Some(E2eProgress {
            losses,
            scales,
            adamw: AdamWState {
                steps: adamw_steps,
                params,
            },
        }))
    }

    /// Removes the temporary files of saves a kill interrupted before their rename (write_safetensors names them
    /// `.e2e_progress.safetensors.PID.N.tmp`): as large as the progress file, and never read.
    fn remove_unfinished_saves(&self) -> Result<()> {
        let prefix = format!(".{E2E_PROGRESS_FILE}.");
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&self.dir, e))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".tmp")) {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(())
    }
}

/// The metadata of a progress file, read with errors that name the file and the key.
struct Meta<'a>(&'a SafetensorsFile);

impl Meta<'_> {
    fn text(&self, key: &str) -> Result<&str> {
        self.0
            .metadata()
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::format(self.0.path(), key, "missing"))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let text = self.text(key)?;
        serde_json::from_str(text)
            .map_err(|e| Error::format(self.0.path(), key, format!("{text:?}: {e}")))
    }
}

fn mismatch(path: &Path, key: &str, flags: &str, saved: &str, now: &str) -> Error {
    Error::format(
        path,
        format!("{key} ({flags})"),
        format!(
            "E2E-QP's progress was saved with {saved}, this run asks for {now}; resume with the same \
             settings, or delete the file to start E2E-QP over"
        ),
    )
}

/// Refuses progress saved with other E2E-QP settings or data, naming the first key that differs.
fn check_settings(path: &Path, saved: &Value, now: &Value) -> Result<()> {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return Err(Error::format(path, "settings", "not a JSON object"));
    };
    for key in saved
        .keys()
        .chain(now.keys().filter(|k| !saved.contains_key(*k)))
    {
        let (a, b) = (
            saved.get(key).unwrap_or(&Value::Null),
            now.get(key).unwrap_or(&Value::Null),
        );
        if a != b {
            let flags = identity_flags(key);
            return Err(mismatch(path, key, flags, &a.to_string(), &b.to_string()));
        }
    }
    Ok(())
}

/// The `losses` tensor: between 1 and `total_steps` finite values.
fn read_losses(f: &SafetensorsFile, total_steps: usize) -> Result<Vec<f32>> {
    let n = match f.tensor_info("losses").map(|t| t.shape.as_slice()) {
        Some(&[n]) if (1..=total_steps).contains(&n) => n,
        Some(shape) => {
            let msg = format!("shape {shape:?}, expected [1..={total_steps}] (steps done)");
            return Err(Error::format(f.path(), "tensor losses", msg));
        }
        None => return Err(Error::format(f.path(), "tensor losses", "missing")),
    };
    read_f32s(f, "losses", &[n])
}

/// Tensor `name`'s finite F32 values after checking its dtype and shape.
fn read_f32s(f: &SafetensorsFile, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let values: Vec<f32> = tensor_bytes_checked(f, name, Dtype::F32, shape)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(x) = values.iter().find(|x| !x.is_finite()) {
        let msg = format!("holds {x}; a saved run has finite values only");
        return Err(Error::format(f.path(), format!("tensor {name}"), msg));
    }
    Ok(values)
}
