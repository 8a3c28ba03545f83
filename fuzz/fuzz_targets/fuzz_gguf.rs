//! Raw bytes into the GGUF parser, then every metadata value and every tensor read back.
//! Must never panic; memory stays bounded by the input (the parser checks every count against it).
//!
//! cargo +nightly fuzz run fuzz_gguf fuzz/seeds/fuzz_gguf   (seeds: fuzz/make_seeds.py)
#![no_main]
use eqat::io::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

/// Tensors past this many weights are not dequantized: a 4 KiB input of Q4_0 can still describe
/// ~7k weights, so this cap only bounds what the target itself allocates per run.
const MAX_WEIGHTS: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for (key, value) in f.metadata_entries() {
        let _ = (key.len(), value.type_name(), value.as_usize());
    }
    let _ = f.get_str_array("tokenizer.ggml.tokens");
    let _ = f.get_u32("llama.block_count");
    for t in f.tensors() {
        assert_eq!(t.shape().len(), t.dims.len());
        let bytes = f.tensor_bytes(&t.name).expect("listed tensor has bytes");
        assert_eq!(bytes.len(), t.n_bytes());
        if t.numel() <= MAX_WEIGHTS {
            if let Ok(x) = f.tensor_f32(&t.name) {
                assert_eq!(x.numel(), t.numel());
            }
        }
    }
});
