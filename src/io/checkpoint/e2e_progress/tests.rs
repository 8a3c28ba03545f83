use super::*;
use crate::io::checkpoint::RunIdentity;
use crate::model::llama::LlamaConfig;
use crate::ops::rope::RopeLayout;
use crate::quant::fake_quant::QuantConfig;
use crate::tensor::rng::Rng;
use serde_json::json;

/// Two blocks of hidden 8 (FFN 12): scales of [8|4|12, 2|3] at groups of 4.
fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden: 8,
        intermediate: 12,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        n_layers: 2,
        vocab: 10,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_layout: RopeLayout::HalfSplit,
        tie_embeddings: true,
        attn_bias: false,
    }
}

/// A fresh checkpoint directory `name` at `wbits`, groups of 4.
fn checkpoint(name: &str, wbits: u32) -> CheckpointDir {
    let dir = std::env::temp_dir().join(format!("eqat-e2e-progress-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = RunIdentity {
        source: "tiny".into(),
        quant: QuantConfig::new(wbits, 4).unwrap(),
        recipe: json!({}),
    };
    CheckpointDir::create_or_resume(&dir, &tiny_config(), &run, false).unwrap()
}

fn identity(total_steps: usize) -> E2eIdentity {
    E2eIdentity {
        settings: json!({"e2e_lr": 1e-5, "e2e_batch": 4, "e2e_data_sha256": "ab12"}),
        total_steps,
    }
}

/// Random scales and moments after 3 steps; the model's last scale has not been stepped yet (no moments).
fn progress(ckpt: &CheckpointDir) -> E2eProgress {
    let mut rng = Rng::new(7);
    let slots = ckpt.scale_slots().unwrap();
    let last = slots.len() - 1;
    let (mut scales, mut params) = (Vec::new(), Vec::new());
    for (i, slot) in slots.iter().enumerate() {
        let s = Tensor::randn(&slot.shape, 0.1, &mut rng);
        params.push(match i {
            _ if i == last => ParamState::default(),
            _ => ParamState {
                step: 3,
                m: rng.normal_vec(s.numel(), 1e-3),
                v: rng.normal_vec(s.numel(), 1e-6),
            },
        });
        scales.push(s);
    }
    E2eProgress {
        losses: vec![5.25, 5.0, 4.875],
        scales,
        adamw: AdamWState { steps: 3, params },
    }
}

fn err(ckpt: &CheckpointDir, id: &E2eIdentity) -> String {
    ckpt.load_e2e_progress(id).unwrap_err().to_string()
}

/// Rewrites the progress file with `edit` applied to its tensors and metadata.
fn rewrite(
    ckpt: &CheckpointDir,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>, &mut BTreeMap<String, String>),
) {
    let path = ckpt.e2e_progress_path();
    let f = SafetensorsFile::from_bytes(&path, std::fs::read(&path).unwrap()).unwrap();
    let mut tensors: Vec<_> = f
        .tensors()
        .iter()
        .map(|t| {
            let bytes = f.tensor_bytes(&t.name).unwrap().to_vec();
            (t.name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let mut md = f.metadata().clone();
    edit(&mut tensors, &mut md);
    let refs: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| (n.as_str(), Dtype::F32, s.as_slice(), b.as_slice()))
        .collect();
    write_safetensors(&path, &refs, &md).unwrap();
}

#[test]
fn progress_round_trips_and_no_file_is_none() {
    let ckpt = checkpoint("round-trip", 3);
    assert_eq!(ckpt.load_e2e_progress(&identity(4)).unwrap(), None);
    let p = progress(&ckpt);
    ckpt.save_e2e_progress(&p, &identity(4)).unwrap();
    // A save killed before its rename left its temporary file; the next load removes it, and only it.
    let unfinished = ckpt.dir().join(".e2e_progress.safetensors.4242.0.tmp");
    let other = ckpt.dir().join(".head.safetensors.4242.0.tmp");
    std::fs::write(&unfinished, b"half").unwrap();
    std::fs::write(&other, b"half").unwrap();
    assert_eq!(ckpt.load_e2e_progress(&identity(4)).unwrap(), Some(p));
    assert!(!unfinished.exists() && other.exists());
    std::fs::remove_dir_all(ckpt.dir()).unwrap();
}

#[test]
fn every_truncation_of_the_file_is_an_error_naming_it() {
    let ckpt = checkpoint("truncated", 3);
    ckpt.save_e2e_progress(&progress(&ckpt), &identity(4))
        .unwrap();
    let path = ckpt.e2e_progress_path();
    let bytes = std::fs::read(&path).unwrap();
    let name = path.display().to_string();
    for len in (0..bytes.len())
        .step_by(bytes.len() / 97)
        .chain([bytes.len() - 1])
    {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let e = err(&ckpt, &identity(4));
        assert!(
            e.contains(&name),
            "cut to {len} of {} bytes: {e}",
            bytes.len()
        );
    }
    std::fs::remove_dir_all(ckpt.dir()).unwrap();
}

#[test]
fn progress_of_another_run_is_refused_naming_the_setting_and_the_flag() {
    let at3 = checkpoint("other-run-w3", 3);
    at3.save_e2e_progress(&progress(&at3), &identity(4))
        .unwrap();
    let name = at3.e2e_progress_path().display().to_string();
    let other_lr = E2eIdentity {
        settings: json!({"e2e_lr": 2e-5, "e2e_batch": 4, "e2e_data_sha256": "ab12"}),
        total_steps: 4,
    };
    let e = err(&at3, &other_lr);
    assert!(e.contains(&name) && e.contains("e2e_lr (--e2e-lr)"), "{e}");
    let other_data = E2eIdentity {
        settings: json!({"e2e_lr": 1e-5, "e2e_batch": 4, "e2e_data_sha256": "cd34"}),
        total_steps: 4,
    };
    let e = err(&at3, &other_data);
    assert!(e.contains("e2e_data_sha256 (--e2e-data"), "{e}");
    // More steps done than this run makes.
    let e = err(&at3, &identity(2));
    assert!(e.contains(&name) && e.contains("tensor losses"), "{e}");

    // The same file in a 2-bit run's directory.
    let at2 = checkpoint("other-run-w2", 2);
    std::fs::copy(at3.e2e_progress_path(), at2.e2e_progress_path()).unwrap();
    let e = err(&at2, &identity(4));
    assert!(
        e.contains(&at2.e2e_progress_path().display().to_string())
            && e.contains("wbits (--wbits)")
            && e.contains("saved with 3, this run asks for 2"),
        "{e}"
    );
    std::fs::remove_dir_all(at3.dir()).unwrap();
    std::fs::remove_dir_all(at2.dir()).unwrap();
}

#[test]
fn damaged_contents_are_errors_naming_the_field() {
    type Edit = fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>, &mut BTreeMap<String, String>);
    let cases: [(&str, Edit); 9] = [
        ("format", |_, md| {
            md.insert("format".into(), "eqat-checkpoint".into());
        }),
        ("adamw_steps", |_, md| {
            md.insert("adamw_steps".into(), "2".into());
        }),
        ("adamw_steps", |_, md| {
            md.remove("adamw_steps");
        }),
        ("adamw_param_steps", |_, md| {
            md.insert("adamw_param_steps".into(), "[3, 3".into());
        }),
        ("adamw_param_steps", |_, md| {
            md.insert("adamw_param_steps".into(), "[4]".into());
        }),
        ("settings", |_, md| {
            md.insert("settings".into(), "[1]".into());
        }),
        ("tensor model.layers.1.mlp.down_proj.scales", |t, _| {
            let s = t
                .iter_mut()
                .find(|t| t.0.ends_with("1.mlp.down_proj.scales"))
                .unwrap();
            s.2[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        }),
        ("tensor model.layers.0.self_attn.q_proj.adamw_v", |t, _| {
            let v = t
                .iter_mut()
                .find(|t| t.0.ends_with("0.self_attn.q_proj.adamw_v"))
                .unwrap();
            v.1 = vec![4, 4];
        }),
        ("tensors", |t, _| {
            t.push((
                "model.layers.1.mlp.down_proj.adamw_m".into(),
                vec![1],
                vec![0; 4],
            ));
        }),
    ];
    let ckpt = checkpoint("damaged", 3);
    let p = progress(&ckpt);
    for (field, edit) in cases {
        ckpt.save_e2e_progress(&p, &identity(4)).unwrap();
        rewrite(&ckpt, edit);
        let e = err(&ckpt, &identity(4));
        let name = ckpt.e2e_progress_path().display().to_string();
        assert!(e.contains(&format!("{name}: {field}")), "{field}: {e}");
    }
    std::fs::remove_dir_all(ckpt.dir()).unwrap();
}
