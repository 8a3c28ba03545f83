//! Block-AP over a small random model: every block trains, and a run interrupted after a block resumes to the
//! same bits as an uninterrupted one.
use eqat::model::llama::{BlockWeights, LlamaConfig};
use eqat::ops::rope::RopeLayout;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::block_ap::{BlockApOptions, TrainedBlock};
use eqat::train::pipeline::{run_block_ap, BlockSink, BlockSource, Event, PipelineOptions};
use eqat::train::store::{Offload, StoreDType};
use eqat::{Error, Result, Rng, Tensor};

struct RandomModel {
    cfg: LlamaConfig,
    blocks: Vec<BlockWeights>,
    embedding: Vec<f32>,
}

impl RandomModel {
    fn new(seed: u64) -> Self {
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

#[derive(Default)]
struct MemorySink {
    blocks: Vec<TrainedBlock>,
    fail_at: Option<usize>,
}

impl BlockSink for MemorySink {
    fn save_block(&mut self, i: usize, block: &TrainedBlock) -> Result<()> {
        if self.fail_at == Some(i) {
            return Err(Error::invalid(
                "MemorySink",
                format!("simulated crash before saving block {i}"),
            ));
        }
        assert_eq!(i, self.blocks.len(), "blocks are saved in order");
        self.blocks.push(block.clone());
        Ok(())
    }
    fn load_block(&self, i: usize) -> Result<TrainedBlock> {
        Ok(self.blocks[i].clone())
    }
    fn blocks_done(&self) -> usize {
        self.blocks.len()
    }
}

fn options(offload: Offload) -> PipelineOptions {
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

fn windows(seed: u64, n: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (0..12).map(|_| rng.below(50) as u32).collect())
        .collect()
}

fn bits(b: &TrainedBlock) -> Vec<u32> {
    let mut v: Vec<u32> = Vec::new();
    for t in b.weights.linears.iter().chain(&b.scales).chain(&b.zeros) {
        v.extend(t.f32s("t").unwrap().iter().map(|x| x.to_bits()));
    }
    v.extend(
        b.weights
            .attn_norm
            .f32s("t")
            .unwrap()
            .iter()
            .map(|x| x.to_bits()),
    );
    v
}

#[test]
fn block_ap_trains_every_block_and_resumes_to_identical_bits() {
    let model = RandomModel::new(1);
    let (train, val) = (windows(2, 8), windows(3, 2));
    let mut full = MemorySink::default();
    let mut events = Vec::new();
    run_block_ap(
        &model,
        &train,
        &val,
        &options(Offload::Ram),
        &mut full,
        |e| events.push(e),
    )
    .unwrap();
    assert_eq!(full.blocks.len(), 3);
    for (i, b) in full.blocks.iter().enumerate() {
        assert_eq!(
            b.step_losses.len(),
            8,
            "block {i}: 8 samples / batch 2 x 2 epochs"
        );
        assert!(b.step_losses.iter().all(|l| l.is_finite() && *l > 0.0));
        assert_eq!(b.val_losses.len(), 2);
    }
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::BlockDone { .. }))
            .count()
            == 3
    );

    // Crash before block 2 is saved, then resume with what was saved, offloading to disk this time.
    let dir = std::env::temp_dir().join(format!("eqat-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sink = MemorySink {
        fail_at: Some(2),
        ..Default::default()
    };
    let e = run_block_ap(
        &model,
        &train,
        &val,
        &options(Offload::Ram),
        &mut sink,
        |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("simulated crash"));
    assert_eq!(sink.blocks.len(), 2);
    sink.fail_at = None;
    let mut trained_again = Vec::new();
    let opts = PipelineOptions {
        offload: Offload::Disk(dir.join("train.bin")),
        offload_val: Offload::Disk(dir.join("val.bin")),
        ..options(Offload::Ram)
    };
    run_block_ap(&model, &train, &val, &opts, &mut sink, |e| {
        if let Event::BlockStart { block, .. } = e {
            trained_again.push(block)
        }
    })
    .unwrap();
    assert_eq!(
        trained_again,
        vec![2],
        "only the unsaved block trains again"
    );
    for i in 0..3 {
        assert!(
            bits(&sink.blocks[i]) == bits(&full.blocks[i]),
            "block {i} differs after resume"
        );
        assert_eq!(sink.blocks[i].step_losses, full.blocks[i].step_losses);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
