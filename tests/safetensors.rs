//! safetensors files: agreement with the reference implementation (Python `safetensors`) both
//! ways, round trips of every dtype through the file and the in-memory paths, typed reads, and the
//! writer's refusals and atomic replace. Sharded checkpoints: tests/safetensors_model.rs.
mod safetensors_util;

use eqat::io::safetensors::{serialize, write_safetensors, Dtype, SafetensorsFile, TensorRef};
use eqat::Rng;
use half::{bf16, f16};
use safetensors_util::{as_refs, meta, random_bytes, Owned, TempDir};
use std::collections::BTreeMap;
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/safetensors");

/// make_fixtures.py's `ramp`: multiples of 1/8, exact in f16 and bf16.
fn ramp(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.125)
        .collect()
}

fn le_bytes<const N: usize, T: Copy>(xs: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    xs.iter().flat_map(|&x| f(x)).collect()
}

/// The tensors of make_fixtures.py, as (name, dtype, shape, bytes).
fn python_fixture_tensors() -> Owned {
    let f16s: Vec<f16> = ramp(24).into_iter().map(f16::from_f32).collect();
    let bf16s: Vec<bf16> = ramp(7).into_iter().map(bf16::from_f32).collect();
    let i32s = [i32::MIN, i32::MAX, 0, -1, 1, 123456789, -987654321, 42];
    vec![
        (
            "w.f32",
            Dtype::F32,
            vec![3, 5],
            le_bytes(&ramp(15), f32::to_le_bytes),
        ),
        (
            "w.f16",
            Dtype::F16,
            vec![2, 3, 4],
            le_bytes(&f16s, f16::to_le_bytes),
        ),
        (
            "w.bf16",
            Dtype::BF16,
            vec![7],
            le_bytes(&bf16s, bf16::to_le_bytes),
        ),
        (
            "q.i32",
            Dtype::I32,
            vec![4, 2],
            le_bytes(&i32s, i32::to_le_bytes),
        ),
        (
            "q.i64",
            Dtype::I64,
            vec![3],
            le_bytes(&[i64::MIN, i64::MAX, 5], i64::to_le_bytes),
        ),
        ("q.u8", Dtype::U8, vec![5], vec![0, 1, 127, 128, 255]),
        (
            "q.i8",
            Dtype::I8,
            vec![5],
            le_bytes(&[-128i8, -1, 0, 1, 127], i8::to_le_bytes),
        ),
        ("m.bool", Dtype::Bool, vec![4], vec![1, 0, 0, 1]),
        ("s.f32", Dtype::F32, vec![], 3.25f32.to_le_bytes().to_vec()),
        ("e.f32", Dtype::F32, vec![0, 3], vec![]),
        (
            "d.f64",
            Dtype::F64,
            vec![2],
            le_bytes(&[0.1f64, -2.5], f64::to_le_bytes),
        ),
    ]
}

#[test]
fn reads_the_python_written_fixture() {
    let path = Path::new(FIXTURES).join("python_written.safetensors");
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(
        f.metadata(),
        &meta(&[("format", "pt"), ("producer", "make_fixtures.py")])
    );
    let want = python_fixture_tensors();
    assert_eq!(f.tensors().len(), want.len());
    for (name, dtype, shape, bytes) in &want {
        let info = f.tensor_info(name).unwrap();
        assert_eq!((info.dtype, &info.shape), (*dtype, shape), "{name}");
        assert_eq!(f.tensor_bytes(name).unwrap(), bytes.as_slice(), "{name}");
    }
    // Typed reads: the float tensors as f32, the I32 tensor as i32.
    let f32_of = |name| f.tensor_f32(name).unwrap().f32s("test").unwrap().to_vec();
    assert_eq!(f32_of("w.f32"), ramp(15));
    assert_eq!(f32_of("w.f16"), ramp(24));
    assert_eq!(f32_of("w.bf16"), ramp(7));
    assert_eq!(f32_of("s.f32"), vec![3.25]);
    assert!(f32_of("e.f32").is_empty());
    assert_eq!(f.tensor_f32("w.f16").unwrap().shape(), &[2, 3, 4]);
    assert_eq!(
        f.tensor_i32("q.i32").unwrap(),
        vec![i32::MIN, i32::MAX, 0, -1, 1, 123456789, -987654321, 42]
    );
}

