//! The GGUF parser over a byte slice, shared by the mmap and the in-memory entry points.
//!
//! Hostile input is the normal case: every count, length and offset is checked against the bytes
//! that are left BEFORE anything is allocated or sliced, with checked arithmetic, so a claimed
//! string length of 2^60 fails instead of allocating, and no allocation exceeds a small multiple of
//! the bytes actually present. Every failure names the file and the field.
use super::meta::{MetaArray, MetaValue, ValueType};
use super::TensorInfo;
use crate::error::{Error, Result};
use crate::io::ggml_quants::GgmlType;
use std::collections::HashMap;
use std::fmt::Display;
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest array nesting accepted. Real files nest none (llama.cpp refuses arrays of arrays); the cap
/// keeps a nesting bomb from exhausting the stack.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;
/// Key and tensor name limits from ggml docs/gguf.md.
const MAX_KEY_LEN: u64 = 65535;
const MAX_TENSOR_NAME_LEN: u64 = 64;
/// Fewest bytes of one KV pair (key length, value type, a 1-byte value) and of one tensor info
/// (name length, n_dims, ggml type, offset).
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

/// Everything the header, metadata and tensor infos say.
pub(super) struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub data_start: usize,
    pub metadata: Vec<(String, MetaValue)>,
    pub meta_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, field: &str, msg: impl Display) -> Error {
        Error::format(self.path, field, format!("{msg} (at byte {})", self.pos))
    }

    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, field: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            let msg = format!("needs {n} bytes, {} left: truncated file", self.left());
            return Err(self.err(field, msg));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn bytes<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let b = self.take(N as u64, field)?;
        Ok(b.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(field)?))
    }

    fn string(&mut self, field: &str, max_len: u64) -> Result<String> {
        let len = self.u64(field)?;
        if len > max_len {
            return Err(self.err(field, format!("string length {len} exceeds {max_len}")));
        }
        let b = self.take(len, field)?;
        String::from_utf8(b.to_vec())
            .map_err(|e| self.err(field, format!("string is not UTF-8: {e}")))
    }

    /// `count` items of at least `min_size` bytes each must fit in what is left; returns the count.
    fn count(&self, count: u64, min_size: u64, field: &str, what: &str) -> Result<usize> {
        match count.checked_mul(min_size) {
            Some(need) if need <= self.left() => Ok(count as usize),
            _ => Err(self.err(
                field,
                format!(
                    "{count} {what} of at least {min_size} bytes each do not fit in the {} bytes left",
                    self.left()
                ),
            )),
        }
    }

    /// `n` fixed-width little-endian values.
    fn fixed<T, const N: usize>(
        &mut self,
        n: usize,
        field: &str,
        conv: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let b = self.take(n as u64 * N as u64, field)?;
        Ok(b.chunks_exact(N)
            .map(|c| conv(c.try_into().expect("chunks_exact yields N bytes")))
            .collect())
    }

    fn bool(&mut self, field: &str) -> Result<bool> {
        match self.bytes::<1>(field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(field, format!("bool byte is {b}, not 0 or 1"))),
        }
    }

    fn value_type(&mut self, field: &str) -> Result<ValueType> {
        let id = self.u32(field)?;
        ValueType::from_id(id).ok_or_else(|| self.err(field, format!("unknown value type {id}")))
    }

    fn value(&mut self, ty: ValueType, field: &str) -> Result<MetaValue> {
        use MetaValue as V;
        Ok(match ty {
            ValueType::U8 => V::U8(self.bytes::<1>(field)?[0]),
            ValueType::I8 => V::I8(i8::from_le_bytes(self.bytes(field)?)),
            ValueType::U16 => V::U16(u16::from_le_bytes(self.bytes(field)?)),
            ValueType::I16 => V::I16(i16::from_le_bytes(self.bytes(field)?)),
            ValueType::U32 => V::U32(self.u32(field)?),
            ValueType::I32 => V::I32(i32::from_le_bytes(self.bytes(field)?)),
            ValueType::F32 => V::F32(f32::from_le_bytes(self.bytes(field)?)),
            ValueType::Bool => V::Bool(self.bool(field)?),
            ValueType::Str => V::Str(self.string(field, u64::MAX)?),
            ValueType::Array => V::Array(self.array(field, 1)?),
            ValueType::U64 => V::U64(self.u64(field)?),
            ValueType::I64 => V::I64(i64::from_le_bytes(self.bytes(field)?)),
            ValueType::F64 => V::F64(f64::from_le_bytes(self.bytes(field)?)),
        })
    }

    /// An array at nesting level `depth` (1 for an array that is itself the value).
    fn array(&mut self, field: &str, depth: usize) -> Result<MetaArray> {
        if depth > MAX_ARRAY_DEPTH {
            let msg = format!("arrays nested deeper than {MAX_ARRAY_DEPTH}");
            return Err(self.err(field, msg));
        }
        let ty = self.value_type(field)?;
        let n = self.u64(field)?;
        let n = self.count(n, ty.min_size(), field, "array elements")?;
        use MetaArray as A;
        Ok(match ty {
            ValueType::U8 => A::U8(self.take(n as u64, field)?.to_vec()),
            ValueType::I8 => A::I8(self.fixed(n, field, i8::from_le_bytes)?),
            ValueType::U16 => A::U16(self.fixed(n, field, u16::from_le_bytes)?),
            ValueType::I16 => A::I16(self.fixed(n, field, i16::from_le_bytes)?),
            ValueType::U32 => A::U32(self.fixed(n, field, u32::from_le_bytes)?),
            ValueType::I32 => A::I32(self.fixed(n, field, i32::from_le_bytes)?),
            ValueType::F32 => A::F32(self.fixed(n, field, f32::from_le_bytes)?),
            ValueType::U64 => A::U64(self.fixed(n, field, u64::from_le_bytes)?),
            ValueType::I64 => A::I64(self.fixed(n, field, i64::from_le_bytes)?),
            ValueType::F64 => A::F64(self.fixed(n, field, f64::from_le_bytes)?),
            ValueType::Bool => A::Bool((0..n).map(|_| self.bool(field)).collect::<Result<_>>()?),
            ValueType::Str => A::Str(
                (0..n)
                    .map(|_| self.string(field, u64::MAX))
                    .collect::<Result<_>>()?,
            ),
            ValueType::Array => A::Array(
                (0..n)
                    .map(|_| self.array(field, depth + 1))
                    .collect::<Result<_>>()?,
            ),
        })
    }

    fn tensor_info(&mut self, i: usize, alignment: u64) -> Result<TensorInfo> {
        let name = self.string(&format!("tensor_infos[{i}].name"), MAX_TENSOR_NAME_LEN)?;
        let field = format!("tensor {name}");
        let n_dims = self.u32(&field)?;
        if n_dims > MAX_DIMS {
            return Err(self.err(&field, format!("n_dims {n_dims} exceeds {MAX_DIMS}")));
        }
        let dims = self.fixed(n_dims as usize, &field, u64::from_le_bytes)?;
        let type_id = self.u32(&field)?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| self.err(&field, format!("unknown ggml type id {type_id}")))?;
        let offset = self.u64(&field)?;
        // Products over every non-zero dim must fit, so that no ordering of the shape overflows.
        let overflow = || self.err(&field, format!("dims {dims:?} overflow"));
        let mut nonzero_product = 1u64;
        for &d in &dims {
            if d > i64::MAX as u64 {
                return Err(overflow());
            }
            nonzero_product = nonzero_product.checked_mul(d.max(1)).ok_or_else(overflow)?;
        }
        usize::try_from(nonzero_product).map_err(|_| overflow())?;
        let numel = dims.iter().product::<u64>() as usize;
        let (bs, ts) = (ggml_type.block_size(), ggml_type.type_size());
        let ne0 = dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(bs as u64) {
            let msg = format!(
                "ne[0] = {ne0} is not a multiple of the {} block size {bs}",
                ggml_type.name()
            );
            return Err(self.err(&field, msg));
        }
        let n_bytes = (numel / bs).checked_mul(ts).ok_or_else(overflow)?;
        if !offset.is_multiple_of(alignment) {
            let msg =
                format!("data offset {offset} is not a multiple of the alignment {alignment}");
            return Err(self.err(&field, msg));
        }
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            numel,
            n_bytes,
        })
    }
}

