//! Hostile GGUF input: every case must return an error naming the file and the field, never panic
//! and never allocate from an unchecked count.
mod gguf_writer;

use eqat::io::gguf::{GgufFile, MetaArray, MetaValue};
use gguf_writer::{header, put_str, put_u32, put_u64, GgufWriter};

const NAME: &str = "hostile.gguf";

/// A small valid file: metadata of several types and three tensors.
fn valid_file() -> Vec<u8> {
    GgufWriter::new(3)
        .kv("general.architecture", MetaValue::Str("llama".into()))
        .kv("general.alignment", MetaValue::U32(16))
        .kv(
            "a.str",
            MetaValue::Array(MetaArray::Str(vec!["ab".into(), "c".into()])),
        )
        .kv("a.f32", MetaValue::Array(MetaArray::F32(vec![1.0, 2.0])))
        .kv("b", MetaValue::Bool(true))
        .tensor("t.f32", &[3, 2], 0, vec![7; 24])
        .tensor("t.q8_0", &[32], 8, vec![1; 34])
        .tensor("t.q4_1", &[32], 3, vec![2; 20])
        .to_bytes()
}

#[test]
fn every_truncated_prefix_is_an_error() {
    let full = valid_file();
    let f = GgufFile::from_bytes(NAME, full.clone()).unwrap();
    for t in f.tensors() {
        f.tensor_f32(&t.name).unwrap();
    }
    for len in 0..full.len() {
        match GgufFile::from_bytes(NAME, full[..len].to_vec()) {
            Ok(_) => panic!("prefix of {len} of {} bytes parsed", full.len()),
            Err(e) => assert!(e.to_string().starts_with(NAME), "prefix {len}: {e}"),
        }
    }
}

#[test]
fn open_refuses_empty_and_tiny_files() {
    let dir = std::env::temp_dir();
    for (i, bytes) in [&b""[..], b"G", b"GGUF\x03\0\0"].into_iter().enumerate() {
        let path = dir.join(format!("eqat_hostile_{}_{i}.gguf", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let err = GgufFile::open(&path).err().unwrap().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains(&*path.to_string_lossy()), "{err}");
    }
}

/// A header and one KV pair whose key is `key`, value type `ty` and value bytes `value`.
fn one_kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut out = header(3, 0, 1);
    put_str(&mut out, key);
    put_u32(&mut out, ty);
    out.extend_from_slice(value);
    out
}

/// A header with no metadata and one tensor info (name, dims, ggml type, offset), then `data`.
fn one_tensor(dims: &[u64], ty: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut out = header(3, 1, 0);
    put_str(&mut out, "w");
    put_u32(&mut out, dims.len() as u32);
    dims.iter().for_each(|&d| put_u64(&mut out, d));
    put_u32(&mut out, ty);
    put_u64(&mut out, offset);
    out.resize(out.len().div_ceil(32) * 32 + data_len, 0);
    out
}

