//! Our checkpoint: a directory written block by block, so an interrupted run resumes after its last finished
//! block and ends with the same bytes as an uninterrupted one.
//!
//! ```text
//! DIR/eqat.json                 {"format": "eqat-checkpoint", "format_version": 1, source, wbits, group_size,
//!                                 n_layers, recipe, blocks: [{index, train_loss, val_losses, epochs}]} — rewritten
//!                                 atomically after each block; `blocks` says how many block files are complete
//! DIR/config.json               the model's HF-style config with a `quantization_config`
//! DIR/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)   the source model's tokenizer
//! DIR/blocks/layer_NNNN.safetensors   one block: norms (F32) and, per linear `model.layers.N.<module>`,
//!                                 qweight (U32 [out, ⌈in/per-word⌉], EQAT ten-per-word at 3 bits),
//!                                 qzeros (U8 [out, groups]), scales (F32 [out, groups]); step and validation
//!                                 losses and epochs_run in metadata
//! DIR/e2e_progress.safetensors   E2E-QP's scales, AdamW state and losses so far, saved during the phase so that
//!                                 a killed run continues it (e2e_progress.rs)
//! ```
//! Every file is written to a temporary name and renamed, so a crash never leaves half a file.
mod e2e_progress;
mod open;
mod validate;

use crate::error::{Error, Result};
use crate::io::safetensors::{write_safetensors, Dtype, SafetensorsFile};
use crate::model::llama::LlamaConfig;
use crate::model::quantized::{QuantizedBlock, QuantizedModel};
use crate::quant::fake_quant::QuantConfig;
use crate::quant::pack::{unpack_cols, PackLayout};
use crate::quant::real_quant::QuantizedLinear;
use crate::tensor::Tensor;
use crate::train::pipeline::{BlockRecord, BlockSink};
pub use open::{checkpoint_tokenizer, open_checkpoint, open_checkpoint_model, read_meta};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use validate::{check_meta, check_same_run, tensor_bytes_checked};

pub const FORMAT: &str = "eqat-checkpoint";
pub const FORMAT_VERSION: u64 = 1;
const MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

pub struct CheckpointDir {
    dir: PathBuf,
    meta: Value,
    cfg: LlamaConfig,
    quant: QuantConfig,
}

/// What identifies a run: resuming refuses a checkpoint whose run differs.
#[derive(Clone, Debug)]
pub struct RunIdentity {
    pub source: String,
    pub quant: QuantConfig,
    /// Every setting that changes the result (learning rates, samples, seed, ...), as JSON.
    pub recipe: Value,
}

