//! Raw bytes into the safetensors parser, then every tensor read back (raw, as f32, as i32), and
//! the structured round trip: a file that parses is re-serialized by our writer and must parse to
//! the same tensors and metadata. Must never panic; memory stays bounded by the input (every
//! tensor's bytes lie inside it, and the header's length is checked against it).
//!
//! cargo +nightly fuzz run fuzz_safetensors fuzz/corpus/fuzz_safetensors fuzz/seeds/fuzz_safetensors
//! (new inputs go to the first directory; seeds: fuzz/make_safetensors_seeds.py)
#![no_main]
use eqat::io::safetensors::{serialize, SafetensorsFile, TensorRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let mut tensors: Vec<TensorRef> = Vec::new();
    for t in f.tensors() {
        let bytes = f.tensor_bytes(&t.name).expect("listed tensor has bytes");
        assert_eq!(bytes.len(), t.numel() * t.dtype.size_bytes());
        if let Ok(x) = f.tensor_f32(&t.name) {
            assert_eq!(x.shape(), t.shape.as_slice());
        }
        if let Ok(x) = f.tensor_i32(&t.name) {
            assert_eq!(x.len(), t.numel());
        }
        tensors.push((&t.name, t.dtype, &t.shape, bytes));
    }
    let again = serialize(&tensors, f.metadata()).expect("a parsed file re-serializes");
    let g = SafetensorsFile::from_bytes("again.safetensors", again).expect("our output parses");
    assert_eq!(g.metadata(), f.metadata());
    assert_eq!(g.tensors().len(), f.tensors().len());
    for t in f.tensors() {
        let u = g.tensor_info(&t.name).expect("same names");
        assert_eq!((u.dtype, &u.shape), (t.dtype, &t.shape));
        assert_eq!(g.tensor_bytes(&t.name).unwrap(), f.tensor_bytes(&t.name).unwrap());
    }
});
