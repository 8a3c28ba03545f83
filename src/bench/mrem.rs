//! `engine bench mrem`: the wall time of Block-AP over a synthetic model (random blocks of a known shape, a small
//! vocabulary of random embeddings, random token windows), in the sequential order (`pipeline::run_block_ap`, as
//! `engine train --parallel off` runs it) and MREM-parallel with K modules (`mrem::run_block_ap_mrem`, as
//! `--parallel modules --gpus ...` runs it), so MREM's scaling over GPUs can be measured without a checkpoint.
//! The trained blocks are dropped; no validation samples (validation would add the same work to both orders).
//! Both orders run once untimed over K blocks and one batch first (kernel compilation, module loads).
use super::MatmulDType;
use crate::error::{Error, Result};
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::ops::embedding::embedding_fwd_cpu;
use crate::quant::fake_quant::QuantConfig;
use crate::tensor::{rng::Rng, Tensor};
use crate::train::block_ap::BlockApOptions;
use crate::train::device::Device;
use crate::train::mrem::{run_block_ap_mrem, MremOptions};
use crate::train::pipeline::{run_block_ap, BlockRecord, BlockSink, BlockSource, PipelineOptions};
use crate::train::store::{Offload, StoreDType};
use rayon::prelude::*;
use std::time::Instant;

/// Token ids of the synthetic model (its embedding table is this many random rows).
const VOCAB: usize = 256;

/// A model served block by block from host memory: random weights for the benchmark, or given parts (the tests'
/// small random models).
pub struct SyntheticModel {
    cfg: LlamaConfig,
    blocks: Vec<BlockWeights>,
    embedding: Vec<f32>,
}

impl SyntheticModel {
    /// Random host weights for `layers` blocks of `block`'s shape (block i from seed + 1 + i, generated in
    /// parallel) and a table of `VOCAB` random embeddings.
    pub fn new(block: &LlamaConfig, layers: usize, seed: u64) -> SyntheticModel {
        let cfg = LlamaConfig {
            n_layers: layers,
            vocab: VOCAB,
            ..block.clone()
        };
        let blocks = (0..layers)
            .into_par_iter()
            .map(|i| BlockWeights::random(&cfg, &mut Rng::new(seed + 1 + i as u64)))
            .collect();
        let embedding = Rng::new(seed).normal_vec(VOCAB * cfg.hidden, 1.0);
        SyntheticModel {
            cfg,
            blocks,
            embedding,
        }
    }
}

impl SyntheticModel {
    /// A model of `cfg` from its blocks and its embedding table [vocab, hidden] (row-major).
    pub fn from_parts(
        cfg: LlamaConfig,
        blocks: Vec<BlockWeights>,
        embedding: Vec<f32>,
    ) -> Result<SyntheticModel> {
        if blocks.len() != cfg.n_layers || embedding.len() != cfg.vocab * cfg.hidden {
            return Err(Error::shape(
                "SyntheticModel",
                format!(
                    "{} blocks and {} embedding values for {} layers of a {} x {} table",
                    blocks.len(),
                    embedding.len(),
                    cfg.n_layers,
                    cfg.vocab,
                    cfg.hidden
                ),
            ));
        }
        Ok(SyntheticModel {
            cfg,
            blocks,
            embedding,
        })
    }

    pub fn blocks(&self) -> &[BlockWeights] {
        &self.blocks
    }

    /// The embedding table [vocab, hidden], row-major.
    pub fn embedding(&self) -> &[f32] {
        &self.embedding
    }
}

impl BlockSource for SyntheticModel {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn block(&self, i: usize) -> Result<BlockWeights> {
        Ok(self.blocks[i].clone())
    }
    fn embed(&self, ids: &[u32], n: usize, t: usize) -> Result<Tensor> {
        let c = self.cfg.hidden;
        let mut x = vec![0.0; ids.len() * c];
        embedding_fwd_cpu(&mut x, &self.embedding, ids, c);
        Tensor::from_vec(&[n, t, c], x)
    }
}

/// Counts the trained blocks and drops them.
#[derive(Default)]
struct CountingSink(usize);

impl BlockSink for CountingSink {
    fn save_block(&mut self, _i: usize, _record: &BlockRecord) -> Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn load_block(&self, i: usize) -> Result<BlockRecord> {
        Err(Error::invalid(
            "bench mrem",
            format!("block {i} was not kept"),
        ))
    }
    fn blocks_done(&self) -> usize {
        self.0
    }
}

pub struct MremBench {
    pub block: LlamaConfig,
    pub layers: usize,
    pub quant: QuantConfig,
    /// Training windows (samples) of `seqlen` tokens.
    pub samples: usize,
    pub seqlen: usize,
    pub batch: usize,
    pub epochs: usize,
    /// The sequential run's device, and the Block-AP options' device of the MREM run (its GEMM mode).
    pub device: Device,
    pub dtype: MatmulDType,
    /// One device per module (empty: every module on `device`).
    pub module_devices: Vec<Device>,
    pub modules: usize,
    /// Also time the sequential order.
    pub sequential: bool,
    pub seed: u64,
}

pub struct MremReport {
    /// Seconds to make the synthetic model.
    pub setup_s: f64,
    pub sequential_s: Option<f64>,
    pub mrem_s: f64,
    /// Block-AP steps per block (samples / batch × epochs).
    pub steps_per_block: usize,
}

