//! Block-AP streamed from a multi-shard Hugging Face checkpoint equals Block-AP on the same weights held in
//! memory, and the streamed run materialises one block's weights at a time.
//!
//! The checkpoint: a small Llama (4 blocks) in BF16, written as three shards
//! (model-0000N-of-00003.safetensors, one block straddling two shards) with model.safetensors.index.json.
//! A counting allocator (this test binary only) measures the heap when each block is asked for: if the
//! pipeline kept earlier blocks' weights, the heap would grow by about one block per block.
use eqat::bench::mrem::SyntheticModel;
use eqat::io::safetensors::{write_safetensors, Dtype};
use eqat::model::hf::HfWeights;
use eqat::model::llama::{BlockWeights, LlamaConfig};
use eqat::model::{LlamaModel, WeightSource};
use eqat::ops::rope::RopeLayout;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::block_ap::BlockApOptions;
use eqat::train::pipeline::{run_block_ap, BlockRecord, BlockSink, BlockSource, PipelineOptions};
use eqat::train::store::{Offload, StoreDType};
use eqat::{Result, Rng, Tensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn config() -> LlamaConfig {
    LlamaConfig {
        hidden: 64,
        intermediate: 160,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        n_layers: 4,
        vocab: 60,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_layout: RopeLayout::HalfSplit,
        tie_embeddings: false,
        attn_bias: false,
    }
}

fn bf16_bytes(t: &Tensor) -> Vec<u8> {
    t.f32s("t")
        .unwrap()
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect()
}

/// Writes random weights of `cfg` as a three-shard BF16 checkpoint with its index and config.json.
fn write_sharded(dir: &Path, cfg: &LlamaConfig, seed: u64) {
    let mut rng = Rng::new(seed);
    let (v, c) = (cfg.vocab, cfg.hidden);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let embedding = Tensor::randn(&[v, c], 1.0, &mut rng);
    tensors.push((
        "model.embed_tokens.weight".into(),
        vec![v, c],
        bf16_bytes(&embedding),
    ));
    for i in 0..cfg.n_layers {
        let b = BlockWeights::random(cfg, &mut rng);
        let mut put = |name: String, t: &Tensor| {
            tensors.push((name, t.shape().to_vec(), bf16_bytes(t)));
        };
        put(
            format!("model.layers.{i}.input_layernorm.weight"),
            &b.attn_norm,
        );
        put(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            &b.ffn_norm,
        );
        for (name, w) in LINEARS.iter().zip(&b.linears) {
            put(format!("model.layers.{i}.{name}.weight"), w);
        }
    }
    let norm = Tensor::from_vec(&[c], rng.uniform_vec(c, 0.8, 1.2)).unwrap();
    let head = Tensor::randn(&[v, c], 0.02, &mut rng);
    tensors.push(("model.norm.weight".into(), vec![c], bf16_bytes(&norm)));
    tensors.push(("lm_head.weight".into(), vec![v, c], bf16_bytes(&head)));

    // Nine tensors per block: shard 1 = embedding + block 0 + half of block 1, shard 2 = the rest of block 1
    // and block 2, shard 3 = block 3, the final norm and the head.
    let bounds = [0, 1 + 9 + 5, 1 + 9 * 3, tensors.len()];
    let mut weight_map = serde_json::Map::new();
    for s in 0..3 {
        let file = format!("model-{:05}-of-00003.safetensors", s + 1);
        let part = &tensors[bounds[s]..bounds[s + 1]];
        let refs: Vec<_> = part
            .iter()
            .map(|(n, shape, b)| (n.as_str(), Dtype::BF16, shape.as_slice(), b.as_slice()))
            .collect();
        write_safetensors(dir.join(&file), &refs, &Default::default()).unwrap();
        for (n, _, _) in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": c, "intermediate_size": cfg.intermediate,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers, "vocab_size": v, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Serves another source's blocks and records, per request, the block index and the heap in use just before.
struct Counted<'a> {
    inner: &'a dyn BlockSource,
    requests: Mutex<Vec<(usize, usize)>>,
    /// Keeps a copy of every block served: the negative control, a pipeline that holds every block.
    hoard: Option<Mutex<Vec<BlockWeights>>>,
}

impl BlockSource for Counted<'_> {
    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }
    fn block(&self, i: usize) -> Result<BlockWeights> {
        let live = LIVE.load(Ordering::Relaxed);
        self.requests.lock().unwrap().push((i, live));
        let b = self.inner.block(i)?;
        if let Some(h) = &self.hoard {
            h.lock().unwrap().push(b.clone());
        }
        Ok(b)
    }
    fn embed(&self, ids: &[u32], n: usize, t: usize) -> Result<Tensor> {
        self.inner.embed(ids, n, t)
    }
}

