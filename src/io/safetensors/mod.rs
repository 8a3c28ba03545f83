//! safetensors reader and writer, and Hugging Face checkpoints (one file or sharded by an index).
//!
//! Layout (huggingface/safetensors README): an 8-byte little-endian header length N, N bytes of
//! UTF-8 JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`
//! (padded with spaces), then the data section; offsets count from its start. Like the reference
//! implementation we require the tensors to tile the data section exactly: no overlap, no gap, no
//! trailing bytes. Tensors are read one at a time, on demand, from the mapping.
mod header;
mod model;
mod write;

pub use header::MAX_HEADER_BYTES;
pub use model::{SafetensorsModel, INDEX_FILE, SINGLE_FILE};
pub use write::{serialize, write_safetensors, TensorRef};

use crate::error::{Error, Result};
use crate::io::ggml_quants::{dequantize, GgmlType};
use crate::io::mmap::FileBytes;
use crate::tensor::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Element types of the format, spelled as in the header. Sub-byte types (F4, F6_*) are not listed:
/// their byte size is not a whole number per element, and such files are refused as unknown dtype.
/// The order is the reference implementation's, which its writer sorts by (our writer too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl Dtype {
    pub const ALL: [Dtype; 19] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::F8E8M0,
        Dtype::F8E4M3Fnuz,
        Dtype::F8E5M2Fnuz,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// The header spelling.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2Fnuz => "F8_E5M2FNUZ",
            Dtype::F8E4M3Fnuz => "F8_E4M3FNUZ",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::C64 => "C64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::Bool
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8E5M2
            | Dtype::F8E4M3
            | Dtype::F8E5M2Fnuz
            | Dtype::F8E4M3Fnuz
            | Dtype::F8E8M0 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::C64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// Bytes of a tensor of `shape`, or None when that overflows. The product of the non-zero
    /// dims must fit too (stricter than the reference), so that no stride or partial product of
    /// an empty tensor's shape can overflow later.
    pub fn byte_size(self, shape: &[usize]) -> Option<usize> {
        let nonzero = shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        let numel = if shape.contains(&0) { 0 } else { nonzero };
        numel.checked_mul(self.size_bytes())
    }

    /// The dequantizer that widens this dtype to f32, for the three float types `tensor_f32` reads.
    fn as_f32_source(self) -> Option<GgmlType> {
        match self {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        }
    }
}

/// One tensor's entry in the header, checked against the data section.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// [begin, end) in bytes from the start of the data section.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// The product of `shape`; the parser checked that it fits in usize.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn n_bytes(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A parsed safetensors file. Tensor data stays in the mapping (or buffer) until asked for.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: FileBytes,
    data_start: usize,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        Self::build(path.to_path_buf(), FileBytes::map(path)?)
    }

    /// Parses a safetensors image held in memory; `name` stands for the file in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<SafetensorsFile> {
        Self::build(name.into(), FileBytes::Owned(bytes))
    }

    fn build(path: PathBuf, bytes: FileBytes) -> Result<SafetensorsFile> {
        let buf: &[u8] = &bytes;
        let p = header::parse(buf, &path)?;
        Ok(SafetensorsFile {
            path,
            bytes,
            data_start: p.data_start,
            tensors: p.tensors,
            index: p.index,
            metadata: p.metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The `__metadata__` map (empty when the header has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }
    /// All tensors in data order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| Error::format(&self.path, format!("tensor {name}"), "no such tensor"))
    }

    /// The raw little-endian bytes of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info_or_err(name)?;
        // In range: the parser checked that the tensors tile the data section.
        let (begin, end) = t.data_offsets;
        Ok(&self.bytes[self.data_start + begin..self.data_start + end])
    }

    /// Tensor `name` (F32, F16 or BF16) widened to an f32 `Tensor` of its shape.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let t = self.info_or_err(name)?;
        let src = t
            .dtype
            .as_f32_source()
            .ok_or_else(|| self.wrong_dtype(t, "F32, F16 or BF16 (a float tensor read as f32)"))?;
        let mut out = vec![0f32; t.numel()];
        dequantize(src, self.tensor_bytes(name)?, &mut out)
            .map_err(|e| Error::format(&self.path, format!("tensor {name}"), e.to_string()))?;
        Tensor::from_vec(&t.shape, out)
    }

    /// Tensor `name` (I32, e.g. GPTQ `qweight`/`qzeros`/`g_idx`) as values in row-major order;
    /// its shape is `tensor_info(name).shape`.
    pub fn tensor_i32(&self, name: &str) -> Result<Vec<i32>> {
        let t = self.info_or_err(name)?;
        if t.dtype != Dtype::I32 {
            return Err(self.wrong_dtype(t, "I32"));
        }
        // from_le_bytes per element: no alignment requirement on the mapping or the buffer.
        Ok(self
            .tensor_bytes(name)?
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn wrong_dtype(&self, t: &TensorInfo, want: &str) -> Error {
        Error::format(
            &self.path,
            format!("tensor {}", t.name),
            format!("dtype is {}, expected {want}", t.dtype.name()),
        )
    }
}
