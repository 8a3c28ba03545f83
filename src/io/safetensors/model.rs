//! A Hugging Face checkpoint: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`{"metadata": {..}, "weight_map": {tensor: shard file}}`).
//! Each shard is mapped the first time one of its tensors is asked for, and then kept.
use super::{SafetensorsFile, TensorInfo, MAX_HEADER_BYTES};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    file: OnceLock<SafetensorsFile>,
}

pub struct SafetensorsModel {
    /// The index file, or the single file: what error messages about the tensor list name.
    source: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    weight_map: BTreeMap<String, usize>,
}

impl SafetensorsModel {
    /// Opens a model directory (the index if present, else `model.safetensors`), an index file,
    /// or a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsModel> {
        let path = path.as_ref();
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            if index.is_file() {
                return Self::open_index(&index);
            }
            let single = path.join(SINGLE_FILE);
            if single.is_file() {
                return Self::open_single(&single);
            }
            return Err(Error::format(
                path,
                "checkpoint",
                format!("neither {INDEX_FILE} nor {SINGLE_FILE} is in this directory"),
            ));
        }
        if path.to_string_lossy().ends_with(".json") {
            Self::open_index(path)
        } else {
            Self::open_single(path)
        }
    }

    fn open_single(path: &Path) -> Result<SafetensorsModel> {
        let file = SafetensorsFile::open(path)?;
        let weight_map = file.tensors().iter().map(|t| (t.name.clone(), 0)).collect();
        Ok(SafetensorsModel {
            source: path.to_path_buf(),
            shards: vec![Shard {
                path: path.to_path_buf(),
                file: OnceLock::from(file),
            }],
            weight_map,
        })
    }

    fn open_index(index: &Path) -> Result<SafetensorsModel> {
        let bad = |msg: String| Error::format(index, "weight_map", msg);
        let len = std::fs::metadata(index)
            .map_err(|e| Error::io(index, e))?
            .len();
        if len > MAX_HEADER_BYTES {
            return Err(Error::format(
                index,
                "file size",
                format!("{len} bytes is over the {MAX_HEADER_BYTES}-byte limit for an index"),
            ));
        }
        let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
        let listed = parse_weight_map(&text).map_err(|e| Error::format(index, "json", e))?;
        let dir = index.parent().unwrap_or(Path::new(""));
        let mut shard_of_file: HashMap<String, usize> = HashMap::new();
        let mut shards = Vec::new();
        let mut weight_map = BTreeMap::new();
        for (tensor, file) in listed {
            if !is_plain_file_name(&file) {
                return Err(bad(format!(
                    "tensor {tensor}: shard {file:?} is not a file name in the model directory"
                )));
            }
            let shard = *shard_of_file.entry(file).or_insert_with_key(|file| {
                shards.push(Shard {
                    path: dir.join(file),
                    file: OnceLock::new(),
                });
                shards.len() - 1
            });
            weight_map.insert(tensor, shard);
        }
        Ok(SafetensorsModel {
            source: index.to_path_buf(),
            shards,
            weight_map,
        })
    }

    /// The index file or the single file the model was opened from.
    pub fn source(&self) -> &Path {
        &self.source
    }
    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(String::as_str)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }
    /// The shard files, in the order the index first names them.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// The shard that holds `name`, mapped on first use; errors when the index lists `name` in a
    /// shard that lacks it.
    pub fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        let &i = self.weight_map.get(name).ok_or_else(|| {
            Error::format(&self.source, format!("tensor {name}"), "no such tensor")
        })?;
        let shard = &self.shards[i];
        let file = match shard.file.get() {
            Some(f) => f,
            None => {
                let opened = SafetensorsFile::open(&shard.path)?;
                // Two threads may both map the shard: the first map stored is kept.
                shard.file.get_or_init(|| opened)
            }
        };
        if file.tensor_info(name).is_none() {
            return Err(Error::format(
                &shard.path,
                format!("tensor {name}"),
                format!("listed by {} but not in this shard", self.source.display()),
            ));
        }
        Ok(file)
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        let file = self.file_of(name)?;
        file.tensor_info(name)
            .ok_or_else(|| Error::format(file.path(), format!("tensor {name}"), "no such tensor"))
    }
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        self.file_of(name)?.tensor_bytes(name)
    }
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        self.file_of(name)?.tensor_f32(name)
    }
    pub fn tensor_i32(&self, name: &str) -> Result<Vec<i32>> {
        self.file_of(name)?.tensor_i32(name)
    }
}

/// A shard name must stay inside the model directory: one normal path component.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(p)), None) if p == name
    )
}

/// The `weight_map` of an index (a repeated tensor name: the last entry wins, as in Python), other
/// keys ignored; typed, so that a hostile index allocates a small multiple of its own size.
fn parse_weight_map(json: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    struct IndexVisitor;
    impl<'de> Visitor<'de> for IndexVisitor {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object with a weight_map")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut weight_map = None;
            while let Some(key) = map.next_key::<String>()? {
                if key == "weight_map" && weight_map.is_none() {
                    weight_map = Some(map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            weight_map.ok_or_else(|| serde::de::Error::missing_field("weight_map"))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let listed = de
        .deserialize_map(IndexVisitor)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(listed)
}
