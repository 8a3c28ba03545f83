//! `engine bench e2e-qp`: the speed of one E2E-QP optimizer step on a synthetic quantized model, the step that
//! `train::e2e_qp::E2eTrainer` runs in training: embedding, every block with its packed real-quant linears
//! (forward without recording, then per-block recomputation and backward), head, cross-entropy, the gradient
//! clip and AdamW on the scales. One sequence of `seqlen` tokens per step (global batch 1).
//!
//! The model is random from a seed: packed integer words, zero points at the middle level, scales, norms,
//! embedding and head. On a GPU all of it is generated there (`random.rs`), so a 7B-shaped model never exists
//! on the host. Reported: the median step time (each step ends with a device synchronisation), tokens/s, the
//! achieved TFLOP/s counted as 8·params·tokens (forward, recomputed forward, and backward's 4; params = the
//! blocks' linear weights, as in gpu.md's PyTorch table), and the peak memory of the timed steps (GPU: the
//! caching allocator's peak in use; CPU: peak RSS).
use super::{median, peak_memory, reset_peak, synchronize, BenchShape, MatmulDType};
use crate::error::{Error, Result};
use crate::model::llama::LlamaConfig;
use crate::model::quantized::{QuantizedBlock, QuantizedModel};
use crate::quant::fake_quant::QuantConfig;
use crate::quant::real_quant::QuantizedLinear;
use crate::tensor::{rng::Rng, Tensor};
use crate::train::device::Device;
use crate::train::e2e_qp::{E2eOptions, E2eTrainer, Example};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct E2eQpBench {
    pub shape: BenchShape,
    pub quant: QuantConfig,
    pub seqlen: usize,
    /// Blocks of the model; None: the real model's count.
    pub layers: Option<usize>,
    pub device: Device,
    pub dtype: MatmulDType,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    /// `E2eOptions::offload`: block checkpoints, AdamW moments and the embedding off the GPU.
    pub offload: bool,
}

#[derive(Clone, Debug)]
pub struct E2eQpReport {
    pub device: String,
    pub layers: usize,
    /// Σ N·K over the blocks' linears.
    pub params: usize,
    pub tokens: usize,
    pub step_ms: Vec<f64>,
    pub losses: Vec<f32>,
    /// Peak bytes over the timed steps (GPU: in use by live buffers; CPU: peak RSS).
    pub peak_bytes: usize,
    /// GPU only: the peak reserved by the caching allocator.
    pub peak_reserved_bytes: Option<usize>,
    /// Bytes of the packed integers and zero points (what the model keeps resident besides its f32 tensors).
    pub packed_bytes: usize,
    /// The process's peak resident host memory (VmHWM) at the end of the run.
    pub host_peak_bytes: usize,
}

impl E2eQpReport {
    pub fn median_ms(&self) -> f64 {
        median(&self.step_ms)
    }

    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / (self.median_ms() * 1e-3)
    }

    pub fn tflops(&self) -> f64 {
        8.0 * self.params as f64 * self.tokens as f64 / (self.median_ms() * 1e-3) * 1e-12
    }
}

/// The whole model's configuration for a bench shape: its real depth and vocabulary.
pub fn model_config(shape: BenchShape, layers: Option<usize>) -> LlamaConfig {
    let (n_layers, vocab) = match shape {
        BenchShape::Smollm2_135m => (30, 49152),
        BenchShape::Llama2_7b => (32, 32000),
        BenchShape::Llama3_8b => (32, 128_256),
        BenchShape::Llama2_70b => (80, 32000),
    };
    LlamaConfig {
        n_layers: layers.unwrap_or(n_layers),
        vocab,
        ..shape.config()
    }
}

/// A scale of the order of a min-max step for N(0, 0.02²) weights: ±3σ over the 2^b − 1 levels.
fn typical_scale(quant: QuantConfig) -> f32 {
    0.12 / quant.qmax()
}