/// Runs the sequential order (when asked) and then MREM on the same synthetic model and windows.
pub fn run_mrem_bench(b: &MremBench) -> Result<MremReport> {
    if b.batch == 0 || b.samples < b.batch || b.seqlen == 0 || b.epochs == 0 {
        return Err(Error::invalid(
            "bench mrem",
            format!(
                "--samples {} --batch {} --seqlen {} --epochs {}: need samples >= batch >= 1, seqlen >= 1, epochs >= 1",
                b.samples, b.batch, b.seqlen, b.epochs
            ),
        ));
    }
    if b.layers == 0 {
        return Err(Error::invalid(
            "bench mrem",
            "--layers 0: give at least one block",
        ));
    }
    crate::train::mrem::module_ranges(b.layers, b.modules)?;
    // On the CPU, bf16 is refused here, naming --dtype bf16.
    b.device.set_matmul_bf16(b.dtype == MatmulDType::Bf16)?;
    let t0 = Instant::now();
    let model = SyntheticModel::new(&b.block, b.layers, b.seed);
    let mut rng = Rng::new(b.seed ^ 0x5eed);
    let windows: Vec<Vec<u32>> = (0..b.samples)
        .map(|_| (0..b.seqlen).map(|_| rng.below(VOCAB) as u32).collect())
        .collect();
    let setup_s = t0.elapsed().as_secs_f64();
    let mut block_ap = BlockApOptions::recipe(b.quant);
    block_ap.device = b.device.clone();
    block_ap.epochs = b.epochs;
    block_ap.batch_size = b.batch;
    let opts = PipelineOptions {
        block_ap,
        offload: Offload::Ram,
        offload_val: Offload::Ram,
        store_dtype: StoreDType::F16,
        forward_batch: crate::train::job::FORWARD_BATCH,
    };
    let timed = |f: &mut dyn FnMut(&mut CountingSink) -> Result<()>| -> Result<f64> {
        let mut sink = CountingSink::default();
        let t = Instant::now();
        f(&mut sink)?;
        if sink.0 != b.layers {
            return Err(Error::invalid(
                "bench mrem",
                format!("{} of {} blocks trained", sink.0, b.layers),
            ));
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let mrem = MremOptions {
        modules: b.modules,
        anneal_steps: None,
        queue_depth: 4,
        devices: b.module_devices.clone(),
    };
    // Untimed: both orders once over K blocks and one batch, so that kernel compilation (NVRTC) and each
    // context's module loads are not timed.
    let warm = SyntheticModel::new(&b.block, b.modules, b.seed);
    let warm_windows = &windows[..b.batch];
    run_block_ap(
        &warm,
        warm_windows,
        &[],
        &opts,
        &mut CountingSink::default(),
        |_| {},
    )?;
    run_block_ap_mrem(
        &warm,
        warm_windows,
        &[],
        &opts,
        &mrem,
        &mut CountingSink::default(),
        |_| {},
    )?;
    let sequential_s = match b.sequential {
        true => Some(timed(&mut |sink| {
            run_block_ap(&model, &windows, &[], &opts, sink, |_| {})
        })?),
        false => None,
    };
    let mrem_s =
        timed(&mut |sink| run_block_ap_mrem(&model, &windows, &[], &opts, &mrem, sink, |_| {}))?;
    Ok(MremReport {
        setup_s,
        sequential_s,
        mrem_s,
        steps_per_block: b.samples / b.batch * b.epochs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU bench of `layers` small blocks in `modules` modules.
    fn small(layers: usize, modules: usize) -> MremBench {
        MremBench {
            block: LlamaConfig {
                hidden: 64,
                intermediate: 96,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 16,
                n_layers: 1,
                ..super::super::BenchShape::Smollm2_135m.config()
            },
            layers,
            quant: QuantConfig::new(2, 16).unwrap(),
            samples: 4,
            seqlen: 8,
            batch: 2,
            epochs: 1,
            device: Device::Cpu,
            dtype: MatmulDType::F32,
            module_devices: Vec::new(),
            modules,
            sequential: true,
            seed: 3,
        }
    }

    #[test]
    fn both_orders_train_every_block_of_a_small_synthetic_model() {
        let r = run_mrem_bench(&small(3, 2)).unwrap();
        assert!(r.sequential_s.unwrap() > 0.0 && r.mrem_s > 0.0);
        assert_eq!(r.steps_per_block, 2);
    }

    #[test]
    fn bad_arguments_are_named() {
        let mut b = small(0, 2);
        let e = run_mrem_bench(&b).err().unwrap().to_string();
        assert!(e.contains("--layers 0"), "{e}");
        b.layers = 2;
        b.batch = 8;
        let e = run_mrem_bench(&b).err().unwrap().to_string();
        assert!(e.contains("--samples 4 --batch 8"), "{e}");
        b.batch = 2;
        b.dtype = MatmulDType::Bf16;
        let e = run_mrem_bench(&b).err().unwrap().to_string();
        assert!(e.contains("--dtype bf16"), "{e}");
        b.dtype = MatmulDType::F32;
        b.modules = 3;
        let e = run_mrem_bench(&b).err().unwrap().to_string();
        assert!(e.contains("--modules 3 with 2 blocks"), "{e}");
    }
}