impl CheckpointDir {
    /// Starts a new checkpoint in `dir` (created if needed). Refuses a directory that already holds one, unless
    /// `resume` is set and the stored run matches `run`; then continues after its finished blocks.
    pub fn create_or_resume(
        dir: &Path,
        cfg: &LlamaConfig,
        run: &RunIdentity,
        resume: bool,
    ) -> Result<Self> {
        let meta_path = dir.join("eqat.json");
        if meta_path.exists() {
            if !resume {
                return Err(Error::invalid(
                    "checkpoint",
                    format!("{} already holds a checkpoint; pass --resume to continue it or choose another --out", dir.display()),
                ));
            }
            let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
            let meta: Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&meta_path, "json", e.to_string()))?;
            check_same_run(&meta_path, &meta, run, cfg)?;
            return Ok(CheckpointDir {
                dir: dir.to_path_buf(),
                meta,
                cfg: cfg.clone(),
                quant: run.quant,
            });
        }
        if resume {
            return Err(Error::invalid(
                "checkpoint",
                format!(
                    "--resume: {} holds no checkpoint (no eqat.json)",
                    dir.display()
                ),
            ));
        }
        std::fs::create_dir_all(dir.join("blocks")).map_err(|e| Error::io(dir, e))?;
        let meta = json!({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "eqat_version": env!("CARGO_PKG_VERSION"),
            "source": run.source,
            "wbits": run.quant.wbits,
            "group_size": run.quant.group_size,
            "n_layers": cfg.n_layers,
            "recipe": run.recipe,
            "blocks": [],
        });
        write_atomic(
            &dir.join("config.json"),
            &serde_json::to_vec_pretty(&hf_config(cfg, run.quant))?,
        )?;
        let ckpt = CheckpointDir {
            dir: dir.to_path_buf(),
            meta,
            cfg: cfg.clone(),
            quant: run.quant,
        };
        ckpt.write_meta()?;
        Ok(ckpt)
    }

    /// Opens a finished checkpoint for reading, with the model configuration of its source model.
    pub fn open(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let meta = read_meta(dir)?;
        let quant = check_meta(&dir.join("eqat.json"), &meta, cfg)?;
        Ok(CheckpointDir {
            dir: dir.to_path_buf(),
            meta,
            cfg: cfg.clone(),
            quant,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_meta(&self) -> Result<()> {
        write_atomic(
            &self.dir.join("eqat.json"),
            &serde_json::to_vec_pretty(&self.meta)?,
        )
    }

    /// Writes the resident tensors (embedding, final norm, untied output head) so the directory is a whole model.
    pub fn save_head(&self, model: &QuantizedModel) -> Result<()> {
        let mut owned = vec![
            ("model.embed_tokens.weight".to_string(), &model.embedding),
            ("model.norm.weight".to_string(), &model.final_norm),
        ];
        if let Some(h) = &model.lm_head {
            owned.push(("lm_head.weight".to_string(), h));
        }
        write_f32_tensors(&self.dir.join("head.safetensors"), &owned, &BTreeMap::new())
    }

    /// Writes the scales E2E-QP trained (integer weights and zeros are unchanged) and its losses.
    pub fn save_e2e_scales(&mut self, blocks: &[QuantizedBlock], losses: &[f32]) -> Result<()> {
        let mut owned = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            for (m, l) in MODULES.iter().zip(&b.linears) {
                owned.push((format!("model.layers.{i}.{m}.scales"), l.scales()));
            }
        }
        let mut md = BTreeMap::new();
        md.insert("step_losses".to_string(), serde_json::to_string(losses)?);
        write_f32_tensors(&self.dir.join("e2e_scales.safetensors"), &owned, &md)?;
        self.meta["e2e"] = json!({"steps": losses.len(), "final_loss": losses.last()});
        self.write_meta()
    }

    /// The quantized model in this directory: every block, the head, and E2E-QP's scales when present.
    pub fn load_model(&self) -> Result<QuantizedModel> {
        let n = self.cfg.n_layers;
        if self.blocks_done() != n {
            return Err(Error::format(
                self.dir.join("eqat.json"),
                "blocks",
                format!(
                    "{} of {n} blocks are finished; resume the run first",
                    self.blocks_done()
                ),
            ));
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            blocks.push(self.load_block(i)?.block);
        }
        let e2e = self.dir.join("e2e_scales.safetensors");
        if e2e.exists() {
            let f = SafetensorsFile::open(&e2e)?;
            for (i, b) in blocks.iter_mut().enumerate() {
                for (m, l) in MODULES.iter().zip(b.linears.iter_mut()) {
                    let name = format!("model.layers.{i}.{m}.scales");
                    let shape = [l.out_features(), l.groups()];
                    tensor_bytes_checked(&f, &name, Dtype::F32, &shape)?;
                    l.set_scales(f.tensor_f32(&name)?).map_err(|e| {
                        Error::format(&e2e, format!("tensor {name}"), e.to_string())
                    })?;
                }
            }
        }
        let head_path = self.dir.join("head.safetensors");
        if !head_path.is_file() {
            let msg = "missing: the run stopped before it finished; resume it first";
            return Err(Error::format(head_path, "checkpoint", msg));
        }
        let head = SafetensorsFile::open(head_path)?;
        let (v, c) = (self.cfg.vocab, self.cfg.hidden);
        let read = |name: &str, shape: &[usize]| -> Result<Tensor> {
            tensor_bytes_checked(&head, name, Dtype::F32, shape)?;
            head.tensor_f32(name)
        };
        Ok(QuantizedModel {
            cfg: self.cfg.clone(),
            embedding: read("model.embed_tokens.weight", &[v, c])?,
            final_norm: read("model.norm.weight", &[c])?,
            lm_head: if head.tensor_info("lm_head.weight").is_some() {
                Some(read("lm_head.weight", &[v, c])?)
            } else {
                None
            },
            blocks,
            path: self.dir.clone(),
        })
    }

    /// The source model recorded when the run started (its tokenizer serves the checkpoint).
    pub fn source(&self) -> Option<&str> {
        self.meta["source"].as_str()
    }

    /// A block file's `epochs_run`; files written before early stop existed lack it, and trained every epoch of
    /// the recipe.
    fn epochs_run(&self, f: &SafetensorsFile, path: &Path) -> Result<usize> {
        match f.metadata().get("epochs_run") {
            Some(text) => text
                .parse()
                .map_err(|e| Error::format(path, "epochs_run", format!("{text:?}: {e}"))),
            None => self.meta["recipe"]["epochs"]
                .as_u64()
                .map(|e| e as usize)
                .ok_or_else(|| Error::format(path, "epochs_run", "missing, and no recipe.epochs")),
        }
    }

    fn block_path(&self, i: usize) -> PathBuf {
        self.dir
            .join("blocks")
            .join(format!("layer_{i:04}.safetensors"))
    }
}

impl BlockSink for CheckpointDir {
    fn save_block(&mut self, i: usize, record: &BlockRecord) -> Result<()> {
        if i != self.blocks_done() {
            return Err(Error::invalid(
                "checkpoint",
                format!("block {i} saved out of order"),
            ));
        }
        let b = &record.block;
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                format!("model.layers.{i}.input_layernorm.weight"),
                Dtype::F32,
                b.attn_norm.shape().to_vec(),
                f32_bytes(&b.attn_norm)?,
            ),
            (
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                Dtype::F32,
                b.ffn_norm.shape().to_vec(),
                f32_bytes(&b.ffn_norm)?,
            ),
        ];
        for (m, l) in MODULES.iter().zip(&b.linears) {
            let p = format!("model.layers.{i}.{m}");
            let words = l.qweight();
            owned.push((
                format!("{p}.qweight"),
                Dtype::U32,
                vec![l.out_features(), words.len() / l.out_features()],
                bytemuck::cast_slice(words).to_vec(),
            ));
            owned.push((
                format!("{p}.qzeros"),
                Dtype::U8,
                vec![l.out_features(), l.groups()],
                l.zeros().to_vec(),
            ));
            owned.push((
                format!("{p}.scales"),
                Dtype::F32,
                l.scales().shape().to_vec(),
                f32_bytes(l.scales())?,
            ));
        }
        let refs: Vec<_> = owned
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
            .collect();
        let mut md = BTreeMap::new();
        md.insert(
            "step_losses".to_string(),
            serde_json::to_string(&record.step_losses)?,
        );
        md.insert(
            "val_losses".to_string(),
            serde_json::to_string(&record.val_losses)?,
        );
        md.insert("epochs_run".to_string(), record.epochs_run.to_string());
        write_safetensors(self.block_path(i), &refs, &md)?;
        let entry = json!({
            "index": i,
            "train_loss": record.step_losses.last(),
            "val_losses": record.val_losses,
            "epochs": record.epochs_run,
        });
        self.meta["blocks"]
            .as_array_mut()
            .ok_or_else(|| Error::format(self.dir.join("eqat.json"), "blocks", "not an array"))?
            .push(entry);
        self.write_meta()
    }

    fn load_block(&self, i: usize) -> Result<BlockRecord> {
        let path = self.block_path(i);
        let f = SafetensorsFile::open(&path)?;
        let wbits = self.quant.wbits;
        let mut linears = Vec::with_capacity(7);
        for (m, (_, n, k)) in MODULES.iter().zip(self.cfg.linear_shapes()) {
            let p = format!("model.layers.{i}.{m}");
            let in_file = |e: Error| Error::format(&path, format!("tensor {p}"), e.to_string());
            let g = self.quant.group_len(k).map_err(in_file)?;
            let wcols = PackLayout::EqatTenPerWord
                .words_for(wbits, k, &p)
                .map_err(in_file)?;
            let words: Vec<u32> =
                tensor_bytes_checked(&f, &format!("{p}.qweight"), Dtype::U32, &[n, wcols])?
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
            let ints = unpack_cols(wbits, PackLayout::EqatTenPerWord, &words, n, k, &p)
                .map_err(in_file)?;
            let zeros: Vec<u32> =
                tensor_bytes_checked(&f, &format!("{p}.qzeros"), Dtype::U8, &[n, k / g])?
                    .iter()
                    .map(|&z| z as u32)
                    .collect();
            let name = format!("{p}.scales");
            tensor_bytes_checked(&f, &name, Dtype::F32, &[n, k / g])?;
            let scales = f.tensor_f32(&name)?;
            linears.push(
                QuantizedLinear::from_ints(wbits, g, k, n, &ints, &zeros, scales)
                    .map_err(in_file)?,
            );
        }
        let norm = |name: String| -> Result<Tensor> {
            tensor_bytes_checked(&f, &name, Dtype::F32, &[self.cfg.hidden])?;
            f.tensor_f32(&name)
        };
        let losses = |key: &str| -> Result<Vec<f32>> {
            let text = f
                .metadata()
                .get(key)
                .ok_or_else(|| Error::format(&path, key, "missing"))?;
            serde_json::from_str(text).map_err(|e| Error::format(&path, key, e.to_string()))
        };
        Ok(BlockRecord {
            block: QuantizedBlock {
                attn_norm: norm(format!("model.layers.{i}.input_layernorm.weight"))?,
                ffn_norm: norm(format!("model.layers.{i}.post_attention_layernorm.weight"))?,
                linears: linears.try_into().expect("seven linears"),
            },
            step_losses: losses("step_losses")?,
            val_losses: losses("val_losses")?,
            epochs_run: self.epochs_run(&f, &path)?,
        })
    }

    fn blocks_done(&self) -> usize {
        self.meta["blocks"].as_array().map(|a| a.len()).unwrap_or(0)
    }
}

fn write_f32_tensors(
    path: &Path,
    tensors: &[(String, &Tensor)],
    md: &BTreeMap<String, String>,
) -> Result<()> {
    let owned: Vec<(Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(_, t)| Ok((t.shape().to_vec(), f32_bytes(t)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<_> = tensors
        .iter()
        .zip(&owned)
        .map(|((n, _), (s, b))| (n.as_str(), Dtype::F32, s.as_slice(), b.as_slice()))
        .collect();
    write_safetensors(path, &refs, md)
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(bytemuck::cast_slice(t.f32s("checkpoint")?).to_vec())
}

/// HF-style config.json of the quantized model.
pub fn hf_config(cfg: &LlamaConfig, quant: QuantConfig) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "quantization_config": {
            "quant_method": "eqat",
            "bits": quant.wbits,
            "group_size": quant.group_size,
            "sym": false,
        },
    })
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
