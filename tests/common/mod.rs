//! Shared by the integration tests: a small random Llama model served block by block.
use eqat::model::llama::{BlockWeights, LlamaConfig};
use eqat::ops::rope::RopeLayout;
use eqat::train::pipeline::BlockSource;
use eqat::{Result, Rng, Tensor};

pub struct RandomModel {
    pub cfg: LlamaConfig,
    pub blocks: Vec<BlockWeights>,
    pub embedding: Vec<f32>,
}

impl RandomModel {
    pub fn new(seed: u64) -> Self {
        let cfg = LlamaConfig {
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
        };
        let mut rng = Rng::new(seed);
        let blocks = (0..cfg.n_layers)
            .map(|_| BlockWeights::random(&cfg, &mut rng))
            .collect();
        let embedding = rng.normal_vec(cfg.vocab * cfg.hidden, 1.0);
        RandomModel {
            cfg,
            blocks,
            embedding,
        }
    }
}

impl BlockSource for RandomModel {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn block(&self, i: usize) -> Result<BlockWeights> {
        Ok(self.blocks[i].clone())
    }
    fn embed(&self, ids: &[u32], n: usize, t: usize) -> Result<Tensor> {
        let c = self.cfg.hidden;
        let data = ids
            .iter()
            .flat_map(|&id| self.embedding[id as usize * c..(id as usize + 1) * c].to_vec())
            .collect();
        Tensor::from_vec(&[n, t, c], data)
    }
}
