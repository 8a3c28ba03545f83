//! Streaming Block-AP on the GPU (`train::stream`, `bench::stream`): batches copied double-buffered from a
//! pinned store that spills to a file arrive unchanged, outputs written back read back unchanged, training on
//! streamed batches gives the losses of training on the same batches uploaded plainly, and the streamed bench
//! runs. Without a GPU each test prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::bench::stream::{run_block_ap_stream, StreamBench};
use eqat::bench::{BenchShape, BlockApBench, MatmulDType};
use eqat::model::llama::{BlockVars, BlockWeights};
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::block_ap::{
    block_ap_optimizer, train_block, train_step, BlockApOptions, BlockSamples, TensorPairs,
};
use eqat::train::device::Device;
use eqat::train::store::Stream;
use eqat::train::stream::{BatchLoader, BatchWriter, PinnedStore, StreamedSamples};
use eqat::{Rng, Tape, Tensor};
use half::f16;
use std::path::PathBuf;
use std::sync::Arc;

fn spill(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "eqat-cuda-stream-{name}-{}.bin",
        std::process::id()
    ))
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

/// 6 samples of 8 × 64; 2.5 samples of budget: FP samples 0..2 pinned, the rest of both streams in the file.
fn filled_store(ctx: &Arc<eqat::gpu::GpuContext>, name: &str) -> (PinnedStore, Vec<f32>, Vec<f32>) {
    let (n, t, c) = (6, 8, 64);
    let sample = (t * c * 2) as u64;
    let mut store = PinnedStore::new(ctx, n, t, c, 2 * sample + sample / 2, &spill(name)).unwrap();
    assert_eq!(store.placement(), (2 * sample, 10 * sample));
    let mut rng = Rng::new(7);
    let fp = rng.normal_vec(n * t * c, 2.0);
    let q = rng.normal_vec(n * t * c, 2.0);
    store.write_host(Stream::Fp, 0, &fp).unwrap();
    store.write_host(Stream::Quant, 0, &q).unwrap();
    (store, f16_round(&fp), f16_round(&q))
}

#[test]
fn streamed_batches_and_outputs_round_trip_through_pinned_ram_and_the_file() {
    let Some(ctx) = device("stream round trip") else {
        return;
    };
    let mut r = Report::new("stream/round-trip");
    let (mut store, fp, q) = filled_store(&ctx, "trip");
    let row = 8 * 64;
    let copy = Arc::new(ctx.copy_stream().unwrap());
    // Batches in RAM, across the boundary, in the file, and the order wrapping round as epochs do.
    let batches = vec![(0, 2), (1, 3), (4, 2), (0, 1), (2, 2)];
    let mut loader = BatchLoader::new(
        &ctx,
        &copy,
        &store,
        &[Stream::Quant, Stream::Fp],
        batches.clone(),
    )
    .unwrap();
    for &(s, n) in &batches {
        let v = loader.next(&mut store).unwrap().expect("a batch");
        r.expect(&format!("batch {s}+{n} shapes"), v[0].shape() == [n, 8, 64]);
        let got_q = v[0].to_host().unwrap().f32s("t").unwrap().to_vec();
        let got_fp = v[1].to_host().unwrap().f32s("t").unwrap().to_vec();
        r.expect(
            &format!("batch {s}+{n} inputs"),
            got_q == q[s * row..(s + n) * row],
        );
        r.expect(
            &format!("batch {s}+{n} targets"),
            got_fp == fp[s * row..(s + n) * row],
        );
    }
    r.expect(
        "no batch after the last",
        loader.next(&mut store).unwrap().is_none(),
    );
    r.expect("every batch timed", loader.timings().len() == batches.len());
    drop(loader);
    // Outputs: 3·x written back to the FP stream, two samples at a time, read back from RAM and file.
    let mut writer = BatchWriter::new(&ctx, &copy, &store, 2).unwrap();
    let tripled: Vec<f32> = fp.iter().map(|x| 3.0 * x).collect();
    for s in [0, 2, 4] {
        let t = Tensor::from_vec(&[2, 8, 64], tripled[s * row..(s + 2) * row].to_vec())
            .unwrap()
            .to_device(&ctx)
            .unwrap();
        writer.write(&mut store, Stream::Fp, s, &t).unwrap();
    }
    writer.finish(&mut store).unwrap();
    let back = store.read_host(Stream::Fp, 0, 6).unwrap();
    // f32 -> f16 on the GPU rounds as half::f16::from_f32 does: bit-identical.
    r.expect("written outputs read back", back == f16_round(&tripled));
    r.expect(
        "the other stream untouched",
        store.read_host(Stream::Quant, 0, 6).unwrap() == q,
    );
    let e = writer
        .write(
            &mut store,
            Stream::Fp,
            0,
            &Tensor::zeros(&[3, 8, 64]).to_device(&ctx).unwrap(),
        )
        .unwrap_err()
        .to_string();
    r.expect(
        &format!("oversized batch refused: {e}"),
        e.contains("BatchWriter::write"),
    );
    drop(store);
    let _ = std::fs::remove_file(spill("trip"));
    r.finish();
}

