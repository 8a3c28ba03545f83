//! A test-only GGUF writer (v2/v3, little-endian), written from ggml docs/gguf.md independently of
//! the reader: its own type ids, its own offset and padding arithmetic.
#![allow(dead_code)] // each test crate that includes this module uses a different part of it

use eqat::io::gguf::{MetaArray, MetaValue};

pub fn put_u32(out: &mut Vec<u8>, x: u32) {
    out.extend_from_slice(&x.to_le_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// magic, version, tensor_count, metadata_kv_count.
pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    put_u32(&mut out, version);
    put_u64(&mut out, n_tensors);
    put_u64(&mut out, n_kv);
    out
}

fn array_type_id(a: &MetaArray) -> u32 {
    match a {
        MetaArray::U8(_) => 0,
        MetaArray::I8(_) => 1,
        MetaArray::U16(_) => 2,
        MetaArray::I16(_) => 3,
        MetaArray::U32(_) => 4,
        MetaArray::I32(_) => 5,
        MetaArray::F32(_) => 6,
        MetaArray::Bool(_) => 7,
        MetaArray::Str(_) => 8,
        MetaArray::Array(_) => 9,
        MetaArray::U64(_) => 10,
        MetaArray::I64(_) => 11,
        MetaArray::F64(_) => 12,
    }
}

/// The value type id followed by the value.
pub fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    use MetaValue as V;
    let (id, bytes): (u32, Vec<u8>) = match v {
        V::U8(x) => (0, x.to_le_bytes().to_vec()),
        V::I8(x) => (1, x.to_le_bytes().to_vec()),
        V::U16(x) => (2, x.to_le_bytes().to_vec()),
        V::I16(x) => (3, x.to_le_bytes().to_vec()),
        V::U32(x) => (4, x.to_le_bytes().to_vec()),
        V::I32(x) => (5, x.to_le_bytes().to_vec()),
        V::F32(x) => (6, x.to_le_bytes().to_vec()),
        V::Bool(x) => (7, vec![*x as u8]),
        V::Str(s) => {
            let mut b = Vec::new();
            put_str(&mut b, s);
            (8, b)
        }
        V::Array(a) => {
            let mut b = Vec::new();
            put_array(&mut b, a);
            (9, b)
        }
        V::U64(x) => (10, x.to_le_bytes().to_vec()),
        V::I64(x) => (11, x.to_le_bytes().to_vec()),
        V::F64(x) => (12, x.to_le_bytes().to_vec()),
    };
    put_u32(out, id);
    out.extend_from_slice(&bytes);
}

/// Element type id, count, elements.
pub fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    use MetaArray as A;
    put_u32(out, array_type_id(a));
    macro_rules! elems {
        ($v:expr) => {{
            put_u64(out, $v.len() as u64);
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }};
    }
    match a {
        A::U8(v) => elems!(v),
        A::I8(v) => elems!(v),
        A::U16(v) => elems!(v),
        A::I16(v) => elems!(v),
        A::U32(v) => elems!(v),
        A::I32(v) => elems!(v),
        A::F32(v) => elems!(v),
        A::U64(v) => elems!(v),
        A::I64(v) => elems!(v),
        A::F64(v) => elems!(v),
        A::Bool(v) => {
            put_u64(out, v.len() as u64);
            out.extend(v.iter().map(|&b| b as u8));
        }
        A::Str(v) => {
            put_u64(out, v.len() as u64);
            v.iter().for_each(|s| put_str(out, s));
        }
        A::Array(v) => {
            put_u64(out, v.len() as u64);
            v.iter().for_each(|a| put_array(out, a));
        }
    }
}

pub struct WTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
}

pub struct GgufWriter {
    pub version: u32,
    pub kvs: Vec<(String, MetaValue)>,
    pub tensors: Vec<WTensor>,
}

fn pad_to(out: &mut Vec<u8>, align: u64) {
    while !(out.len() as u64).is_multiple_of(align) {
        out.push(0);
    }
}

impl GgufWriter {
    pub fn new(version: u32) -> GgufWriter {
        GgufWriter {
            version,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn kv(mut self, key: &str, v: MetaValue) -> Self {
        self.kvs.push((key.to_string(), v));
        self
    }

    /// `dims` in GGUF (ne) order; `data` the raw bytes of type `type_id`.
    pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(WTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            data,
        });
        self
    }

    pub fn alignment(&self) -> u64 {
        self.kvs
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("general.alignment", MetaValue::U32(a)) => Some(*a as u64),
                _ => None,
            })
            .unwrap_or(32)
    }

    /// Offsets of each tensor from the data start: each tensor padded to the alignment.
    pub fn offsets(&self) -> Vec<u64> {
        let align = self.alignment();
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for t in &self.tensors {
            offsets.push(at);
            at = (at + t.data.len() as u64).div_ceil(align) * align;
        }
        offsets
    }

    /// The file; no padding after the last tensor, so every proper prefix is truncated data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = header(
            self.version,
            self.tensors.len() as u64,
            self.kvs.len() as u64,
        );
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            put_value(&mut out, v);
        }
        for (t, off) in self.tensors.iter().zip(self.offsets()) {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            t.dims.iter().for_each(|&d| put_u64(&mut out, d));
            put_u32(&mut out, t.type_id);
            put_u64(&mut out, off);
        }
        pad_to(&mut out, align);
        for (i, t) in self.tensors.iter().enumerate() {
            out.extend_from_slice(&t.data);
            if i + 1 < self.tensors.len() {
                pad_to(&mut out, align);
            }
        }
        out
    }
}
