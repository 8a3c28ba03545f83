//! Hugging Face checkpoints through `SafetensorsModel`: sharded by an index, or one file.
mod safetensors_util;

use eqat::io::safetensors::{
    write_safetensors, Dtype, SafetensorsModel, TensorRef, INDEX_FILE, SINGLE_FILE,
};
use eqat::Rng;
use safetensors_util::{as_refs, meta, random_bytes, TempDir};
use std::path::Path;

/// Writes `tensors` as shards (a list of tensor-name groups) plus an index into `dir`.
fn write_sharded(dir: &Path, tensors: &[TensorRef], groups: &[&[&str]]) -> Vec<String> {
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
        let part: Vec<TensorRef> = tensors
            .iter()
            .filter(|t| group.contains(&t.0))
            .copied()
            .collect();
        write_safetensors(dir.join(&file), &part, &meta(&[("format", "pt")])).unwrap();
        for name in *group {
            weight_map.insert(name.to_string(), file.clone().into());
        }
        files.push(file);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    files
}

#[test]
fn sharded_checkpoints_map_each_shard_on_first_use() {
    let mut rng = Rng::new(3);
    let names = ["a.weight", "b.weight", "c.weight", "d.qweight", "e.weight"];
    let owned: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let d = if n.ends_with("qweight") {
                Dtype::I32
            } else {
                [Dtype::F32, Dtype::BF16, Dtype::F16][i % 3]
            };
            let shape = vec![i + 1, 3];
            let bytes = random_bytes(d, &shape, &mut rng);
            (n, d, shape, bytes)
        })
        .collect();
    let tensors = as_refs(&owned);
    let dir = TempDir::new("sharded");
    let files = write_sharded(
        &dir.0,
        &tensors,
        &[
            &["a.weight", "d.qweight"],
            &["b.weight"],
            &["c.weight", "e.weight"],
        ],
    );
    let m = SafetensorsModel::open(&dir.0).unwrap();
    assert_eq!(m.source(), dir.0.join(INDEX_FILE));
    assert_eq!(m.tensor_names().collect::<Vec<_>>(), names);
    assert_eq!(m.shard_paths().count(), 3);
    for &(name, dtype, shape, bytes) in &tensors {
        assert_eq!(m.tensor_bytes(name).unwrap(), bytes);
        assert_eq!(m.tensor_info(name).unwrap().shape, shape);
        match dtype {
            Dtype::I32 => assert_eq!(m.tensor_i32(name).unwrap().len() * 4, bytes.len()),
            _ => assert_eq!(m.tensor_f32(name).unwrap().shape(), shape),
        }
    }
    // A missing shard fails only the tensors it holds (shards are opened lazily), naming its path.
    std::fs::remove_file(dir.0.join(&files[1])).unwrap();
    let m = SafetensorsModel::open(&dir.0).unwrap();
    assert!(m.tensor_f32("a.weight").is_ok());
    let err = m.tensor_f32("b.weight").unwrap_err().to_string();
    assert!(err.contains(&files[1]), "{err}");
    // The index opened directly works the same.
    assert!(SafetensorsModel::open(dir.0.join(INDEX_FILE))
        .unwrap()
        .contains("e.weight"));
}

#[test]
fn sharded_index_errors_name_the_file_and_tensor() {
    let bytes = 1f32.to_le_bytes();
    let tensors: Vec<TensorRef> = vec![
        ("x", Dtype::F32, &[1], &bytes),
        ("y", Dtype::F32, &[1], &bytes),
    ];
    let dir = TempDir::new("bad_index");
    write_sharded(&dir.0, &tensors, &[&["x"], &["y"]]);
    let index = dir.0.join(INDEX_FILE);
    // The index claims y lives in the first shard.
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("00002-of", "00001-of");
    std::fs::write(&index, text).unwrap();
    let err = SafetensorsModel::open(&dir.0)
        .unwrap()
        .tensor_f32("y")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model-00001-of-00002.safetensors") && err.contains("tensor y"),
        "{err}"
    );
    assert!(err.contains("not in this shard"), "{err}");
    let err = SafetensorsModel::open(&dir.0)
        .unwrap()
        .tensor_f32("z")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(INDEX_FILE) && err.contains("tensor z"),
        "{err}"
    );
    for (text, said) in [
        (
            r#"{"weight_map": {"x": "../x.safetensors"}}"#,
            "not a file name",
        ),
        (
            r#"{"weight_map": {"x": "/etc/x.safetensors"}}"#,
            "not a file name",
        ),
        (
            r#"{"weight_map": {"x": "sub/x.safetensors"}}"#,
            "not a file name",
        ),
        (r#"{"weight_map": {"x": ""}}"#, "not a file name"),
        (r#"{"metadata": {}}"#, "missing field `weight_map`"),
        (r#"{"weight_map": {"x": 3}}"#, "invalid type"),
        (r#"{"weight_map": "#, "EOF"),
    ] {
        std::fs::write(&index, text).unwrap();
        let err = SafetensorsModel::open(&dir.0)
            .err()
            .expect(text)
            .to_string();
        assert!(
            err.contains(INDEX_FILE) && err.contains(said),
            "{text}: {err}"
        );
    }
}

#[test]
fn single_file_directories_and_missing_checkpoints() {
    let dir = TempDir::new("single");
    let err = SafetensorsModel::open(&dir.0).err().unwrap().to_string();
    assert!(
        err.contains(INDEX_FILE) && err.contains(SINGLE_FILE),
        "{err}"
    );
    let bytes: Vec<u8> = [1.0f32, -2.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write_safetensors(
        dir.0.join(SINGLE_FILE),
        &[("w", Dtype::F32, &[2], &bytes)],
        &meta(&[]),
    )
    .unwrap();
    for m in [
        SafetensorsModel::open(&dir.0).unwrap(),
        SafetensorsModel::open(dir.0.join(SINGLE_FILE)).unwrap(),
    ] {
        assert_eq!(m.source(), dir.0.join(SINGLE_FILE));
        assert_eq!(m.tensor_f32("w").unwrap().f32s("t").unwrap(), &[1.0, -2.0]);
    }
}