/// Losses of `steps` Block-AP steps over `batches`, each batch from `pair`.
fn losses(
    ctx: &Arc<eqat::gpu::GpuContext>,
    w: &BlockWeights,
    steps: usize,
    mut pair: impl FnMut(usize) -> (Tensor, Tensor),
) -> Vec<f32> {
    let cfg = tiny_block(96);
    let quant = QuantConfig::new(2, 16).unwrap();
    let mut opts = BlockApOptions::recipe(quant);
    opts.device = Device::Cuda(ctx.clone());
    let mut tape = Tape::new();
    let vars =
        BlockVars::register(&mut tape, &opts.device.copy_block(w).unwrap(), Some(quant)).unwrap();
    let mut opt = block_ap_optimizer(&mut tape, &vars, &opts).unwrap();
    (0..steps)
        .map(|i| {
            let (xs, ys) = pair(i);
            train_step(&mut tape, &cfg, &vars, &mut opt, (xs, ys), 1.0, &mut |_| {
                Ok(())
            })
            .unwrap()
        })
        .collect()
}

#[test]
fn training_on_streamed_batches_matches_training_on_uploaded_batches() {
    let Some(ctx) = device("stream training") else {
        return;
    };
    let mut r = Report::new("stream/training");
    let (mut store, fp, q) = filled_store(&ctx, "train");
    let w = BlockWeights::random(&tiny_block(96), &mut Rng::new(3));
    let row = 8 * 64;
    // Two epochs of three batches of 2: batch 0 pinned, 1 across, 2 in the file.
    let batches: Vec<(usize, usize)> = (0..6).map(|i| ((i % 3) * 2, 2)).collect();
    let host = |v: &[f32], s: usize| {
        Tensor::from_vec(&[2, 8, 64], v[s * row..(s + 2) * row].to_vec()).unwrap()
    };
    let want = losses(&ctx, &w, 6, |i| {
        (host(&q, batches[i].0), host(&fp, batches[i].0))
    });
    let copy = Arc::new(ctx.copy_stream().unwrap());
    let mut loader =
        BatchLoader::new(&ctx, &copy, &store, &[Stream::Quant, Stream::Fp], batches).unwrap();
    let got = losses(&ctx, &w, 6, |_| {
        let mut v = loader.next(&mut store).unwrap().unwrap();
        let ys = v.pop().unwrap();
        (v.pop().unwrap(), ys)
    });
    say(&format!(
        "resident losses {want:?}\nstreamed losses {got:?}"
    ));
    r.expect("losses finite", want.iter().all(|l| l.is_finite()));
    // The same f32 inputs in the same order through the same kernels: the same numbers.
    r.expect("streamed losses equal the uploaded ones", got == want);
    drop(loader);
    drop(store);
    let _ = std::fs::remove_file(spill("train"));
    r.finish();
}

