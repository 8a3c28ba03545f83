//! GGUF reader (versions 2 and 3, little-endian): header, metadata, tensor infos, and tensors
//! dequantized to f32 on demand, over a memory-mapped file or an in-memory buffer.
//!
//! Layout: /work/shared/formats.md §6 and ggml-org/ggml `docs/gguf.md`. GGUF stores dims as ggml's
//! ne[], contiguous dimension first; `TensorInfo::shape` and `tensor_f32` give the numpy/PyTorch order
//! (dims reversed), so `token_embd.weight` with ne = [C, V] becomes a [V, C] tensor.
mod meta;
mod parse;

pub use meta::{MetaArray, MetaValue, ValueType};
pub use parse::{DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS};

use crate::error::{Error, Result};
use crate::io::ggml_quants::{dequantize, GgmlType};
use crate::io::mmap::FileBytes;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor's description from the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml ne[] order: dims[0] is the contiguous dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    numel: usize,
    n_bytes: usize,
}

impl TensorInfo {
    /// The numpy/PyTorch shape: dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Each dim fits: the parser checked that the product of the non-zero dims fits in usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn numel(&self) -> usize {
        self.numel
    }
    /// Bytes of data in the file.
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }
}

/// A parsed GGUF file. Tensor data stays in the file (or buffer) until asked for.
pub struct GgufFile {
    path: PathBuf,
    bytes: FileBytes,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        Self::build(path.to_path_buf(), FileBytes::map(path)?)
    }

    /// Parses a GGUF image held in memory; `name` stands for the file in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::build(name.into(), FileBytes::Owned(bytes))
    }

    fn build(path: PathBuf, bytes: FileBytes) -> Result<GgufFile> {
        let buf: &[u8] = &bytes;
        let p = parse::parse(buf, &path)?;
        Ok(GgufFile {
            path,
            bytes,
            version: p.version,
            alignment: p.alignment,
            data_start: p.data_start,
            metadata: p.metadata,
            meta_index: p.meta_index,
            tensors: p.tensors,
            tensor_index: p.tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// The metadata value under `key`.
    pub fn metadata(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All metadata in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value under `key` through `pick`; errors name the file and key when it is missing or
    /// `pick` refuses its type.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        pick: impl FnOnce(&'a MetaValue) -> Option<T>,
    ) -> Result<T> {
        let v = self
            .metadata(key)
            .ok_or_else(|| Error::format(&self.path, key, "missing metadata key"))?;
        pick(v).ok_or_else(|| {
            Error::format(
                &self.path,
                key,
                format!("expected {want}, found {}", v.type_name()),
            )
        })
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.typed(key, "u32", |v| match v {
            MetaValue::U32(x) => Some(*x),
            _ => None,
        })
    }
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.typed(key, "u64", |v| match v {
            MetaValue::U64(x) => Some(*x),
            _ => None,
        })
    }
    pub fn get_i32(&self, key: &str) -> Result<i32> {
        self.typed(key, "i32", |v| match v {
            MetaValue::I32(x) => Some(*x),
            _ => None,
        })
    }
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.typed(key, "f32", |v| match v {
            MetaValue::F32(x) => Some(*x),
            _ => None,
        })
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "bool", |v| match v {
            MetaValue::Bool(x) => Some(*x),
            _ => None,
        })
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "string", |v| match v {
            MetaValue::Str(s) => Some(s.as_str()),
            _ => None,
        })
    }
    /// Any non-negative integer type that fits in usize (writers differ on u32 vs u64 for counts).
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        self.typed(key, "a non-negative integer", MetaValue::as_usize)
    }
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        self.typed(key, "array[string]", |v| match v {
            MetaValue::Array(MetaArray::Str(a)) => Some(a.as_slice()),
            _ => None,
        })
    }
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        self.typed(key, "array[f32]", |v| match v {
            MetaValue::Array(MetaArray::F32(a)) => Some(a.as_slice()),
            _ => None,
        })
    }
    pub fn get_i32_array(&self, key: &str) -> Result<&[i32]> {
        self.typed(key, "array[i32]", |v| match v {
            MetaValue::Array(MetaArray::I32(a)) => Some(a.as_slice()),
            _ => None,
        })
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| Error::format(&self.path, format!("tensor {name}"), "no such tensor"))
    }

    /// The raw (possibly quantized) bytes of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info_or_err(name)?;
        // In range: the parser checked offset + n_bytes against the data section.
        let start = self.data_start + t.offset as usize;
        Ok(&self.bytes[start..start + t.n_bytes])
    }

    /// Tensor `name` dequantized to f32, in the numpy shape (GGUF dims reversed).
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let t = self.info_or_err(name)?;
        let mut out = vec![0f32; t.numel];
        dequantize(t.ggml_type, self.tensor_bytes(name)?, &mut out)
            .map_err(|e| Error::format(&self.path, format!("tensor {name}"), e.to_string()))?;
        Tensor::from_vec(&t.shape(), out)
    }
}
