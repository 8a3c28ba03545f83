//! `engine train --device cuda` and `engine eval --device cuda` pieces: the GPU copy of the Block-AP activation
//! streams against the host store, the Block-AP pipeline with its streams on the GPU against the same pipeline
//! with host streams, and with streams in pinned host memory (and spill files) copied in and out batch by batch
//! (bitwise the same as on the GPU), and the GPU forward's perplexity against the CPU's (a small random model, and SmolLM2 on
//! WikiText-2 when EQAT_SMOLLM2_GGUF and shared/data are there). Without a GPU each test prints
//! `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;
mod shared_data;

use common::{block_bits, pipeline_options, random_model, rtn_model, windows, RandomModel};
use cuda_common::*;
use eqat::eval::{eval_ids, eval_windows, perplexity_of_windows, NllModel};
use eqat::model::forward_cuda::CudaModel;
use eqat::model::LlamaModel;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::block_ap::BlockSamples;
use eqat::train::device::Device;
use eqat::train::device_store::{take_rows_cuda, DeviceStore};
use eqat::train::pipeline::{
    host_streams, run_block_ap_at, streams_at, BlockRecord, BlockSink, BlockSource, Event,
    PipelineOptions, StreamsAt,
};
use eqat::train::store::{BlockInputStore, Offload, StoreDType, Stream};
use eqat::{Result, Rng, Tensor};

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

#[test]
fn device_streams_hold_what_the_host_store_holds() {
    let Some(ctx) = device("device store") else {
        return;
    };
    let mut r = Report::new("device store");
    let mut rng = Rng::new(11);
    let (n, t, c) = (5, 7, 12);
    for dtype in [StoreDType::F16, StoreDType::F32] {
        let mut host = BlockInputStore::new(n, t, c, dtype, Offload::Ram).unwrap();
        let mut dev = DeviceStore::new(&ctx, n, t, c, dtype).unwrap();
        // f16's edges: a value that is subnormal there, one past its largest (infinity), a tie between two f16
        // values (1 + 2^-11 rounds to even: 1), and its next neighbour up (rounds up).
        let mut fp = rng.normal_vec(n * t * c, 3.0);
        fp[..5].copy_from_slice(&[1e-6, 70000.0, -3e-7, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 4096.0]);
        let q = rng.normal_vec(2 * t * c, 1.0);
        let up = |v: &[f32], k: usize| {
            Tensor::from_vec(&[k, t, c], v.to_vec())
                .unwrap()
                .to_device(&ctx)
                .unwrap()
        };
        host.write(Stream::Fp, 0, &fp).unwrap();
        dev.write(Stream::Fp, 0, &up(&fp, n)).unwrap();
        host.write(Stream::Quant, 3, &q).unwrap();
        dev.write(Stream::Quant, 3, &up(&q, 2)).unwrap();
        for (stream, start, count) in [
            (Stream::Fp, 0, 5),
            (Stream::Fp, 2, 2),
            (Stream::Quant, 3, 2),
        ] {
            let h = host.read(stream, start, count).unwrap();
            let d = dev.read(stream, start, count).unwrap();
            r.expect(
                &format!("{dtype:?} {stream:?} {start}+{count} bitwise"),
                d.is_cuda() && d.shape() == h.shape() && bits(&d) == bits(&h),
            );
        }
        let (x, y) = dev.pair(3, 2).unwrap();
        r.expect(
            &format!("{dtype:?} pair = (quant, fp)"),
            bits(&x) == bits(&host.read(Stream::Quant, 3, 2).unwrap())
                && bits(&y) == bits(&host.read(Stream::Fp, 3, 2).unwrap()),
        );
        r.expect(
            &format!("{dtype:?} reads and writes past the end are errors"),
            dev.read(Stream::Fp, 4, 2).is_err() && dev.write(Stream::Fp, 4, &up(&q, 2)).is_err(),
        );
        r.expect(
            &format!("{dtype:?} a host tensor is refused"),
            dev.write(Stream::Fp, 0, &Tensor::zeros(&[1, t, c]))
                .is_err(),
        );
    }
    let x = Tensor::randn(&[4, 3, 5], 1.0, &mut rng);
    let rows = take_rows_cuda(&x.to_device(&ctx).unwrap(), 1, 2).unwrap();
    r.expect(
        "take_rows_cuda rows 1..3 bitwise",
        rows.shape() == [2, 3, 5] && rows.to_f32_vec() == x.to_f32_vec()[15..45],
    );
    r.finish();
}