#[test]
fn train_block_on_streamed_samples_matches_train_block_on_tensors() {
    let Some(ctx) = device("stream train_block") else {
        return;
    };
    let mut r = Report::new("stream/train_block");
    let (mut store, fp, q) = filled_store(&ctx, "block");
    let w = BlockWeights::random(&tiny_block(96), &mut Rng::new(5));
    let mut opts = BlockApOptions::recipe(QuantConfig::new(2, 16).unwrap());
    opts.device = Device::Cuda(ctx.clone());
    let (inputs, targets) = (
        Tensor::from_vec(&[6, 8, 64], q).unwrap(),
        Tensor::from_vec(&[6, 8, 64], fp).unwrap(),
    );
    let plain = TensorPairs {
        inputs: &inputs,
        targets: &targets,
    };
    let want = train_block(&tiny_block(96), &w, &plain, Some(&plain), &opts, |_| {}).unwrap();
    let copy = Arc::new(ctx.copy_stream().unwrap());
    let streamed =
        StreamedSamples::new(&ctx, &copy, &mut store, opts.batch_size, opts.epochs).unwrap();
    r.expect("six samples", streamed.len() == 6);
    let val: &dyn BlockSamples = &streamed;
    let got = train_block(&tiny_block(96), &w, &streamed, Some(val), &opts, |_| {}).unwrap();
    say(&format!(
        "train_block losses: tensors {:?}, streamed {:?}; val {:?} / {:?}",
        want.step_losses, got.step_losses, want.val_losses, got.val_losses
    ));
    r.expect("2 epochs × 3 steps", got.step_losses.len() == 6);
    r.expect("step losses equal", got.step_losses == want.step_losses);
    r.expect("validation losses equal", got.val_losses == want.val_losses);
    let e = streamed.train_pair(0, 0, 2).unwrap_err().to_string();
    r.expect(
        &format!("out-of-order step refused: {e}"),
        e.contains("StreamedSamples"),
    );
    drop(streamed);
    drop(store);
    let _ = std::fs::remove_file(spill("block"));
    r.finish();
}

#[test]
fn the_streamed_bench_trains_every_block_and_removes_its_spill_file() {
    let Some(ctx) = device("stream bench") else {
        return;
    };
    let mut r = Report::new("stream/bench");
    let path = spill("bench");
    let b = StreamBench {
        base: BlockApBench {
            shape: BenchShape::Smollm2_135m,
            quant: QuantConfig::new(2, 64).unwrap(),
            batch: 2,
            seqlen: 32,
            device: Device::Cuda(ctx.clone()),
            dtype: MatmulDType::Bf16,
            steps: 2,
            warmup: 1,
            seed: 1,
        },
        blocks: 2,
        samples: 7,
        // 7 samples × 32 × 576 × 2 B per stream; 3 samples pinned.
        host_mem: 3 * 32 * 576 * 2,
        spill: path.clone(),
    };
    let rep = run_block_ap_stream(&b).unwrap();
    ctx.set_matmul_bf16(false);
    r.expect("resident steps timed", rep.resident_ms.len() == 2);
    r.expect(
        &format!("3 steps per block, 2 blocks: {:?}", rep.streamed_ms),
        rep.streamed_ms.len() == 6,
    );
    r.expect("2 propagations per block", rep.propagate_ms.len() == 4);
    r.expect("one block switch", rep.weight_wait_ms.len() == 1);
    r.expect(
        &format!("losses {:?}", rep.block_losses),
        rep.block_losses.len() == 2
            && rep
                .block_losses
                .iter()
                .all(|(a, b)| a.is_finite() && b.is_finite()),
    );
    r.expect(
        &format!("placement {:?}", rep.placement),
        rep.placement == (3 * 32 * 576 * 2, 11 * 32 * 576 * 2),
    );
    r.expect(
        "copies measured",
        rep.copy_gbps() > 0.0 && rep.h2d_gbps > 0.0,
    );
    r.expect("spill file removed", !path.exists());
    r.finish();
}