/// One random linear [n, k] where the bench runs: random levels, zero points at 2^(b−1), scales in
/// [0.5, 1.5)·typical_scale.
fn random_linear(
    dev: &Device,
    quant: QuantConfig,
    n: usize,
    k: usize,
    seed: u64,
) -> Result<QuantizedLinear> {
    let g = quant.group_len(k)?;
    let ng = k / g;
    let zero = (1u32 << (quant.wbits - 1)) as f32;
    let s0 = typical_scale(quant);
    match dev {
        Device::Cpu => {
            let mut rng = Rng::new(seed);
            let qmax = quant.qmax();
            let ints: Vec<u32> = (0..n * k)
                .map(|_| rng.below(qmax as usize + 1) as u32)
                .collect();
            let scales = Tensor::from_vec(
                &[n, ng],
                rng.uniform_vec(n * ng, 0.5 * s0 as f64, 1.5 * s0 as f64),
            )?;
            QuantizedLinear::from_ints(
                quant.wbits,
                g,
                k,
                n,
                &ints,
                &vec![zero as u32; n * ng],
                scales,
            )
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => {
            use super::random::{random_bits_cuda, uniform_cuda};
            use crate::quant::pack::pack_cols;
            use crate::quant::real_quant::cuda::DevicePacked;
            use crate::quant::real_quant::INTERNAL_LAYOUT;
            let wpr = k.div_ceil(32 / quant.wbits as usize);
            // Every row's zero points are the same level: pack one row and repeat its words.
            let zero_row = pack_cols(
                quant.wbits,
                INTERNAL_LAYOUT,
                &vec![zero as u32; ng],
                1,
                ng,
                "bench qzeros",
            )?;
            let packed = DevicePacked {
                qweight: random_bits_cuda(ctx, n * wpr, seed)?,
                qzeros: ctx.upload_bits(&zero_row.repeat(n))?,
            };
            let scales = uniform_cuda(ctx, &[n, ng], 0.5 * s0, 1.5 * s0, seed + 2)?;
            QuantizedLinear::on_device(quant.wbits, g, k, n, packed, scales)
        }
    }
}

/// A random tensor where the bench runs: N(0, std²), or uniform in [lo, hi) when `uniform`.
fn random_tensor(
    dev: &Device,
    shape: &[usize],
    (a, b): (f32, f32),
    uniform: bool,
    seed: u64,
) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    match dev {
        Device::Cpu if uniform => Tensor::from_vec(
            shape,
            rng.uniform_vec(crate::tensor::numel(shape), a as f64, b as f64),
        ),
        Device::Cpu => Ok(Tensor::randn(shape, b as f64, &mut rng)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) if uniform => super::random::uniform_cuda(ctx, shape, a, b, seed),
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => super::random::randn_cuda(ctx, shape, a, b, seed),
    }
}

/// The synthetic quantized model (module docs); every tensor draws its own seed (seed + 32, + 48, ...),
/// so a tensor does not depend on the order in which the others are made.
pub fn synthetic_model(
    cfg: &LlamaConfig,
    quant: QuantConfig,
    dev: &Device,
    seed: u64,
) -> Result<QuantizedModel> {
    let norm = (0.8, 1.2);
    let weight = (0.0, 0.02);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    let mut s = seed + 16;
    let mut next = || {
        s += 16;
        s
    };
    for _ in 0..cfg.n_layers {
        let mut linears = Vec::with_capacity(7);
        for (_, n, k) in cfg.linear_shapes() {
            linears.push(random_linear(dev, quant, n, k, next())?);
        }
        blocks.push(QuantizedBlock {
            attn_norm: random_tensor(dev, &[cfg.hidden], norm, true, next())?,
            ffn_norm: random_tensor(dev, &[cfg.hidden], norm, true, next())?,
            linears: linears.try_into().expect("seven linears"),
        });
    }
    let embedding = random_tensor(dev, &[cfg.vocab, cfg.hidden], weight, false, next())?;
    let lm_head = match cfg.tie_embeddings {
        true => None,
        false => Some(random_tensor(
            dev,
            &[cfg.vocab, cfg.hidden],
            weight,
            false,
            next(),
        )?),
    };
    Ok(QuantizedModel {
        cfg: cfg.clone(),
        embedding,
        final_norm: random_tensor(dev, &[cfg.hidden], norm, true, next())?,
        lm_head,
        blocks,
        path: "synthetic".into(),
    })
}