fn parse_header(c: &mut Cursor) -> Result<(u32, u64, u64)> {
    let magic = c.bytes::<4>("magic")?;
    if &magic != MAGIC {
        let msg = format!(
            "expected \"GGUF\", found {:?}",
            magic.escape_ascii().to_string()
        );
        return Err(c.err("magic", msg));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            let msg = "unsupported GGUF version 1 (32-bit counts); re-convert the model with a current llama.cpp";
            return Err(c.err("version", msg));
        }
        v if (2..=3).contains(&v.swap_bytes()) => {
            return Err(c.err("version", "big-endian GGUF files are not supported"));
        }
        v => {
            let msg = format!("unsupported GGUF version {v} (this reader handles 2 and 3)");
            return Err(c.err("version", msg));
        }
    }
    let tensor_count = c.u64("tensor_count")?;
    let kv_count = c.u64("metadata_kv_count")?;
    Ok((version, tensor_count, kv_count))
}

pub(super) fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, path };
    let (version, tensor_count, kv_count) = parse_header(&mut c)?;

    let kv_count = c.count(kv_count, MIN_KV_SIZE, "metadata_kv_count", "metadata pairs")?;
    let mut metadata = Vec::with_capacity(kv_count);
    let mut meta_index = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = c.string(&format!("metadata[{i}].key"), MAX_KEY_LEN)?;
        let ty = c.value_type(&key)?;
        let value = c.value(ty, &key)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(c.err(&key, "duplicate metadata key"));
        }
        metadata.push((key, value));
    }

    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(&MetaValue::U32(a)) if a.is_power_of_two() => a as u64,
        Some(v) => {
            let msg = format!("must be a u32 power of two, found {v:?}");
            return Err(Error::format(path, "general.alignment", msg));
        }
    };

    let tensor_count = c.count(
        tensor_count,
        MIN_TENSOR_INFO_SIZE,
        "tensor_count",
        "tensor infos",
    )?;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut tensor_index = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let info = c.tensor_info(i, alignment)?;
        if tensor_index
            .insert(info.name.clone(), tensors.len())
            .is_some()
        {
            return Err(c.err(&format!("tensor {}", info.name), "duplicate tensor name"));
        }
        tensors.push(info);
    }

    // The data section starts at the next multiple of the alignment (absent in a file without tensors).
    let pos = c.pos as u64;
    let data_start = pos.div_ceil(alignment) * alignment;
    let data_len = (buf.len() as u64).saturating_sub(data_start);
    check_data_ranges(&tensors, data_start, data_len, path)?;
    Ok(Parsed {
        version,
        alignment,
        data_start: data_start.min(buf.len() as u64) as usize,
        metadata,
        meta_index,
        tensors,
        tensor_index,
    })
}

/// Every tensor's bytes lie inside the data section, and no two tensors overlap.
fn check_data_ranges(tensors: &[TensorInfo], start: u64, len: u64, path: &Path) -> Result<()> {
    for t in tensors {
        if t.offset
            .checked_add(t.n_bytes as u64)
            .is_none_or(|end| end > len)
        {
            let msg = format!(
                "data [{}, {}+{}) runs past the end of the data section ({len} bytes from byte {start})",
                t.offset, t.offset, t.n_bytes
            );
            return Err(Error::format(path, format!("tensor {}", t.name), msg));
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for w in by_offset.windows(2) {
        if w[1].offset < w[0].offset + w[0].n_bytes as u64 {
            let msg = format!(
                "data at offset {} overlaps tensor {} (offset {}, {} bytes)",
                w[1].offset, w[0].name, w[0].offset, w[0].n_bytes
            );
            return Err(Error::format(path, format!("tensor {}", w[1].name), msg));
        }
    }
    Ok(())
}