/// Keeps a hash of each frozen block's bits and its losses (not the block: the heap check must see only
/// what the pipeline itself holds).
#[derive(Default)]
struct HashSink(Vec<(u64, Vec<u32>)>);

impl BlockSink for HashSink {
    fn save_block(&mut self, i: usize, r: &BlockRecord) -> Result<()> {
        assert_eq!(i, self.0.len());
        let mut h = DefaultHasher::new();
        for l in &r.block.linears {
            l.qweight().hash(&mut h);
            l.zeros().hash(&mut h);
            for x in l.scales().f32s("t")? {
                x.to_bits().hash(&mut h);
            }
        }
        for n in [&r.block.attn_norm, &r.block.ffn_norm] {
            for x in n.f32s("t")? {
                x.to_bits().hash(&mut h);
            }
        }
        let losses = r
            .step_losses
            .iter()
            .chain(&r.val_losses)
            .map(|x| x.to_bits())
            .collect();
        self.0.push((h.finish(), losses));
        Ok(())
    }
    fn load_block(&self, _: usize) -> Result<BlockRecord> {
        unreachable!("nothing is resumed here")
    }
    fn blocks_done(&self) -> usize {
        self.0.len()
    }
}

fn windows(seed: u64, n: usize, t: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (0..t).map(|_| rng.below(vocab) as u32).collect())
        .collect()
}

#[test]
fn block_ap_streamed_from_shards_equals_in_memory_and_holds_one_block() {
    let cfg = config();
    let dir = std::env::temp_dir().join(format!("eqat-streaming-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_sharded(&dir, &cfg, 11);

    let streamed = LlamaModel::new(Box::new(HfWeights::open(&dir).unwrap())).unwrap();
    assert_eq!(streamed.config(), &cfg);
    // The same weights, every block read up front and held in memory.
    let src = HfWeights::open(&dir).unwrap();
    let in_memory = SyntheticModel::from_parts(
        cfg.clone(),
        (0..cfg.n_layers).map(|i| src.block(i).unwrap()).collect(),
        src.embedding().unwrap().to_f32_vec(),
    )
    .unwrap();
    drop(src);

    let mut block_ap = BlockApOptions::recipe(QuantConfig::new(2, 16).unwrap());
    block_ap.quant_lr = 1e-3;
    block_ap.weight_lr = 1e-4;
    let opts = PipelineOptions {
        block_ap,
        offload: Offload::Ram,
        offload_val: Offload::Ram,
        store_dtype: StoreDType::F16,
        forward_batch: 2,
    };
    let (train, val) = (windows(12, 6, 16, cfg.vocab), windows(13, 2, 16, cfg.vocab));
    let mut results = Vec::new();
    let mut requests = Vec::new();
    let sources = [
        (&streamed as &dyn BlockSource, false),
        (&in_memory, false),
        (&streamed, true),
    ];
    for (source, hoarding) in sources {
        let counted = Counted {
            inner: source,
            requests: Mutex::new(Vec::new()),
            hoard: hoarding.then(|| Mutex::new(Vec::new())),
        };
        let mut sink = HashSink::default();
        run_block_ap(&counted, &train, &val, &opts, &mut sink, |_| {}).unwrap();
        results.push(sink.0);
        requests.push(counted.requests.into_inner().unwrap());
    }
    assert_eq!(results[0].len(), 4);
    assert!(
        results[0] == results[1],
        "streamed and in-memory runs differ"
    );

    // Each block is read once, in order.
    let order: Vec<usize> = requests[0].iter().map(|r| r.0).collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
    // One block in f32: 7 linears (2 × 64² + 2 × 32 × 64 + 3 × 160 × 64 = 43_008) and 2 norms of 64.
    let block_bytes = (43_008 + 128) * 4;
    let growth = |r: &[(usize, usize)]| r[3].1 as f64 - r[1].1 as f64;
    assert!(
        growth(&requests[0]) < 0.25 * block_bytes as f64,
        "the heap grew by {} B over two blocks (one block is {block_bytes} B): {:?}",
        growth(&requests[0]),
        requests[0]
    );
    // The control that keeps every block it serves grows by two blocks between the same two requests.
    assert!(
        growth(&requests[2]) > 1.75 * block_bytes as f64,
        "the heap check cannot see held blocks: {:?}",
        requests[2]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