/// Runs `warmup` + `steps` E2E-QP steps of the synthetic model and times the last `steps`.
pub fn run_e2e_qp_bench(b: &E2eQpBench) -> Result<E2eQpReport> {
    if b.steps == 0 || b.seqlen < 2 || b.layers == Some(0) {
        return Err(Error::invalid(
            "bench e2e-qp",
            format!(
                "steps {}, seqlen {} (≥ 2) and layers {:?} must be positive",
                b.steps, b.seqlen, b.layers
            ),
        ));
    }
    let cfg = model_config(b.shape, b.layers);
    match (&b.device, b.dtype) {
        (_, MatmulDType::F32) => {}
        #[cfg(feature = "cuda")]
        (Device::Cuda(ctx), MatmulDType::Bf16) => ctx.set_matmul_bf16(true),
        (_, MatmulDType::Bf16) => {
            return Err(Error::invalid(
                "bench e2e-qp",
                "--dtype bf16 runs the GEMMs on a GPU: use it with --device cuda",
            ))
        }
    }
    let mut model = synthetic_model(&cfg, b.quant, &b.device, b.seed)?;
    let mut opts = E2eOptions::recipe(b.quant.wbits);
    opts.global_batch = 1;
    opts.device = b.device.clone();
    opts.offload = b.offload;
    let mut trainer = E2eTrainer::new(&model, &opts)?;
    // The trainer holds its own copies of the frozen tensors and of the scales where it trains: drop the
    // model's before measuring (the bench never writes the trained scales back).
    model.embedding = Tensor::zeros(&[0]);
    model.final_norm = Tensor::zeros(&[0]);
    model.lm_head = None;
    for blk in &mut model.blocks {
        blk.attn_norm = Tensor::zeros(&[0]);
        blk.ffn_norm = Tensor::zeros(&[0]);
        blk.linears.iter_mut().for_each(|l| l.clear_scales());
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(ctx) = &b.device {
        ctx.empty_cache();
    }
    let mut rng = Rng::new(b.seed + 1000);
    let ids: Vec<u32> = (0..b.seqlen).map(|_| rng.below(cfg.vocab) as u32).collect();
    let batch = [Example::causal(ids)];
    let (mut step_ms, mut losses) = (Vec::new(), Vec::new());
    for i in 0..b.warmup + b.steps {
        if i == b.warmup {
            reset_peak(&b.device);
        }
        let t0 = Instant::now();
        let (loss, _) = trainer.step(&model, &batch, 1.0)?;
        synchronize(&b.device)?;
        if i >= b.warmup {
            step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            losses.push(loss);
        }
    }
    let (peak_bytes, peak_reserved_bytes) = peak_memory(&b.device);
    let shapes = cfg.linear_shapes();
    let params = cfg.n_layers * shapes.iter().map(|&(_, n, k)| n * k).sum::<usize>();
    let packed_bytes = cfg.n_layers
        * shapes
            .iter()
            .map(|&(_, n, k)| {
                let (g, p) = (
                    b.quant.group_len(k).unwrap_or(k),
                    32 / b.quant.wbits as usize,
                );
                4 * n * (k.div_ceil(p) + (k / g).div_ceil(p))
            })
            .sum::<usize>();
    Ok(E2eQpReport {
        device: b.device.name(),
        layers: cfg.n_layers,
        params,
        tokens: b.seqlen,
        step_ms,
        losses,
        peak_bytes,
        peak_reserved_bytes,
        packed_bytes,
        host_peak_bytes: super::peak_rss_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_configs_have_the_real_depth_and_vocabulary() {
        let c = model_config(BenchShape::Llama2_7b, None);
        assert_eq!((c.n_layers, c.vocab, c.hidden), (32, 32000, 4096));
        let params: usize = c.linear_shapes().iter().map(|&(_, n, k)| n * k).sum();
        assert_eq!(c.n_layers * params, 6_476_005_376); // Llama-2-7B without embedding and head
        assert_eq!(model_config(BenchShape::Smollm2_135m, Some(2)).n_layers, 2);
    }

    #[test]
    fn a_cpu_e2e_bench_times_real_steps_and_the_loss_falls() {
        let b = E2eQpBench {
            shape: BenchShape::Smollm2_135m,
            quant: QuantConfig::new(2, 64).unwrap(),
            seqlen: 16,
            layers: Some(1),
            device: Device::Cpu,
            dtype: MatmulDType::F32,
            steps: 3,
            warmup: 1,
            seed: 3,
            offload: true,
        };
        let r = run_e2e_qp_bench(&b).unwrap();
        assert_eq!((r.step_ms.len(), r.layers, r.tokens), (3, 1, 16));
        assert!(r.median_ms() > 0.0 && r.tokens_per_s() > 0.0 && r.tflops() > 0.0);
        assert!(r.peak_bytes > 0, "peak RSS read from /proc");
        // The same sequence every step: the scales' AdamW steps lower its loss.
        assert!(r.losses[2] < r.losses[0], "{:?}", r.losses);
        let e = run_e2e_qp_bench(&E2eQpBench {
            steps: 0,
            ..b.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("steps 0"), "{e}");
        let e = run_e2e_qp_bench(&E2eQpBench {
            dtype: MatmulDType::Bf16,
            ..b
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("bf16") && e.contains("cuda"), "{e}");
    }
}
