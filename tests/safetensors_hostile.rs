//! Hostile safetensors input: every case returns an error naming the file and the field, never a
//! panic, and nothing is allocated from an unchecked length.
use eqat::io::safetensors::{serialize, Dtype, SafetensorsFile, MAX_HEADER_BYTES};
use eqat::Rng;
use std::collections::BTreeMap;

const NAME: &str = "hostile.safetensors";

/// A file of header JSON `header` and data `data`.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One tensor entry `x` with the given JSON fields, and `n` data bytes.
fn one(fields: &str, n: usize) -> Vec<u8> {
    file(&format!(r#"{{"x":{{{fields}}}}}"#), &vec![7; n])
}

/// A small valid file: metadata and three tensors of different dtypes.
fn valid_file() -> Vec<u8> {
    let (a, b, c) = ([1u8; 24], [2u8; 6], [3u8; 4]);
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    serialize(
        &[
            ("a", Dtype::F32, &[2, 3], &a),
            ("b", Dtype::BF16, &[3], &b),
            ("c", Dtype::I32, &[1], &c),
        ],
        &metadata,
    )
    .unwrap()
}

/// Reads everything a parsed file offers, as a caller would.
fn read_all(f: &SafetensorsFile) {
    for t in f.tensors() {
        assert_eq!(f.tensor_bytes(&t.name).unwrap().len(), t.n_bytes());
        if let Ok(x) = f.tensor_f32(&t.name) {
            assert_eq!(x.numel(), t.numel());
        }
        if let Ok(x) = f.tensor_i32(&t.name) {
            assert_eq!(x.len(), t.numel());
        }
    }
}

#[test]
fn hostile_headers_are_errors_naming_file_and_field() {
    let utf8 = file("{\"\u{e9}\":1}", &[]);
    let bad_utf8 = utf8
        .iter()
        .map(|&b| if b == 0xc3 { 0xff } else { b })
        .collect();
    let max = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
    let past_end = [&50u64.to_le_bytes()[..], b"{}"].concat();
    let two = |x: &str, y: &str, n| file(&format!(r#"{{"x":{{{x}}},"y":{{{y}}}}}"#), &vec![0; n]);
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("empty file", vec![], "header length", "fewer than the 8-byte"),
        ("7 bytes", vec![2; 7], "header length", "fewer than the 8-byte"),
        ("u64::MAX header", u64::MAX.to_le_bytes().to_vec(), "header length", "limit"),
        ("header over the cap", max, "header length", "limit"),
        ("header past the end", past_end, "header length", "runs past the end"),
        ("truncated JSON", file(r#"{"x":"#, &[]), "header", "EOF"),
        ("not an object", file("[1,2]", &[]), "header", "invalid type"),
        ("bad UTF-8", bad_utf8, "header", "line 1"),
        ("NUL padding", file("{}\0\0", &[]), "header", "trailing characters"),
        ("entry not an object", file(r#"{"x":5}"#, &[]), "header", "tensor x: an object"),
        ("missing dtype", one(r#""shape":[1],"data_offsets":[0,1]"#, 1),
            "header", "tensor x: dtype missing"),
        ("missing shape", one(r#""dtype":"U8","data_offsets":[0,1]"#, 1),
            "header", "tensor x: shape missing"),
        ("missing offsets", one(r#""dtype":"U8","shape":[1]"#, 1),
            "header", "tensor x: data_offsets missing"),
        ("dtype twice", one(r#""dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]"#, 1),
            "header", "tensor x: dtype given twice"),
        ("dtype not a string", one(r#""dtype":4,"shape":[1],"data_offsets":[0,1]"#, 1),
            "header", "invalid type"),
        ("unknown dtype", one(r#""dtype":"Q4_0","shape":[1],"data_offsets":[0,1]"#, 1),
            "tensor x", "unknown dtype \"Q4_0\""),
        ("sub-byte dtype", one(r#""dtype":"F4","shape":[2],"data_offsets":[0,1]"#, 1),
            "tensor x", "unknown dtype \"F4\""),
        ("negative dim", one(r#""dtype":"U8","shape":[-1],"data_offsets":[0,1]"#, 1),
            "header", "invalid"),
        ("float dim", one(r#""dtype":"U8","shape":[1.5],"data_offsets":[0,1]"#, 1),
            "header", "invalid type"),
        ("dim over u64", one(r#""dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]"#, 1),
            "header", "invalid"),
        ("shape not an array", one(r#""dtype":"U8","shape":3,"data_offsets":[0,3]"#, 3),
            "header", "invalid type"),
        ("shape product overflows",
            one(r#""dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]"#, 1),
            "tensor x", "overflows"),
        ("empty shape overflows",
            one(r#""dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]"#, 0),
            "tensor x", "overflows"),
        ("byte size overflows",
            one(r#""dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,1]"#, 1),
            "tensor x", "overflows"),
        ("one offset", one(r#""dtype":"U8","shape":[1],"data_offsets":[0]"#, 1),
            "header", "invalid length 1"),
        ("three offsets", one(r#""dtype":"U8","shape":[1],"data_offsets":[0,1,2]"#, 1),
            "header", "trailing"),
        ("negative offset", one(r#""dtype":"U8","shape":[1],"data_offsets":[-1,0]"#, 1),
            "header", "invalid"),
        ("begin after end", one(r#""dtype":"U8","shape":[1],"data_offsets":[1,0]"#, 1),
            "tensor x", "do not hold"),
        ("size mismatch", one(r#""dtype":"F32","shape":[2],"data_offsets":[0,4]"#, 4),
            "tensor x", "do not hold shape [2] of F32 (8 bytes)"),
        ("offsets past the data", one(r#""dtype":"U8","shape":[4],"data_offsets":[0,4]"#, 3),
            "tensor x", "run past the data section of 3 bytes"),
        ("huge offsets",
            one(r#""dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]"#, 1),
            "tensor x", "run past"),
        ("gap before", one(r#""dtype":"U8","shape":[1],"data_offsets":[1,2]"#, 2),
            "tensor x", "gap after byte 0"),
        ("trailing data", one(r#""dtype":"U8","shape":[1],"data_offsets":[0,1]"#, 2),
            "data", "cover 1 of the 2"),
        ("data without tensors", file("{}", &[0]), "data", "cover 0 of the 1"),
        ("overlap", two(r#""dtype":"U8","shape":[2],"data_offsets":[0,2]"#,
                        r#""dtype":"U8","shape":[2],"data_offsets":[1,3]"#, 3),
            "tensor y", "overlap after byte 2"),
        ("same bytes twice", two(r#""dtype":"U8","shape":[2],"data_offsets":[0,2]"#,
                                 r#""dtype":"U8","shape":[2],"data_offsets":[0,2]"#, 2),
            "tensor ", "overlap"),
        ("duplicate name",
            file(r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},
                     "x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#, &[0; 2]),
            "tensor x", "duplicate tensor name"),
        ("metadata not strings", file(r#"{"__metadata__":{"a":1}}"#, &[]),
            "header", "invalid type: integer"),
        ("metadata not an object", file(r#"{"__metadata__":[]}"#, &[]), "header", "invalid type"),
        ("metadata twice", file(r#"{"__metadata__":{},"__metadata__":{}}"#, &[]),
            "header", "duplicate field"),
    ];
    for (what, bytes, field, said) in cases {
        let err = match SafetensorsFile::from_bytes(NAME, bytes) {
            Ok(_) => panic!("{what}: parsed"),
            Err(e) => e.to_string(),
        };
        let want = format!("{NAME}: {field}");
        assert!(err.starts_with(&want), "{what}: {err}");
        assert!(err.contains(said), "{what}: {err}");
    }
}

#[test]
fn valid_corner_cases_parse() {
    // No tensors; metadata null; extra fields; leading whitespace; an empty tensor with huge dims;
    // an ignored field nested 100k deep (serde_json skips it without recursing).
    let bomb = format!(
        r#"{{"x":{{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":{}{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    for (header, data) in [
        (bomb.as_str(), &[1][..]),
        ("{}", &[][..]),
        (r#"{"__metadata__":null}"#, &[]),
        (
            r#" {"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":{"a":[1,{}]}}}  "#,
            &[1, 2],
        ),
        (
            r#"{"x":{"dtype":"F32","shape":[0,4294967296],"data_offsets":[0,0]}}"#,
            &[],
        ),
    ] {
        let f = SafetensorsFile::from_bytes(NAME, file(header, data)).unwrap();
        read_all(&f);
    }
}

#[test]
fn every_truncated_prefix_is_an_error() {
    let full = valid_file();
    read_all(&SafetensorsFile::from_bytes(NAME, full.clone()).unwrap());
    for len in 0..full.len() {
        match SafetensorsFile::from_bytes(NAME, full[..len].to_vec()) {
            Ok(_) => panic!("prefix of {len} of {} bytes parsed", full.len()),
            Err(e) => assert!(e.to_string().starts_with(NAME), "prefix {len}: {e}"),
        }
    }
}

#[test]
fn random_corruptions_never_panic() {
    let full = valid_file();
    let mut rng = Rng::new(17);
    let mut parsed = 0;
    for _ in 0..5000 {
        let mut bytes = full.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(bytes.len());
            bytes[i] = rng.below(256) as u8;
        }
        match SafetensorsFile::from_bytes(NAME, bytes) {
            Ok(f) => {
                read_all(&f);
                parsed += 1;
            }
            Err(e) => assert!(e.to_string().starts_with(NAME), "{e}"),
        }
    }
    // Flips in the data section and in names leave valid files: both paths were exercised.
    assert!(parsed > 100 && parsed < 4900, "{parsed} of 5000 parsed");
}

#[test]
fn open_names_the_path_of_empty_and_tiny_files() {
    let dir = std::env::temp_dir();
    for (i, bytes) in [&b""[..], b"\x02", b"\x03\0\0\0\0\0\0\0{}"]
        .into_iter()
        .enumerate()
    {
        let path = dir.join(format!(
            "eqat_st_hostile_{}_{i}.safetensors",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.starts_with(&*path.to_string_lossy()), "{err}");
    }
}