#[derive(Default)]
struct MemorySink(Vec<BlockRecord>);

impl BlockSink for MemorySink {
    fn save_block(&mut self, _: usize, r: &BlockRecord) -> Result<()> {
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

#[test]
fn block_ap_with_streams_on_the_gpu_trains_as_with_host_streams() {
    let Some(ctx) = device("pipeline streams") else {
        return;
    };
    let mut r = Report::new("pipeline streams");
    let model = random_model(1);
    let (train, val) = (windows(2, 8), windows(3, 2));
    let mut opts = pipeline_options(Offload::Ram);
    opts.block_ap.device = Device::Cuda(ctx.clone());
    r.expect(
        "a small run's streams go to the GPU",
        streams_at(&opts, 10, 12, model.config().hidden).unwrap() == StreamsAt::Device,
    );
    let run = |at: StreamsAt| {
        let mut sink = MemorySink::default();
        let mut steps = Vec::new();
        run_block_ap_at(&model, &train, &val, &opts, at, &mut sink, |e| {
            if let Event::Step { info, .. } = e {
                steps.push((info.step, info.loss));
            }
        })
        .unwrap();
        (sink.0, steps)
    };
    let (host_blocks, host_steps) = run(StreamsAt::Host);
    let (dev_blocks, dev_steps) = run(StreamsAt::Device);
    // 3 blocks × 2 epochs × 4 steps, reported in order (the GPU reads losses back per epoch here).
    let order: Vec<usize> = (0..3).flat_map(|_| 0..8).collect();
    r.expect(
        "every step reported once, in order",
        dev_steps.iter().map(|s| s.0).collect::<Vec<_>>() == order,
    );
    // Both runs read the same f16 values; they differ only by the order of the attention backward's atomic
    // adds, which moves losses in their last bits (and, over steps, a few straight-through rounding decisions).
    let want: Vec<f64> = host_steps.iter().map(|s| s.1 as f64).collect();
    let got: Vec<f32> = dev_steps.iter().map(|s| s.1).collect();
    r.check_tol("step losses", &got, &want, 0.0, 1e-3);
    for (i, (h, d)) in host_blocks.iter().zip(&dev_blocks).enumerate() {
        let (hv, dv) = (h.val_losses.clone(), d.val_losses.clone());
        let hv: Vec<f64> = hv.iter().map(|&v| v as f64).collect();
        r.check_tol(&format!("block {i} val losses"), &dv, &hv, 0.0, 1e-3);
    }
    r.finish();
}

/// Every step loss, every block's validation losses and every bit of every frozen block of one pipeline run.
fn run_bits(
    model: &RandomModel,
    (train, val): (&[Vec<u32>], &[Vec<u32>]),
    opts: &PipelineOptions,
    at: StreamsAt,
) -> (Vec<u32>, Vec<u32>, Vec<Vec<u32>>) {
    let mut sink = MemorySink::default();
    let mut steps = Vec::new();
    run_block_ap_at(model, train, val, opts, at, &mut sink, |e| {
        if let Event::Step { info, .. } = e {
            steps.push(info.loss.to_bits());
        }
    })
    .unwrap();
    let vals = sink
        .0
        .iter()
        .flat_map(|r| r.val_losses.iter().map(|v| v.to_bits()));
    (
        steps,
        vals.collect(),
        sink.0.iter().map(block_bits).collect(),
    )
}

#[test]
fn block_ap_with_streams_in_pinned_host_memory_trains_bitwise_as_on_the_gpu() {
    let Some(ctx) = device("pinned streams") else {
        return;
    };
    let mut r = Report::new("pinned streams");
    let model = random_model(2);
    // 10 training samples in batches of 2, forward batches of 3 (the last one short), 3 validation samples;
    // 12 tokens fit one attention key block, so the GPU runs are deterministic and must agree to the bit.
    let (train, val) = (windows(4, 10), windows(5, 3));
    let mut opts = pipeline_options(Offload::Ram);
    opts.block_ap.device = Device::Cuda(ctx.clone());
    r.expect(
        "host streams on a GPU are pinned and streamed",
        host_streams(&opts) == StreamsAt::Pinned,
    );
    let want = run_bits(&model, (&train, &val), &opts, StreamsAt::Device);
    r.expect("3 blocks × 2 epochs × 5 steps", want.0.len() == 30);
    let dir = std::env::temp_dir().join(format!("eqat-pinned-streams-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sample = (12 * model.config().hidden * 2) as u64;
    let file = |name: &str| dir.join(name);
    let placements = [
        ("all pinned", Offload::Ram, Offload::Ram),
        (
            // 7 samples pinned (plus bytes that round away): FP samples 7.. and the whole quantized stream
            // lie in the file, and the training batch of samples 6..8 straddles RAM and file.
            "pinned up to a budget, the rest in files",
            Offload::Budget {
                ram_bytes: 7 * sample + 5,
                path: file("train.bin"),
            },
            Offload::Budget {
                ram_bytes: sample,
                path: file("val.bin"),
            },
        ),
        (
            "all in files",
            Offload::Disk(file("train.bin")),
            Offload::Disk(file("val.bin")),
        ),
    ];
    for (what, offload, offload_val) in placements {
        opts.offload = offload;
        opts.offload_val = offload_val;
        let got = run_bits(&model, (&train, &val), &opts, StreamsAt::Pinned);
        r.expect(&format!("{what}: step losses bitwise"), got.0 == want.0);
        r.expect(
            &format!("{what}: validation losses bitwise"),
            got.1 == want.1,
        );
        r.expect(&format!("{what}: frozen blocks bitwise"), got.2 == want.2);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    r.finish();
}

#[test]
fn gpu_perplexity_matches_the_cpu_on_a_random_model() {
    let Some(ctx) = device("gpu perplexity") else {
        return;
    };
    let mut r = Report::new("gpu perplexity");
    let model = LlamaModel::new(Box::new(rtn_model(5, QuantConfig::new(4, 8).unwrap()))).unwrap();
    let w = windows(7, 3);
    let gpu = CudaModel::new(&model, &ctx).unwrap();
    let (cpu_sum, cpu_n) = model.nll(&w).unwrap();
    let (gpu_sum, gpu_n) = gpu.nll(&w).unwrap();
    r.expect(
        "3 windows of 12 predict 33 tokens",
        cpu_n == 33 && gpu_n == 33,
    );
    // f32 forwards of 3 blocks; the GPU sums each window's f64 mean, rounded to f32 (2^-24 relative).
    r.check("nll sum", &[gpu_sum as f32], &[cpu_sum]);
    r.finish();
}

/// SmolLM2's WikiText-2 perplexity on the first 8 windows of 2048 is 19.134 on the CPU (BENCHMARKS.md, the
/// `engine train` table's FP column); the GPU must give it within 0.1%, and the CPU's mean NLL on one short
/// window to f32 accuracy.
#[test]
fn smollm2_wikitext_perplexity_on_the_gpu_matches_the_cpu() {
    let Some(ctx) = device("smollm2 gpu perplexity") else {
        return;
    };
    let Some(gguf) = std::env::var_os("EQAT_SMOLLM2_GGUF") else {
        say("smollm2 gpu perplexity: skipped: EQAT_SMOLLM2_GGUF not set");
        return;
    };
    let Some(wiki) = shared_data::shared_data("wikitext-2-raw/wiki.test.raw") else {
        return;
    };
    let mut r = Report::new("smollm2 gpu perplexity");
    let (model, tokenizer) = eqat::model::open_model(std::path::Path::new(&gguf)).unwrap();
    let text = eqat::eval::data::read_eval_text(&wiki).unwrap();
    let ids = eval_ids(&tokenizer, &text);
    let gpu = CudaModel::new(&model, &ctx).unwrap();
    let short = eval_windows(&ids, 256, Some(1)).unwrap();
    let (cpu_sum, _) = model.nll(&short).unwrap();
    let (gpu_sum, _) = gpu.nll(&short).unwrap();
    r.check_tol(
        "mean NLL, 1 window of 256",
        &[gpu_sum as f32],
        &[cpu_sum],
        0.0,
        1e-5,
    );
    let w = eval_windows(&ids, 2048, Some(8)).unwrap();
    let p = perplexity_of_windows(&gpu, &w, ids.len(), 8, |_| {}).unwrap();
    say(&format!(
        "SmolLM2 WikiText-2 8 x 2048 on the GPU: ppl {:.4}",
        p.ppl()
    ));
    r.check_tol("ppl 8 x 2048", &[p.ppl() as f32], &[19.134], 0.0, 1e-3);
    r.finish();
}