fn u64s(xs: &[u64]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn nesting_bomb(depth: usize) -> Vec<u8> {
    // array of (array of (... of one empty u8 array)), each level count 1
    let mut v = Vec::new();
    for _ in 0..depth {
        put_u32(&mut v, 9);
        put_u64(&mut v, 1);
    }
    put_u32(&mut v, 0);
    put_u64(&mut v, 0);
    v
}

#[test]
fn hostile_inputs_are_errors_naming_file_and_field() {
    let mut big_endian = b"GGUF".to_vec();
    big_endian.extend_from_slice(&3u32.to_be_bytes());
    big_endian.extend_from_slice(&[0; 16]);
    let mut huge_key = header(3, 0, 1);
    put_u64(&mut huge_key, 1 << 60);
    huge_key.resize(64, 0);
    let mut long_name = header(3, 1, 0);
    put_str(&mut long_name, &"n".repeat(65));
    long_name.resize(200, 0);
    let two = |a: u64, b: u64| {
        let w = GgufWriter::new(3)
            .tensor("a", &[16], 0, vec![0; 64])
            .tensor("b", &[16], 0, vec![0; 64]);
        let mut bytes = w.to_bytes();
        // Patch the offsets: 24 header bytes, then infos of 33 bytes that end with the u64 offset.
        for (i, off) in [a, b].into_iter().enumerate() {
            let end = 24 + 33 * (i + 1);
            bytes[end - 8..end].copy_from_slice(&off.to_le_bytes());
        }
        bytes
    };
    let dup_key = {
        let mut b = header(3, 0, 2);
        for _ in 0..2 {
            put_str(&mut b, "k");
            put_u32(&mut b, 0);
            b.push(1);
        }
        b
    };
    let dup_tensor = GgufWriter::new(3)
        .tensor("w", &[1], 0, vec![0; 4])
        .tensor("w", &[1], 0, vec![0; 4])
        .to_bytes();
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "bad magic",
            b"GGML\x03\0\0\0".to_vec(),
            "magic",
            "expected \"GGUF\"",
        ),
        (
            "version 1",
            header(1, 0, 0),
            "version",
            "unsupported GGUF version 1",
        ),
        (
            "version 4",
            header(4, 0, 0),
            "version",
            "unsupported GGUF version 4",
        ),
        ("big-endian", big_endian, "version", "big-endian"),
        (
            "huge tensor count",
            header(3, u64::MAX, 0),
            "tensor_count",
            "do not fit",
        ),
        (
            "huge kv count",
            header(3, 0, 1 << 62),
            "metadata_kv_count",
            "do not fit",
        ),
        (
            "huge key length",
            huge_key,
            "metadata[0].key",
            "exceeds 65535",
        ),
        (
            "huge string",
            one_kv("s", 8, &u64s(&[1 << 60])),
            "s",
            "truncated",
        ),
        (
            "string u64::MAX",
            one_kv("s", 8, &u64s(&[u64::MAX])),
            "s",
            "truncated",
        ),
        (
            "huge array",
            one_kv(
                "a",
                9,
                &[&4u32.to_le_bytes()[..], &u64s(&[1 << 62])].concat(),
            ),
            "a",
            "do not fit",
        ),
        (
            "array count overflow",
            one_kv(
                "a",
                9,
                &[&10u32.to_le_bytes()[..], &u64s(&[u64::MAX])].concat(),
            ),
            "a",
            "do not fit",
        ),
        (
            "unknown value type",
            one_kv("k", 13, &[0; 8]),
            "k",
            "unknown value type 13",
        ),
        (
            "unknown array type",
            one_kv("k", 9, &[99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            "k",
            "unknown value type 99",
        ),
        ("bool 2", one_kv("k", 7, &[2]), "k", "not 0 or 1"),
        (
            "bad utf-8",
            one_kv("k", 8, &[&u64s(&[2])[..], &[0xff, 0xfe]].concat()),
            "k",
            "UTF-8",
        ),
        (
            "nesting bomb",
            one_kv("deep", 9, &nesting_bomb(10_000)),
            "deep",
            "nested deeper",
        ),
        (
            "alignment 0",
            one_kv("general.alignment", 4, &0u32.to_le_bytes()),
            "general.alignment",
            "power of two",
        ),
        (
            "alignment 48",
            one_kv("general.alignment", 4, &48u32.to_le_bytes()),
            "general.alignment",
            "power of two",
        ),
        (
            "alignment as u64",
            one_kv("general.alignment", 10, &u64s(&[32])),
            "general.alignment",
            "u32",
        ),
        ("duplicate key", dup_key, "k", "duplicate"),
        ("duplicate tensor", dup_tensor, "tensor w", "duplicate"),
        (
            "long tensor name",
            long_name,
            "tensor_infos[0].name",
            "exceeds 64",
        ),
        (
            "5 dims",
            one_tensor(&[1; 5], 0, 0, 4),
            "tensor w",
            "n_dims 5",
        ),
        (
            "unknown ggml type",
            one_tensor(&[32], 4, 0, 32),
            "tensor w",
            "unknown ggml type id 4",
        ),
        (
            "ggml type 1000",
            one_tensor(&[32], 1000, 0, 32),
            "tensor w",
            "unknown ggml type id 1000",
        ),
        (
            "dims overflow",
            one_tensor(&[1 << 32, 1 << 32, 2], 0, 0, 0),
            "tensor w",
            "overflow",
        ),
        (
            "dim past i64",
            one_tensor(&[1 << 63], 0, 0, 0),
            "tensor w",
            "overflow",
        ),
        (
            "zero dim hides overflow",
            one_tensor(&[1 << 40, 1 << 40, 0], 0, 0, 0),
            "tensor w",
            "overflow",
        ),
        (
            "bytes overflow",
            one_tensor(&[1 << 62], 0, 0, 0),
            "tensor w",
            "overflow",
        ),
        (
            "partial block",
            one_tensor(&[16], 2, 0, 32),
            "tensor w",
            "not a multiple of the Q4_0 block size 32",
        ),
        (
            "misaligned offset",
            one_tensor(&[1], 0, 4, 64),
            "tensor w",
            "not a multiple of the alignment 32",
        ),
        (
            "offset past end",
            one_tensor(&[1], 0, 1 << 40, 64),
            "tensor w",
            "past the end",
        ),
        (
            "offset + size overflows",
            one_tensor(&[8], 0, u64::MAX - 31, 64),
            "tensor w",
            "past the end",
        ),
        (
            "data past end",
            one_tensor(&[17], 0, 0, 64),
            "tensor w",
            "past the end",
        ),
        ("overlap", two(0, 0), "tensor", "overlaps"),
        (
            "overlap partial",
            two(32, 0),
            "tensor a",
            "overlaps tensor b",
        ),
    ];
    for (case, bytes, field, msg) in cases {
        let err = match GgufFile::from_bytes(NAME, bytes) {
            Ok(_) => panic!("{case}: parsed"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.starts_with(&format!("{NAME}: {field}")),
            "{case}: {err}"
        );
        assert!(err.contains(msg), "{case}: {err}");
    }
}

#[test]
fn sanity_of_the_hostile_builders() {
    // The builders make valid files when given valid values, so the cases above fail for the
    // reason they name.
    assert!(GgufFile::from_bytes(NAME, one_kv("k", 7, &[1])).is_ok());
    assert!(
        GgufFile::from_bytes(NAME, one_kv("general.alignment", 4, &64u32.to_le_bytes())).is_ok()
    );
    assert!(GgufFile::from_bytes(NAME, one_kv("deep", 9, &nesting_bomb(3))).is_ok());
    let f = GgufFile::from_bytes(NAME, one_tensor(&[16], 0, 0, 64)).unwrap();
    assert_eq!(f.tensor_f32("w").unwrap().shape(), [16]);
}