#[test]
fn writer_reproduces_the_python_bytes() {
    let python = std::fs::read(Path::new(FIXTURES).join("python_written.safetensors")).unwrap();
    let owned = python_fixture_tensors();
    let tensors = as_refs(&owned);
    let metadata = meta(&[("format", "pt"), ("producer", "make_fixtures.py")]);
    assert!(serialize(&tensors, &metadata).unwrap() == python);
    let dir = TempDir::new("python_bytes");
    let path = dir.0.join("ours.safetensors");
    write_safetensors(&path, &tensors, &metadata).unwrap();
    assert!(std::fs::read(&path).unwrap() == python);
}

/// One tensor of every dtype plus awkward names and metadata: the committed rust_written.safetensors,
/// which Python reads back in check_rust_written.py.
fn rust_fixture_tensors() -> Owned {
    let mut out: Vec<_> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(k, &d)| {
            let bytes = (0..6 * d.size_bytes()).map(|i| ((i * 37 + k * 11) % 256) as u8);
            (d.name(), d, vec![2, 3], bytes.collect())
        })
        .collect();
    out.push((
        "quote\"name",
        Dtype::F32,
        vec![],
        1.5f32.to_le_bytes().to_vec(),
    ));
    out.push(("ünï/cöde", Dtype::F16, vec![0, 4], vec![]));
    out
}

#[test]
fn writer_output_is_the_committed_fixture_python_reads() {
    // Python agrees: `python3 tests/fixtures/safetensors/check_rust_written.py` printed
    // "rust_written.safetensors: 21 tensors and the metadata match (safetensors 0.8.0)".
    // EQAT_BLESS=1 rewrites the fixture from the writer (then rerun the Python check).
    let path = Path::new(FIXTURES).join("rust_written.safetensors");
    let metadata = meta(&[("format", "pt"), ("ünï", "välue \"q\"")]);
    let owned = rust_fixture_tensors();
    let ours = serialize(&as_refs(&owned), &metadata).unwrap();
    if std::env::var_os("EQAT_BLESS").is_some() {
        std::fs::write(&path, &ours).unwrap();
    }
    assert!(
        ours == std::fs::read(&path).unwrap(),
        "writer output changed"
    );
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.metadata(), &metadata);
    for (name, dtype, shape, bytes) in rust_fixture_tensors() {
        let info = f.tensor_info(name).unwrap();
        assert_eq!((info.dtype, info.shape.clone()), (dtype, shape));
        assert_eq!(f.tensor_bytes(name).unwrap(), bytes.as_slice());
    }
}

#[test]
fn every_dtype_round_trips_through_file_and_memory() {
    let mut rng = Rng::new(11);
    let shapes: [&[usize]; 5] = [&[], &[1], &[7], &[3, 5], &[2, 0, 4]];
    let mut owned = Vec::new();
    for (k, &d) in Dtype::ALL.iter().enumerate() {
        let shape = shapes[k % shapes.len()].to_vec();
        let bytes = random_bytes(d, &shape, &mut rng);
        owned.push((d.name(), d, shape, bytes));
    }
    let tensors = as_refs(&owned);
    let metadata = meta(&[("a", "1"), ("empty", "")]);
    let dir = TempDir::new("round_trip");
    let path = dir.0.join("all.safetensors");
    write_safetensors(&path, &tensors, &metadata).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mapped = SafetensorsFile::open(&path).unwrap();
    let in_memory = SafetensorsFile::from_bytes("all.safetensors", bytes).unwrap();
    for f in [&mapped, &in_memory] {
        assert_eq!(f.metadata(), &metadata);
        assert_eq!(f.data_start() % 8, 0, "header padded to 8 bytes");
        for &(name, dtype, shape, bytes) in &tensors {
            let info = f.tensor_info(name).unwrap();
            assert_eq!((info.dtype, info.shape.as_slice()), (dtype, shape));
            assert_eq!(info.numel() * dtype.size_bytes(), info.n_bytes());
            assert_eq!(info.data_offsets.0 % dtype.size_bytes(), 0, "aligned");
            assert_eq!(f.tensor_bytes(name).unwrap(), bytes);
        }
    }
}

