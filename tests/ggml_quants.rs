//! Dequantization against gguf-py golden values.
//!
//! Fixtures: tests/fixtures/ggml_quants/<type>.blocks (raw blocks) and <type>.f32 (gguf-py's
//! `gguf.quants.dequantize` of those blocks), made by
//! `python3 tests/fixtures/ggml_quants/make_fixtures.py` with gguf 0.19.0 and numpy 2.4.
//! The comparison is bit-exact: gguf-py, ggml's dequantize_row_* and ours perform the same f32
//! operations in the same order (f16 -> f32 is exact, products and sums are not fused), so there is
//! no rounding freedom to tolerate.
use eqat::io::ggml_quants::{dequantize, GgmlType};
use std::path::PathBuf;

const TYPES: [(GgmlType, &str); 11] = [
    (GgmlType::F32, "f32"),
    (GgmlType::F16, "f16"),
    (GgmlType::BF16, "bf16"),
    (GgmlType::Q4_0, "q4_0"),
    (GgmlType::Q4_1, "q4_1"),
    (GgmlType::Q5_0, "q5_0"),
    (GgmlType::Q5_1, "q5_1"),
    (GgmlType::Q8_0, "q8_0"),
    (GgmlType::Q4K, "q4_k"),
    (GgmlType::Q5K, "q5_k"),
    (GgmlType::Q6K, "q6_k"),
];

fn fixture(name: &str) -> (Vec<u8>, Vec<f32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml_quants");
    let read = |ext: &str| {
        let p = dir.join(format!("{name}.{ext}"));
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let want = read("f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (read("blocks"), want)
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<_> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        let pairs: Vec<_> = bad.iter().take(5).map(|&i| (i, got[i], want[i])).collect();
        panic!(
            "{what}: {} of {} values differ; first at {i}; (index, got, want): {pairs:?}",
            bad.len(),
            got.len()
        );
    }
}

#[test]
fn dequantize_matches_gguf_py_for_every_type() {
    for (ty, name) in TYPES {
        let (blocks, want) = fixture(name);
        assert!(ty.can_dequantize(), "{name}");
        assert_eq!(blocks.len() % ty.type_size(), 0, "{name}: fixture size");
        let mut got = vec![f32::NAN; want.len()];
        dequantize(ty, &blocks, &mut got).unwrap();
        assert_bits_eq(name, &got, &want);
    }
}

#[test]
fn dequantize_unaligned_bytes_matches() {
    // A byte buffer that starts one byte off a 2-byte boundary takes the copying path.
    for (ty, name) in TYPES {
        let (blocks, want) = fixture(name);
        let mut shifted = vec![0u8; blocks.len() + 1];
        shifted[1..].copy_from_slice(&blocks);
        let mut got = vec![f32::NAN; want.len()];
        dequantize(ty, &shifted[1..], &mut got).unwrap();
        assert_bits_eq(name, &got, &want);
    }
}

#[test]
fn dequantize_many_blocks_across_parallel_tasks() {
    // 300k weights: several rayon tasks, each block landing where the sequential order puts it.
    for (ty, name) in TYPES {
        let (blocks, want) = fixture(name);
        let reps = 300_000 / want.len() + 1;
        let mut got = vec![f32::NAN; want.len() * reps];
        dequantize(ty, &blocks.repeat(reps), &mut got).unwrap();
        for (r, chunk) in got.chunks_exact(want.len()).enumerate() {
            assert_bits_eq(&format!("{name} repeat {r}"), chunk, &want);
        }
    }
}

#[test]
fn dequantize_rejects_bad_lengths_and_unsupported_types() {
    let mut y = vec![0f32; 32];
    let err = dequantize(GgmlType::Q4_1, &[0u8; 19], &mut y)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Q4_1") && err.contains("20 bytes"), "{err}");
    let mut y = vec![0f32; 33];
    let err = dequantize(GgmlType::Q8_0, &[0u8; 34], &mut y)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Q8_0") && err.contains("33 weights"), "{err}");
    let mut y = vec![0f32; 256];
    let err = dequantize(GgmlType::Q2K, &[0u8; 84], &mut y)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Q2_K") && err.contains("not implemented"),
        "{err}"
    );
}

#[test]
fn ggml_type_table_ids_round_trip() {
    for id in 0..64 {
        if let Some(t) = GgmlType::from_id(id) {
            assert_eq!(t.id(), id);
        }
    }
    assert_eq!(GgmlType::from_id(12), Some(GgmlType::Q4K));
    assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
    // 4 and 5 were Q4_2 and Q4_3, removed from ggml.
    assert_eq!(GgmlType::from_id(4), None);
    assert_eq!(GgmlType::Q6K.name(), "Q6_K");
    assert_eq!(
        (GgmlType::Q5K.block_size(), GgmlType::Q5K.type_size()),
        (256, 176)
    );
}
