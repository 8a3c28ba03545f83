//! Data-parallel E2E-QP on GPUs against the single-GPU run with the same global batch: the scale gradients summed
//! where the GPU path keeps them (on the tape on the device, or offloaded to pinned host memory,
//! `PinnedGrads::all_reduce`), then clipped and stepped identically on every rank.
//!
//! - One GPU: K ranks as threads on GPU 0 over the loopback group (GPU buffers staged through the host), and the
//!   NCCL world of one from the launcher path (its on-device all-reduce and the examples' broadcast).
//! - Several GPUs: one rank per GPU over NCCL (`NcclComm::group`), 2 GPUs and all of them.
//!
//! Without a GPU it prints `skipped: no CUDA device`; without NCCL or a second GPU it says so.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::{data, rtn_model};
use cuda_common::{device, say, Report};
use eqat::dist::launch::LaunchEnv;
use eqat::dist::nccl::NcclComm;
use eqat::dist::{loopback, Communicator};
use eqat::gpu::GpuContext;
use eqat::model::quantized::QuantizedModel;
use eqat::quant::fake_quant::QuantConfig;
use eqat::testing::to_f64;
use eqat::train::device::Device;
use eqat::train::e2e_qp::{share_examples, train_e2e, train_e2e_dist, E2eOptions, Example};
use std::sync::Arc;
use std::time::Duration;

/// Losses and gradient norms: the ranks' sum of K partial gradients differs from the single GPU's running sum
/// in the order of the f32 additions only (~1e-7 relative); 1e-5 relative is two orders above that, and a rank
/// that skipped the sum would be off by tens of percent.
const STEP_RTOL: f64 = 1e-5;

/// Scales: AdamW moves a scale by about lr per step; the reassociation reaches it as ~1e-6 of that. A gradient
/// within rounding of 0 can take the other sign and move its scale up to 2·lr the other way: such elements (at
/// most 1 in 1000) are allowed, each within 2·lr·steps (as in tests/cuda_e2e.rs).
const SCALE_RTOL: f64 = 1e-5;

/// One run's per-step losses, gradient norms and trained scales.
struct Run {
    losses: Vec<f32>,
    norms: Vec<f32>,
    scales: Vec<f32>,
}

fn scales(m: &QuantizedModel) -> Vec<f32> {
    m.blocks
        .iter()
        .flat_map(|b| &b.linears)
        .flat_map(|l| l.scales().f32s("t").unwrap().to_vec())
        .collect()
}

fn single(model: &QuantizedModel, train: &[Example], opts: &E2eOptions) -> Run {
    let mut m = model.clone();
    let mut norms = Vec::new();
    let losses = train_e2e(&mut m, train, opts, |s| norms.push(s.grad_norm)).unwrap();
    Run {
        losses,
        norms,
        scales: scales(&m),
    }
}

/// One rank on `device`: rank 0 shares the sequences, as `engine train` does; every rank checks them.
fn rank_run(
    c: &dyn Communicator,
    device: &Device,
    model: &QuantizedModel,
    train: &[Example],
    opts: &E2eOptions,
) -> Run {
    let opts = E2eOptions {
        device: device.clone(),
        ..opts.clone()
    };
    let shared = share_examples(c, (c.rank() == 0).then_some(train)).unwrap();
    assert_eq!(
        shared,
        train,
        "rank {}: the sequences arrive intact",
        c.rank()
    );
    let mut m = model.clone();
    let mut norms = Vec::new();
    let losses = train_e2e_dist(&mut m, &shared, &opts, c, |s| norms.push(s.grad_norm)).unwrap();
    Run {
        losses,
        norms,
        scales: scales(&m),
    }
}

