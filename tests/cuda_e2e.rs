//! E2E-QP on the GPU against the CPU: the same random Block-AP-quantized Llama (tests/common), the same data and
//! options, trained a few optimizer steps on each device; the per-step losses, gradient norms and the final
//! scales must agree within f32 tolerance. The GPU run covers embedding, the real-quant linears, rmsnorm, rope,
//! attention, swiglu, the head, cross-entropy, per-block recomputation, the device clip and AdamW. Without a GPU
//! it prints `skipped: no CUDA device`.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::{data, rtn_model};
use cuda_common::*;
use eqat::quant::fake_quant::QuantConfig;
use eqat::testing::to_f64;
use eqat::train::device::Device;
use eqat::train::e2e_qp::{train_e2e, E2eOptions};

/// Loss and gradient-norm bar: each is a reduction over the whole model of values that agree to ~1e-6 relative
/// between cuBLAS and the CPU GEMM (different summation orders), so 1e-4 relative leaves two orders of margin.
const LOSS_RTOL: f64 = 1e-4;

/// Scales: each step moves a scale by about lr (Adam's normalized update), so the devices' scales agree to
/// ~1e-6 relative of lr per step; 1e-5 relative of the scale plus 1e-3·lr·steps absolute covers that. A
/// gradient within rounding of 0 can take the other sign on the other device and move its scale by up to 2·lr
/// the other way: such elements (at most 1 in 1000) are allowed, each within 2·lr·steps.
const SCALE_RTOL: f64 = 1e-5;

#[test]
fn e2e_qp_on_the_gpu_matches_the_cpu() {
    let Some(ctx) = device("e2e_qp_on_the_gpu_matches_the_cpu") else {
        return;
    };
    // New device buffers are NaN-poisoned: an unwritten output cannot pass.
    let mut r = Report::new("e2e_qp gpu vs cpu");
    // T = 70 crosses the attention kernel's 64-row tiles; T = 12 is a single partial tile.
    for (seed, wbits, group, t) in [(21u64, 2u32, 8i64, 12usize), (22, 4, 16, 70)] {
        let quant = QuantConfig::new(wbits, group).unwrap();
        let model = rtn_model(seed, quant);
        let train = data(6, t, seed);
        let mut opts = E2eOptions::recipe(wbits);
        opts.global_batch = 2;
        opts.warmup_ratio = 0.0;
        let steps = train.len() / opts.global_batch;
        let mut cpu = model.clone();
        let (mut cpu_norms, mut gpu_norms) = (Vec::new(), Vec::new());
        let cpu_losses =
            train_e2e(&mut cpu, &train, &opts, |s| cpu_norms.push(s.grad_norm)).unwrap();
        let mut gpu = model.clone();
        opts.device = Device::Cuda(ctx.clone());
        let gpu_losses =
            train_e2e(&mut gpu, &train, &opts, |s| gpu_norms.push(s.grad_norm)).unwrap();
        let name = format!("w{wbits}g{group} T {t}");
        r.check_tol(
            &format!("{name} losses"),
            &gpu_losses,
            &to_f64(&cpu_losses),
            0.0,
            LOSS_RTOL,
        );
        r.check_tol(
            &format!("{name} grad norms"),
            &gpu_norms,
            &to_f64(&cpu_norms),
            0.0,
            LOSS_RTOL,
        );
        let lr = opts.lr as f64;
        let (mut n, mut loose, mut moved) = (0usize, 0usize, 0usize);
        for (bi, ((b0, bc), bg)) in model
            .blocks
            .iter()
            .zip(&cpu.blocks)
            .zip(&gpu.blocks)
            .enumerate()
        {
            for (li, ((l0, lc), lg)) in b0
                .linears
                .iter()
                .zip(&bc.linears)
                .zip(&bg.linears)
                .enumerate()
            {
                let s0 = l0.scales().f32s("t").unwrap();
                let sc = lc.scales().f32s("t").unwrap();
                let sg = lg.scales().f32s("t").unwrap();
                assert!(!lg.scales().is_cuda(), "the scales come back to the host");
                for ((&a, &c), &g) in s0.iter().zip(sc).zip(sg) {
                    n += 1;
                    moved += (c != a) as usize;
                    let d = (g as f64 - c as f64).abs();
                    let tight = SCALE_RTOL * (c as f64).abs() + 1e-3 * lr * steps as f64;
                    if d > tight {
                        loose += 1;
                        r.expect(
                            &format!(
                                "{name} block {bi} linear {li} scale {c} vs {g} within 2·lr·steps"
                            ),
                            d <= 2.0 * lr * steps as f64 + tight,
                        );
                    }
                }
            }
        }
        say(&format!(
            "{name}: losses cpu {cpu_losses:?} gpu {gpu_losses:?}; {moved} of {n} scales moved, {loose} beyond the tight bar"
        ));
        r.expect(&format!("{name}: the scales train"), moved * 2 > n);
        r.expect(
            &format!("{name}: {loose} of {n} scales beyond the tight bar (at most 1 in 1000)"),
            loose * 1000 <= n.max(1000),
        );
    }
    r.finish();
}

