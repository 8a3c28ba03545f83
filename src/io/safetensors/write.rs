//! The writer. Layout as the reference writer lays it out: tensors in descending `Dtype` order
//! (wider types first), then by name, and the header padded with spaces to a multiple of 8 bytes,
//! so that in a mapping every tensor starts aligned to its element size. Files are written to a temporary file beside
//! the target, synced, then renamed over it: a crash leaves the old file or the new one, never half.
use super::Dtype;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// One tensor to write: name, dtype, shape, and its raw little-endian bytes.
pub type TensorRef<'a> = (&'a str, Dtype, &'a [usize], &'a [u8]);

/// Writes `tensors` and `metadata` (the header's `__metadata__`, omitted when empty) to `path`,
/// atomically. Errors when a tensor's bytes do not match dtype × shape or a name repeats.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[TensorRef],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let (header, order) = plan(tensors, metadata)?;
    let tmp = temp_path(path)?;
    let written = (|| -> std::io::Result<()> {
        let mut w = BufWriter::with_capacity(1 << 20, File::create_new(&tmp)?);
        write_body(&mut w, &header, &order)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    written.map_err(|e| {
        // Best effort: the write already failed, and after a successful rename there is no tmp.
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// The bytes `write_safetensors` would write.
pub fn serialize(tensors: &[TensorRef], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let (header, order) = plan(tensors, metadata)?;
    let data: usize = tensors.iter().map(|t| t.3.len()).sum();
    let mut out = Vec::with_capacity(8 + header.len() + data);
    write_body(&mut out, &header, &order).map_err(|e| Error::io("<memory>", e))?;
    Ok(out)
}

/// Checks the tensors and returns the padded header JSON and the order of the data.
fn plan<'a>(
    tensors: &'a [TensorRef<'a>],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<&'a TensorRef<'a>>)> {
    let bad = |name: &str, msg: String| {
        Error::invalid("write_safetensors", format!("tensor {name}: {msg}"))
    };
    let mut seen = HashSet::with_capacity(tensors.len());
    for &(name, dtype, shape, bytes) in tensors {
        if name == "__metadata__" {
            return Err(bad(name, "the name is reserved for the metadata".into()));
        }
        if !seen.insert(name) {
            return Err(bad(name, "duplicate name".into()));
        }
        match dtype.byte_size(shape) {
            Some(need) if need == bytes.len() => {}
            need => {
                let need = need.map_or("more than usize::MAX".into(), |n| n.to_string());
                let (dtype, got) = (dtype.name(), bytes.len());
                let msg = format!("shape {shape:?} of {dtype} needs {need} bytes, got {got}");
                return Err(bad(name, msg));
            }
        }
    }
    let mut order: Vec<&TensorRef> = tensors.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    // Written by hand rather than through a serde_json::Map (which sorts keys) so that the bytes
    // equal the reference writer's: metadata first, entries in data order, keys dtype, shape,
    // data_offsets.
    let mut header = String::from("{");
    if !metadata.is_empty() {
        header += &format!("\"__metadata__\":{},", to_json(metadata)?);
    }
    let mut offset = 0;
    for &&(name, dtype, shape, bytes) in &order {
        let end = offset + bytes.len();
        header += &format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{end}]}},",
            to_json(&name)?,
            dtype.name(),
            to_json(&shape)?
        );
        offset = end;
    }
    if header.ends_with(',') {
        header.pop();
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok((header, order))
}

fn to_json(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid("write_safetensors", e.to_string()))
}

fn write_body(w: &mut impl Write, header: &[u8], order: &[&TensorRef]) -> std::io::Result<()> {
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header)?;
    for t in order {
        w.write_all(t.3)?;
    }
    w.flush()
}

/// A fresh name beside `path` (same directory, so the rename stays on one file system).
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        Error::invalid(
            "write_safetensors",
            format!("{} has no file name", path.display()),
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.{}.{n}.tmp", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(tmp))
}

/// Makes the rename itself durable (the directory entry), where the platform allows it.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
