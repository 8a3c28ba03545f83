//! The header: length prefix, JSON, and the checks that tie each entry to the data section.
//!
//! The JSON goes through serde visitors straight into typed entries (no `serde_json::Value` tree,
//! whose nodes cost 32 bytes per 2-byte `0,`), so parsing a hostile header allocates a small
//! multiple of its length, and the length itself is capped and checked against the file.
use super::{Dtype, TensorInfo};
use crate::error::{Error, Result};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

/// The largest header accepted: the reference implementation's limit (real headers, even of
/// models with thousands of tensors, are well under 1 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

pub(super) struct Parsed {
    pub data_start: usize,
    /// Sorted by data offset.
    pub tensors: Vec<TensorInfo>,
    pub index: HashMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
}

pub(super) fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let bad = |field: &str, msg: String| Error::format(path, field, msg);
    let Some(len_bytes) = buf.first_chunk::<8>() else {
        return Err(bad(
            "header length",
            format!(
                "file has {} bytes, fewer than the 8-byte header length",
                buf.len()
            ),
        ));
    };
    let n = u64::from_le_bytes(*len_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(bad(
            "header length",
            format!("{n} bytes is over the {MAX_HEADER_BYTES}-byte limit"),
        ));
    }
    let rest = buf.len() - 8;
    if n > rest as u64 {
        return Err(bad(
            "header length",
            format!("{n} bytes runs past the end of the file ({rest} bytes follow it)"),
        ));
    }
    let data_start = 8 + n as usize;
    let raw = parse_json(&buf[8..data_start]).map_err(|e| bad("header", e.to_string()))?;
    let (tensors, index) = check_entries(raw.entries, buf.len() - data_start, path)?;
    Ok(Parsed {
        data_start,
        tensors,
        index,
        metadata: raw.metadata,
    })
}

/// Checks every entry (known dtype, shape product and byte size without overflow, offsets that
/// hold exactly dtype × shape) and that, in offset order, the entries tile `data_len` bytes.
fn check_entries(
    entries: Vec<(String, RawEntry)>,
    data_len: usize,
    path: &Path,
) -> Result<(Vec<TensorInfo>, HashMap<String, usize>)> {
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, e) in entries {
        let bad = |msg: String| Error::format(path, format!("tensor {name}"), msg);
        let dtype = Dtype::from_name(&e.dtype).ok_or_else(|| {
            let known: Vec<&str> = Dtype::ALL.iter().map(|d| d.name()).collect();
            let shown: String = e.dtype.chars().take(40).collect();
            bad(format!(
                "unknown dtype {shown:?} (known: {})",
                known.join(", ")
            ))
        })?;
        let shape = e
            .shape
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad(format!("shape {:?} has a dim over usize", e.shape)))?;
        let n_bytes = dtype
            .byte_size(&shape)
            .ok_or_else(|| bad(format!("shape {shape:?} of {} overflows", dtype.name())))?;
        let [begin, end] = e.data_offsets;
        let in_data = |x: u64| usize::try_from(x).ok().filter(|&x| x <= data_len);
        let (Some(begin), Some(end)) = (in_data(begin), in_data(end)) else {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] run past the data section of {data_len} bytes"
            )));
        };
        if begin > end || end - begin != n_bytes {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] do not hold shape {shape:?} of {} ({n_bytes} bytes)",
                dtype.name()
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape,
            data_offsets: (begin, end),
        });
    }
    tensors.sort_by_key(|t| t.data_offsets);
    let mut covered = 0;
    for t in &tensors {
        let (begin, end) = t.data_offsets;
        if begin != covered {
            let what = if begin < covered { "overlap" } else { "gap" };
            return Err(Error::format(
                path,
                format!("tensor {}", t.name),
                format!("data_offsets [{begin}, {end}]: {what} after byte {covered} of the data"),
            ));
        }
        covered = end;
    }
    if covered != data_len {
        return Err(Error::format(
            path,
            "data",
            format!("tensors cover {covered} of the {data_len} data bytes"),
        ));
    }
    let mut index = HashMap::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if index.insert(t.name.clone(), i).is_some() {
            return Err(Error::format(
                path,
                format!("tensor {}", t.name),
                "duplicate tensor name",
            ));
        }
    }
    Ok((tensors, index))
}

struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

struct RawHeader {
    /// In header order; duplicates are caught after sorting.
    entries: Vec<(String, RawEntry)>,
    metadata: BTreeMap<String, String>,
}

fn parse_json(json: &[u8]) -> serde_json::Result<RawHeader> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw = de.deserialize_map(HeaderVisitor)?;
    de.end()?;
    Ok(raw)
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
        let mut entries = Vec::new();
        let mut metadata = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if metadata.is_some() {
                    return Err(de::Error::duplicate_field("__metadata__"));
                }
                let m: Option<BTreeMap<String, String>> = map.next_value()?;
                metadata = Some(m.unwrap_or_default());
            } else {
                let entry = map.next_value_seed(EntrySeed(&key))?;
                entries.push((key, entry));
            }
        }
        Ok(RawHeader {
            entries,
            metadata: metadata.unwrap_or_default(),
        })
    }
}

/// Reads one tensor entry; the name only goes into error messages.
struct EntrySeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = RawEntry;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<RawEntry, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_> {
    type Value = RawEntry;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "tensor {}: an object with dtype, shape and data_offsets",
            self.0
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawEntry, A::Error> {
        let (mut dtype, mut shape, mut data_offsets) = (None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "dtype" if dtype.is_none() => dtype = Some(map.next_value()?),
                "shape" if shape.is_none() => shape = Some(map.next_value()?),
                "data_offsets" if data_offsets.is_none() => data_offsets = Some(map.next_value()?),
                "dtype" | "shape" | "data_offsets" => {
                    let msg = format!("tensor {}: {key} given twice", self.0);
                    return Err(de::Error::custom(msg));
                }
                // Other keys are allowed, as by the reference reader.
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let missing = |name| de::Error::custom(format!("tensor {}: {name} missing", self.0));
        Ok(RawEntry {
            dtype: dtype.ok_or_else(|| missing("dtype"))?,
            shape: shape.ok_or_else(|| missing("shape"))?,
            data_offsets: data_offsets.ok_or_else(|| missing("data_offsets"))?,
        })
    }
}