#[test]
fn floats_widen_to_f32_bit_exactly_and_i32_reads_values() {
    let mut rng = Rng::new(5);
    let shape = [13, 9];
    let raw: BTreeMap<Dtype, Vec<u8>> = [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::I32]
        .into_iter()
        .map(|d| (d, random_bytes(d, &shape, &mut rng)))
        .collect();
    let tensors: Vec<TensorRef> = raw
        .iter()
        .map(|(d, b)| (d.name(), *d, &shape[..], b.as_slice()))
        .collect();
    let f = SafetensorsFile::from_bytes("f.safetensors", serialize(&tensors, &meta(&[])).unwrap())
        .unwrap();
    let pairs = |d: Dtype| raw[&d].chunks_exact(d.size_bytes()).map(|c| c.to_vec());
    let want: Vec<(Dtype, Vec<f32>)> = vec![
        (
            Dtype::F32,
            pairs(Dtype::F32)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        (
            Dtype::F16,
            pairs(Dtype::F16)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        (
            Dtype::BF16,
            pairs(Dtype::BF16)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
    ];
    for (d, want) in want {
        let got = f.tensor_f32(d.name()).unwrap();
        assert_eq!(got.shape(), &shape);
        let same = |a: &f32, b: &f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let got = got.f32s("test").unwrap();
        assert!(
            got.iter().zip(&want).all(|(a, b)| same(a, b)),
            "{}",
            d.name()
        );
    }
    let i32s: Vec<i32> = pairs(Dtype::I32)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(f.tensor_i32("I32").unwrap(), i32s);
}

#[test]
fn typed_reads_refuse_other_dtypes_and_unknown_names() {
    let f = SafetensorsFile::open(Path::new(FIXTURES).join("python_written.safetensors")).unwrap();
    for (err, field, said) in [
        (
            f.tensor_f32("q.i32").err(),
            "tensor q.i32",
            "dtype is I32, expected F32, F16 or BF16",
        ),
        (f.tensor_f32("d.f64").err(), "tensor d.f64", "dtype is F64"),
        (
            f.tensor_i32("w.f32").err(),
            "tensor w.f32",
            "dtype is F32, expected I32",
        ),
        (
            f.tensor_i32("q.i64").err(),
            "tensor q.i64",
            "dtype is I64, expected I32",
        ),
        (
            f.tensor_bytes("nope").err(),
            "tensor nope",
            "no such tensor",
        ),
    ] {
        let msg = err.expect("an error").to_string();
        assert!(msg.contains("python_written.safetensors"), "{msg}");
        assert!(msg.contains(field) && msg.contains(said), "{msg}");
    }
}

#[test]
fn writer_refuses_bad_tensors_and_replaces_files_atomically() {
    let dir = TempDir::new("writer");
    let path = dir.0.join("w.safetensors");
    let four = [0u8; 4];
    write_safetensors(&path, &[("old", Dtype::F32, &[1], &four)], &meta(&[])).unwrap();
    let before = std::fs::read(&path).unwrap();
    let (huge, empty_huge) = ([usize::MAX, 2], [0, usize::MAX, 2]);
    for (tensors, said) in [
        (
            vec![("t", Dtype::F32, &[2][..], &four[..])],
            "tensor t: shape [2] of F32 needs 8 bytes, got 4",
        ),
        (
            vec![("t", Dtype::U8, &huge[..], &four[..])],
            "needs more than usize::MAX bytes",
        ),
        // Empty, but the reader refuses it (its non-zero dims overflow), so the writer does too.
        (
            vec![("t", Dtype::U8, &empty_huge[..], &[][..])],
            "needs more than usize::MAX bytes",
        ),
        (
            vec![
                ("t", Dtype::U8, &[4][..], &four[..]),
                ("t", Dtype::U8, &[4][..], &four[..]),
            ],
            "duplicate name",
        ),
        (
            vec![("__metadata__", Dtype::U8, &[4][..], &four[..])],
            "reserved",
        ),
    ] {
        let err = write_safetensors(&path, &tensors, &meta(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(said), "{err}");
    }
    // Failed writes left the old file and no temporary files.
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    // A successful write replaces it; a write into a missing directory fails with its path.
    write_safetensors(&path, &[("new", Dtype::U8, &[4], &four)], &meta(&[])).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    assert!(f.tensor_info("new").is_some() && f.tensor_info("old").is_none());
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    let missing = dir.0.join("no/such/dir/x.safetensors");
    let err = write_safetensors(&missing, &[], &meta(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/such/dir/x.safetensors"), "{err}");
}
