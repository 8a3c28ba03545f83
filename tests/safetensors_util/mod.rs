//! Helpers shared by the safetensors tests.
use eqat::io::safetensors::{Dtype, TensorRef};
use eqat::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Tensors owned by a test: (name, dtype, shape, bytes).
pub type Owned = Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>;

/// A fresh empty directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("eqat_st_{tag}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
pub fn as_refs(ts: &Owned) -> Vec<TensorRef<'_>> {
    ts.iter()
        .map(|(n, d, s, b)| (*n, *d, s.as_slice(), b.as_slice()))
        .collect()
}

/// Random raw bytes for `shape` of `dtype` (NaN and inf bit patterns included for floats).
pub fn random_bytes(dtype: Dtype, shape: &[usize], rng: &mut Rng) -> Vec<u8> {
    let n: usize = shape.iter().product::<usize>() * dtype.size_bytes();
    (0..n).map(|_| rng.below(256) as u8).collect()
}
