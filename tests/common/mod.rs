//! Shared by the integration tests: a small random Llama model served block by block, its data and the
//! Block-AP pipeline settings they train it with.
// Each test crate uses a part of this module.
#![allow(dead_code)]
use eqat::bench::mrem::SyntheticModel;
use eqat::model::llama::{BlockWeights, LlamaConfig};
use eqat::model::quantized::{QuantizedBlock, QuantizedModel};
use eqat::ops::rope::RopeLayout;
use eqat::quant::fake_quant::{init_minmax, QuantConfig};
use eqat::train::block_ap::BlockApOptions;
use eqat::train::e2e_qp::Example;
use eqat::train::pipeline::{BlockRecord, BlockSink, BlockSource, PipelineOptions};
use eqat::train::store::{Offload, StoreDType};
use eqat::{Result, Rng, Tensor};

/// The random model's shape: 3 blocks, hidden 32, 4 heads over 2 KV heads, vocabulary 50, tied embeddings.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden: 32,
        intermediate: 48,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        n_layers: 3,
        vocab: 50,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_layout: RopeLayout::HalfSplit,
        tie_embeddings: true,
        attn_bias: false,
    }
}

/// The small random model of the integration tests (the library's `SyntheticModel` from given parts).
pub type RandomModel = SyntheticModel;

/// The random model of `tiny_config` from `seed`: blocks then embeddings from one generator.
pub fn random_model(seed: u64) -> RandomModel {
    let cfg = tiny_config();
    let mut rng = Rng::new(seed);
    let blocks = (0..cfg.n_layers)
        .map(|_| BlockWeights::random(&cfg, &mut rng))
        .collect();
    let embedding = rng.normal_vec(cfg.vocab * cfg.hidden, 1.0);
    SyntheticModel::from_parts(cfg, blocks, embedding).unwrap()
}

/// The random model with every linear at its min-max (RTN) quantization.
pub fn rtn_model(seed: u64, quant: QuantConfig) -> QuantizedModel {
    let m = random_model(seed);
    let blocks = m
        .blocks()
        .iter()
        .map(|w| {
            let (mut scales, mut zeros) = (Vec::new(), Vec::new());
            for l in &w.linears {
                let (s, z) = init_minmax(l, quant).unwrap();
                scales.push(s);
                zeros.push(z);
            }
            QuantizedBlock::freeze(
                w,
                &scales.try_into().unwrap(),
                &zeros.try_into().unwrap(),
                quant,
            )
            .unwrap()
        })
        .collect();
    let cfg = m.config().clone();
    let (v, c) = (cfg.vocab, cfg.hidden);
    QuantizedModel {
        embedding: Tensor::from_vec(&[v, c], m.embedding().to_vec()).unwrap(),
        cfg,
        final_norm: Tensor::full(&[c], 1.0),
        lm_head: None,
        blocks,
        path: "random".into(),
    }
}

/// Text with structure to learn: each sequence counts upwards from a random start.
pub fn data(n: usize, t: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let s = rng.below(50) as u32;
            Example::causal((0..t as u32).map(|i| (s + i) % 50).collect())
        })
        .collect()
}

/// `n` windows of 12 random token ids of the random model's vocabulary.
pub fn windows(seed: u64, n: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (0..12).map(|_| rng.below(50) as u32).collect())
        .collect()
}

/// w2g8 Block-AP at learning rates that move the random model within a few steps, f16 block inputs kept in
/// `offload`, forward batches of 3.
pub fn pipeline_options(offload: Offload) -> PipelineOptions {
    let mut block_ap = BlockApOptions::recipe(QuantConfig::new(2, 8).unwrap());
    block_ap.quant_lr = 1e-3;
    block_ap.weight_lr = 1e-4;
    PipelineOptions {
        block_ap,
        offload: offload.clone(),
        offload_val: offload,
        store_dtype: StoreDType::F16,
        forward_batch: 3,
    }
}

/// Every bit of a trained block: packed weights, zeros, scales and norms.
pub fn block_bits(r: &BlockRecord) -> Vec<u32> {
    let mut v: Vec<u32> = Vec::new();
    for l in &r.block.linears {
        v.extend(l.qweight());
        v.extend(l.zeros().iter().map(|&z| z as u32));
        v.extend(l.scales().f32s("t").unwrap().iter().map(|x| x.to_bits()));
    }
    for n in [&r.block.attn_norm, &r.block.ffn_norm] {
        v.extend(n.f32s("t").unwrap().iter().map(|x| x.to_bits()));
    }
    v
}

/// Trained blocks kept in memory, in order.
#[derive(Default)]
pub struct MemorySink(pub Vec<BlockRecord>);

impl BlockSink for MemorySink {
    fn save_block(&mut self, i: usize, r: &BlockRecord) -> Result<()> {
        assert_eq!(i, self.0.len(), "blocks are saved in order");
        self.0.push(r.clone());
        Ok(())
    }
    fn load_block(&self, i: usize) -> Result<BlockRecord> {
        Ok(self.0[i].clone())
    }
    fn blocks_done(&self) -> usize {
        self.0.len()
    }
}