/// `E2eOptions::offload` (block checkpoints, scale gradients and AdamW moments in pinned host memory, the
/// embedding on the host) moves exact copies and keeps the order of every f32 operation: the losses, gradient
/// norms and trained scales equal those of the run that keeps everything on the GPU, bit for bit. Global batch 3
/// (gradients accumulated over three sequences, so they go out and come back), an untied head (the host
/// embedding path), and a clip norm small enough that the clip scales every step.
#[test]
fn e2e_qp_offload_changes_nothing() {
    let Some(ctx) = device("e2e_qp_offload_changes_nothing") else {
        return;
    };
    let mut r = Report::new("e2e_qp offload vs on-GPU");
    let quant = QuantConfig::new(2, 8).unwrap();
    let mut model = rtn_model(23, quant);
    model.lm_head = Some(model.embedding.clone());
    let train = data(6, 20, 23);
    let mut opts = E2eOptions::recipe(2);
    opts.global_batch = 3;
    opts.warmup_ratio = 0.0;
    opts.max_grad_norm = 1e-3;
    opts.device = Device::Cuda(ctx.clone());
    let mut runs = Vec::new();
    for offload in [false, true] {
        opts.offload = offload;
        let mut m = model.clone();
        let mut norms = Vec::new();
        let losses = train_e2e(&mut m, &train, &opts, |s| norms.push(s.grad_norm)).unwrap();
        let scales: Vec<Vec<f32>> = m
            .blocks
            .iter()
            .flat_map(|b| b.linears.iter().map(|l| l.scales().to_f32_vec()))
            .collect();
        runs.push((losses, norms, scales));
    }
    let ((l0, n0, s0), (l1, n1, s1)) = (&runs[0], &runs[1]);
    say(&format!("offload: losses {l1:?} norms {n1:?}"));
    r.expect("the clip is active", n0.iter().all(|&n| n > 1e-3));
    r.expect("losses equal", l0 == l1);
    r.expect("grad norms equal", n0 == n1);
    r.expect("scales equal", s0 == s1);
    r.finish();
}

/// E2E-QP's progress on the GPU (`E2eRun::progress`: scales downloaded, AdamW moments synchronised to the host)
/// continued by a fresh run (scales and moments uploaded again) ends where the uninterrupted GPU run ends, bit
/// for bit: losses and trained scales, with the moments pinned (offload) or on the device. The same shapes as
/// `e2e_qp_offload_changes_nothing`, which finds two GPU runs bit-identical.
#[test]
fn e2e_qp_on_the_gpu_continues_from_its_progress_bit_for_bit() {
    use eqat::dist::SingleRank;
    use eqat::train::e2e_qp::E2eRun;
    let Some(ctx) = device("e2e_qp_on_the_gpu_continues_from_its_progress_bit_for_bit") else {
        return;
    };
    let mut r = Report::new("e2e_qp gpu resume");
    let quant = QuantConfig::new(2, 8).unwrap();
    let model = rtn_model(23, quant);
    let train = data(8, 20, 23);
    let scales = |m: &eqat::model::quantized::QuantizedModel| -> Vec<Vec<f32>> {
        m.blocks
            .iter()
            .flat_map(|b| b.linears.iter().map(|l| l.scales().to_f32_vec()))
            .collect()
    };
    for offload in [true, false] {
        let opts = E2eOptions {
            global_batch: 2,
            device: Device::Cuda(ctx.clone()),
            offload,
            ..E2eOptions::recipe(2)
        };
        let mut whole = model.clone();
        let want = train_e2e(&mut whole, &train, &opts, |_| {}).unwrap();
        let mut run = E2eRun::new(&model, &train, &opts, None).unwrap();
        for _ in 0..2 {
            run.step(&model, &SingleRank).unwrap();
        }
        let progress = run.progress().unwrap();
        drop(run);
        let mut resumed = model.clone();
        let mut run = E2eRun::new(&resumed, &train, &opts, Some(progress)).unwrap();
        while !run.is_done() {
            run.step(&resumed, &SingleRank).unwrap();
        }
        let got = run.finish(&mut resumed).unwrap();
        say(&format!("offload {offload}: losses {got:?}"));
        r.expect(&format!("offload {offload}: losses equal"), got == want);
        r.expect(
            &format!("offload {offload}: scales equal"),
            scales(&resumed) == scales(&whole),
        );
    }
    r.finish();
}