/// Every rank in its own thread (NCCL blocks until all ranks have called), rank i on `devices[i]`.
fn ranks<C: Communicator>(
    comms: Vec<C>,
    devices: &[Device],
    model: &QuantizedModel,
    train: &[Example],
    opts: &E2eOptions,
) -> Vec<Run> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .zip(devices)
            .map(|(c, d)| s.spawn(move || rank_run(&c, d, model, train, opts)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Every rank against the single-GPU run.
fn compare(
    r: &mut Report,
    name: &str,
    got: &[Run],
    want: &Run,
    model: &QuantizedModel,
    opts: &E2eOptions,
) {
    let steps = want.losses.len() as f64;
    let lr = opts.lr as f64;
    let start = scales(model);
    let moved = want
        .scales
        .iter()
        .zip(&start)
        .filter(|(a, b)| a != b)
        .count();
    r.expect(
        &format!("{name}: the scales train"),
        moved * 2 > start.len(),
    );
    for (rank, run) in got.iter().enumerate() {
        let what = format!("{name} rank {rank}");
        r.check_tol(
            &format!("{what} losses"),
            &run.losses,
            &to_f64(&want.losses),
            0.0,
            STEP_RTOL,
        );
        r.check_tol(
            &format!("{what} grad norms"),
            &run.norms,
            &to_f64(&want.norms),
            0.0,
            STEP_RTOL,
        );
        r.expect(
            &format!("{what}: the same scales as rank 0"),
            run.scales == got[0].scales,
        );
        let mut loose = 0;
        for (&g, &w) in run.scales.iter().zip(&want.scales) {
            let d = (g as f64 - w as f64).abs();
            let tight = SCALE_RTOL * (w as f64).abs() + 1e-3 * lr * steps;
            if d > tight {
                loose += 1;
                r.expect(
                    &format!("{what}: scale {g} vs {w} within 2·lr·steps"),
                    d <= 2.0 * lr * steps + tight,
                );
            }
        }
        r.expect(
            &format!(
                "{what}: {loose} of {} scales beyond the tight bar (at most 1 in 1000)",
                start.len()
            ),
            loose * 1000 <= start.len().max(1000),
        );
    }
    say(&format!(
        "{name}: single-GPU losses {:?}, rank 0 {:?}",
        want.losses, got[0].losses
    ));
}

/// The model, data and options of every case: global batch 5 (3 ranks take 2, 2 and 1 sequences), an untied
/// head (the offloaded run keeps the embedding on the host), a clip small enough to act every step.
fn setup(ctx: &Arc<GpuContext>) -> (QuantizedModel, Vec<Example>, E2eOptions) {
    let quant = QuantConfig::new(2, 8).unwrap();
    let mut model = rtn_model(31, quant);
    model.lm_head = Some(model.embedding.clone());
    let mut opts = E2eOptions::recipe(2);
    opts.global_batch = 5;
    opts.warmup_ratio = 0.0;
    opts.max_grad_norm = 1e-2;
    opts.lr = 2e-3;
    opts.device = Device::Cuda(ctx.clone());
    (model, data(10, 20, 31), opts)
}

#[test]
fn loopback_ranks_on_one_gpu_match_the_single_gpu_run() {
    let Some(ctx) = device("loopback_ranks_on_one_gpu") else {
        return;
    };
    let mut r = Report::new("e2e_qp data-parallel, loopback ranks on one GPU");
    let (model, train, mut opts) = setup(&ctx);
    for offload in [false, true] {
        opts.offload = offload;
        let want = single(&model, &train, &opts);
        for world in [2, 3] {
            // Rank 0 on the shared context, the others on contexts of their own (one cuBLAS handle per thread).
            let devices: Vec<Device> = (0..world)
                .map(|i| match i {
                    0 => Device::Cuda(ctx.clone()),
                    _ => {
                        let c = GpuContext::new(0).unwrap();
                        c.set_poison(true);
                        Device::Cuda(c)
                    }
                })
                .collect();
            let comms = loopback::group(world, Duration::from_secs(300)).unwrap();
            let got = ranks(comms, &devices, &model, &train, &opts);
            compare(
                &mut r,
                &format!("offload {offload} world {world}"),
                &got,
                &want,
                &model,
                &opts,
            );
        }
    }
    r.finish();
}

#[test]
fn nccl_world_of_one_sums_on_the_device_and_trains_as_one_gpu() {
    let Some(ctx) = device("nccl_world_of_one") else {
        return;
    };
    let mut r = Report::new("e2e_qp data-parallel, NCCL world of one");
    let env = LaunchEnv::from_vars(|k| match k {
        "RANK" => Some("0".into()),
        "WORLD_SIZE" => Some("1".into()),
        _ => None,
    })
    .unwrap();
    let comm = match NcclComm::from_launch(&env, &ctx, Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => {
            say(&format!(
                "nccl_world_of_one: skipped: NCCL could not start: {e}"
            ));
            return;
        }
    };
    let host: Vec<f32> = (0..1001).map(|i| (i % 17) as f32 * 0.5 - 4.0).collect();
    let mut buf = ctx.upload(&host).unwrap();
    comm.all_reduce_sum_gpu(&mut buf).unwrap();
    r.check_tol(
        "device all-reduce of one rank is the identity",
        &buf.to_vec().unwrap(),
        &to_f64(&host),
        0.0,
        0.0,
    );
    let mut empty = ctx.alloc(0).unwrap();
    r.expect(
        "an empty buffer",
        comm.all_reduce_sum_gpu(&mut empty).is_ok(),
    );
    let (model, train, mut opts) = setup(&ctx);
    for offload in [false, true] {
        opts.offload = offload;
        let want = single(&model, &train, &opts);
        let got = rank_run(&comm, &opts.device, &model, &train, &opts);
        r.expect(
            &format!("offload {offload}: a world of one is the single-GPU run, bit for bit"),
            got.losses == want.losses && got.norms == want.norms && got.scales == want.scales,
        );
    }
    r.finish();
}

#[test]
fn nccl_ranks_on_several_gpus_match_the_single_gpu_run() {
    let Some(ctx) = device("nccl_ranks_on_several_gpus") else {
        return;
    };
    let gpus: Vec<Arc<GpuContext>> = std::iter::once(ctx.clone())
        .chain((1..8).map_while(|i| GpuContext::new(i).ok()))
        .collect();
    if gpus.len() < 2 {
        say("nccl_ranks_on_several_gpus: skipped: this machine has 1 GPU (NCCL refuses two ranks on one GPU)");
        return;
    }
    let mut r = Report::new("e2e_qp data-parallel, NCCL ranks on several GPUs");
    let (model, train, mut opts) = setup(&ctx);
    let mut worlds = vec![2, gpus.len().min(opts.global_batch)];
    worlds.dedup();
    for offload in [false, true] {
        opts.offload = offload;
        let want = single(&model, &train, &opts);
        for &world in &worlds {
            let comms = match NcclComm::group(&gpus[..world]) {
                Ok(c) => c,
                Err(e) => {
                    say(&format!(
                        "nccl_ranks_on_several_gpus: skipped: NCCL could not start: {e}"
                    ));
                    return;
                }
            };
            let devices: Vec<Device> = gpus[..world]
                .iter()
                .map(|c| Device::Cuda(c.clone()))
                .collect();
            let got = ranks(comms, &devices, &model, &train, &opts);
            compare(
                &mut r,
                &format!("offload {offload} world {world}"),
                &got,
                &want,
                &model,
                &opts,
            );
        }
    }
    r.finish();
}
