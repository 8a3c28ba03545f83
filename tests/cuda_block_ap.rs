//! Block-AP on the GPU: the device pieces it adds (reshape, min-max init, random fills, the bf16 GEMM path),
//! `train_block` on a GPU against the CPU run, and the bf16 mixed-precision mode against f32 on a SmolLM2-shaped
//! block. Without a GPU each test prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::bench::random::{randn_cuda, uniform_cuda};
use eqat::bench::{run_block_ap_bench, BenchShape, BlockApBench, MatmulDType};
use eqat::gpu::GpuContext;
use eqat::model::llama::BlockWeights;
use eqat::ops::linear::cast_bf16_cuda;
use eqat::ops::reshape::reshape;
use eqat::quant::fake_quant::{fake_quant, fake_quant_linear, init_minmax, QuantConfig};
use eqat::testing::to_f64;
use eqat::train::block_ap::{train_block, BlockApOptions, TensorPairs};
use eqat::train::device::Device;
use eqat::{Rng, Tape, Tensor};

#[test]
fn device_pieces_match_the_cpu() {
    let Some(ctx) = device("pieces") else { return };
    let mut r = Report::new("block-ap pieces");
    let mut rng = Rng::new(301);

    // reshape: device copies both ways, bitwise.
    let x = Tensor::randn(&[2, 6, 10], 1.0, &mut rng);
    let mut tape = Tape::new();
    let xv = tape.leaf(x.to_device(&ctx).unwrap(), true);
    let y = reshape(&mut tape, xv, &[2, 6, 2, 5]).unwrap();
    let t = tape.input(Tensor::zeros(&[2, 6, 2, 5]).to_device(&ctx).unwrap());
    let s = eqat::ops::mse::mse(&mut tape, y, t).unwrap();
    tape.backward(s).unwrap();
    r.expect(
        "reshape forward bitwise",
        tape.value(y).to_f32_vec() == x.to_f32_vec() && tape.value(y).shape() == [2, 6, 2, 5],
    );
    // d mse(x, 0)/dx = 2x/120, routed back through the reshape unchanged.
    let want: Vec<f64> = x
        .to_f32_vec()
        .iter()
        .map(|&v| 2.0 * v as f64 / 120.0)
        .collect();
    r.check(
        "reshape backward",
        &tape.grad(xv).unwrap().to_f32_vec(),
        &want,
    );

    // Min-max init on the device: the CPU's values exactly (odd row count, groups of 64 and per-channel 96).
    for (n, k, g) in [(7, 128, 64), (5, 96, -1), (33, 64, 16)] {
        let w = Tensor::randn(&[n, k], 0.05, &mut rng);
        let cfg = QuantConfig::new(2, g).unwrap();
        let (sc, zc) = init_minmax(&w, cfg).unwrap();
        let (sg, zg) = init_minmax(&w.to_device(&ctx).unwrap(), cfg).unwrap();
        r.expect(
            &format!("init_minmax [{n}, {k}] g {g} bitwise"),
            sg.is_cuda()
                && sg.to_f32_vec() == sc.to_f32_vec()
                && zg.to_f32_vec() == zc.to_f32_vec(),
        );
    }
    let mut bad = Tensor::randn(&[2, 64], 0.05, &mut rng).to_f32_vec();
    bad[70] = f32::NAN;
    let bad = Tensor::from_vec(&[2, 64], bad)
        .unwrap()
        .to_device(&ctx)
        .unwrap();
    let e = init_minmax(&bad, QuantConfig::new(2, 64).unwrap());
    r.expect("init_minmax of NaN is an error", e.is_err());

    // Random fills: reproducible by seed, distinct across seeds, with the asked-for moments and range.
    let n = 1 << 20;
    let a = randn_cuda(&ctx, &[n], 0.5, 2.0, 7).unwrap().to_f32_vec();
    let b = randn_cuda(&ctx, &[n], 0.5, 2.0, 7).unwrap().to_f32_vec();
    let c = randn_cuda(&ctx, &[n], 0.5, 2.0, 8).unwrap().to_f32_vec();
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    // 2^20 samples: the mean's standard error is 2/1024 ≈ 0.002, the std's about 0.0014.
    r.expect(
        &format!("randn moments mean {mean:.4} std {:.4}", var.sqrt()),
        (mean - 0.5).abs() < 0.01 && (var.sqrt() - 2.0).abs() < 0.01,
    );
    r.expect("randn reproducible, seeds differ", a == b && a != c);
    let u = uniform_cuda(&ctx, &[n], 0.8, 1.2, 9).unwrap().to_f32_vec();
    let umean = u.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    r.expect(
        &format!("uniform range and mean {umean:.4}"),
        u.iter().all(|&v| (0.8..=1.2).contains(&v)) && (umean - 1.0).abs() < 0.001,
    );

    // bf16 GEMM: A·I returns the bf16 rounding of A exactly (the cast is round to nearest even, as half's).
    let (m, k) = (37, 64);
    let av = Tensor::randn(&[m, k], 3.0, &mut rng).to_f32_vec();
    let eye: Vec<f32> = (0..k * k)
        .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
        .collect();
    let (ab, ib) = (
        cast_bf16_cuda(&up(&ctx, &av)).unwrap(),
        cast_bf16_cuda(&up(&ctx, &eye)).unwrap(),
    );
    let mut c = ctx.alloc(m * k).unwrap();
    ctx.gemm_bf16(false, false, m, k, k, 1.0, &ab, &ib, 0.0, &mut c)
        .unwrap();
    let want: Vec<f32> = av
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    r.expect("bf16 cast rounds to nearest even", down(&c) == want);

    // The linear in bf16 mode against f64: relative error of bf16 operands (between 1e-4 and 1e-2 of the norm,
    // METHOD.md), in the forward and both gradients.
    let bctx = GpuContext::new(0).unwrap();
    bctx.set_matmul_bf16(true);
    let (rows, kk, nn) = (45, 96, 33);
    let x = Tensor::randn(&[rows, kk], 1.0, &mut rng);
    let w = Tensor::randn(&[nn, kk], 0.1, &mut rng);
    let dy = Tensor::randn(&[rows, nn], 1.0, &mut rng);
    let mut tape = Tape::new();
    let xv = tape.leaf(x.to_device(&bctx).unwrap(), true);
    let wv = tape.leaf(w.to_device(&bctx).unwrap(), true);
    let yv = eqat::ops::linear::linear(&mut tape, xv, wv, None).unwrap();
    // loss = mse(y, dy): dL/dy = 2 (y − dy) / numel, taken from the exact y for the reference.
    let dyv = tape.input(dy.to_device(&bctx).unwrap());
    let loss = eqat::ops::mse::mse(&mut tape, yv, dyv).unwrap();
    tape.backward(loss).unwrap();
    let d = eqat::ops::linear::LinearDims { rows, k: kk, n: nn };
    let (x64, w64) = (to_f64(&x.to_f32_vec()), to_f64(&w.to_f32_vec()));
    let mut y64 = vec![0.0; rows * nn];
    eqat::ops::linear::linear_fwd_ref(&mut y64, &x64, &w64, None, d);
    let dy64: Vec<f64> = y64
        .iter()
        .zip(dy.to_f32_vec())
        .map(|(&y, t)| 2.0 * (y - t as f64) / (rows * nn) as f64)
        .collect();
    let (mut dx64, mut dw64) = (vec![0.0; rows * kk], vec![0.0; nn * kk]);
    eqat::ops::linear::linear_bwd_ref(Some(&mut dx64), Some(&mut dw64), None, &dy64, &x64, &w64, d);
    for (what, got, want) in [
        ("y", tape.value(yv).to_f32_vec(), y64),
        ("dx", tape.grad(xv).unwrap().to_f32_vec(), dx64),
        ("dw", tape.grad(wv).unwrap().to_f32_vec(), dw64),
    ] {
        let err = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).powi(2))
            .sum::<f64>()
            .sqrt()
            / want.iter().map(|w| w * w).sum::<f64>().sqrt();
        say(&format!("  bf16 linear {what}: relative error {err:.2e}"));
        r.expect(
            &format!("bf16 linear {what} relative error {err:.2e} in [1e-4, 1e-2]"),
            (1e-4..1e-2).contains(&err),
        );
    }

    // The fused bf16 fake-quant linear against fake_quant then linear in the same bf16 mode: the same bf16
    // operands go into the same GEMMs, so y and dx agree to f32 rounding (bitwise in practice); the fused op's dŵ
    // is rounded to bf16 once (as torch.autocast's), so dw (dŵ masked) is within half a bf16 ulp (2^-8 relative)
    // of the f32 one, and a group sum (dscales, dzeros) of g = 16 such terms within 2^-8·Σ|term|, which a few rms
    // of the sums bounds (2^-6·rms: Σ|term| <= √g·‖terms‖).
    let cfg = QuantConfig::new(2, 16).unwrap();
    let w = Tensor::randn(&[nn, kk], 0.1, &mut rng);
    let (s0, z0) = init_minmax(&w, cfg).unwrap();
    let mut grads = Vec::new();
    for fused in [false, true] {
        let mut tape = Tape::new();
        let p: Vec<_> = [&w, &s0, &z0]
            .iter()
            .map(|t| tape.param(t.to_device(&bctx).unwrap()).unwrap())
            .collect();
        let xv = tape.leaf(x.to_device(&bctx).unwrap(), true);
        let y = match fused {
            true => fake_quant_linear(&mut tape, xv, p[0], p[1], p[2], cfg).unwrap(),
            false => {
                let wq = fake_quant(&mut tape, p[0], p[1], p[2], cfg).unwrap();
                eqat::ops::linear::linear(&mut tape, xv, wq, None).unwrap()
            }
        };
        let dyv = tape.input(dy.to_device(&bctx).unwrap());
        let loss = eqat::ops::mse::mse(&mut tape, y, dyv).unwrap();
        tape.backward(loss).unwrap();
        let mut g = vec![
            tape.value(y).to_f32_vec(),
            tape.grad(xv).unwrap().to_f32_vec(),
        ];
        g.extend(p.iter().map(|&v| tape.grad(v).unwrap().to_f32_vec()));
        grads.push(g);
    }
    for (i, what) in ["y", "dx", "dw", "dscales", "dzeros"].iter().enumerate() {
        let want = to_f64(&grads[0][i]);
        let (atol, rtol) = match i {
            0 | 1 => (1e-6 * rms(&want), 1e-6),
            2 => (1e-30, 2f64.powi(-8)),
            _ => (2f64.powi(-6) * rms(&want), 2f64.powi(-8)),
        };
        r.check_tol(
            &format!("fused bf16 {what}"),
            &grads[1][i],
            &want,
            atol,
            rtol,
        );
    }
    r.finish();
}

#[test]
fn train_block_on_the_gpu_matches_the_cpu() {
    let Some(ctx) = device("train_block") else {
        return;
    };
    let mut r = Report::new("train_block gpu vs cpu");
    let cfg = tiny_block(96);
    let mut rng = Rng::new(302);
    let w = BlockWeights::random(&cfg, &mut rng);
    let inputs = Tensor::randn(&[4, 16, cfg.hidden], 1.0, &mut rng);
    let targets = Tensor::randn(&[4, 16, cfg.hidden], 1.0, &mut rng);
    let pairs = TensorPairs {
        inputs: &inputs,
        targets: &targets,
    };
    let mut opts = BlockApOptions::recipe(QuantConfig::new(2, 16).unwrap());
    let cpu = train_block(&cfg, &w, &pairs, Some(&pairs), &opts, |_| {}).unwrap();
    opts.device = Device::Cuda(ctx.clone());
    let gpu = train_block(&cfg, &w, &pairs, Some(&pairs), &opts, |_| {}).unwrap();
    let steps = cpu.step_losses.len() as f64;
    r.expect(
        "4 steps, 2 validations",
        steps == 4.0 && gpu.val_losses.len() == 2,
    );
    // Losses: f32 sums in another order (cuBLAS, the device reductions): 1e-5 relative.
    r.check_tol(
        "step losses",
        &gpu.step_losses,
        &to_f64(&cpu.step_losses),
        0.0,
        1e-5,
    );
    r.check_tol(
        "val losses",
        &gpu.val_losses,
        &to_f64(&cpu.val_losses),
        0.0,
        1e-5,
    );
    // Parameters: AdamW moves an element by about lr per step whatever the gradient's size, so where a gradient
    // is near zero the f32 rounding of the two devices can point its steps differently: the bar is 2·lr·steps.
    let wbar = 2.0 * opts.weight_lr as f64 * steps;
    let qbar = 2.0 * opts.quant_lr as f64 * steps;
    let host = |t: &Tensor| {
        r_is_host(t);
        t.to_f32_vec()
    };
    for i in 0..7 {
        let (a, b) = (&gpu.weights.linears[i], &cpu.weights.linears[i]);
        r.check_tol(
            &format!("weight {i}"),
            &host(a),
            &to_f64(&host(b)),
            wbar,
            1e-5,
        );
        r.check_tol(
            &format!("scales {i}"),
            &host(&gpu.scales[i]),
            &to_f64(&host(&cpu.scales[i])),
            qbar,
            1e-5,
        );
        r.check_tol(
            &format!("zeros {i}"),
            &host(&gpu.zeros[i]),
            &to_f64(&host(&cpu.zeros[i])),
            qbar,
            1e-5,
        );
    }
    r.check_tol(
        "attn_norm",
        &host(&gpu.weights.attn_norm),
        &to_f64(&host(&cpu.weights.attn_norm)),
        wbar,
        1e-5,
    );
    say(&format!(
        "  losses cpu {:?} gpu {:?}",
        cpu.step_losses, gpu.step_losses
    ));
    r.finish();
}

/// The trained block comes back on the host (the checkpoint writer reads host tensors).
fn r_is_host(t: &Tensor) {
    assert!(!t.is_cuda(), "a trained tensor was left on the device");
}

#[test]
fn bf16_mode_tracks_f32_on_a_smollm2_block() {
    let Some(_) = device("bf16 vs f32") else {
        return;
    };
    let mut r = Report::new("bf16 vs f32 (SmolLM2 block)");
    let run = |dtype| {
        run_block_ap_bench(&BlockApBench {
            shape: BenchShape::Smollm2_135m,
            quant: QuantConfig::new(2, 64).unwrap(),
            batch: 2,
            seqlen: 512,
            // A context of its own per run: the bf16 switch belongs to the context.
            device: Device::parse("cuda").unwrap(),
            dtype,
            steps: 20,
            warmup: 0,
            seed: 11,
        })
        .unwrap()
    };
    let (f, b) = (run(MatmulDType::F32), run(MatmulDType::Bf16));
    let rel = |i: usize| ((b.losses[i] - f.losses[i]) / f.losses[i]).abs();
    say(&format!(
        "  f32 losses  step 1 {:.6e} step 20 {:.6e}\n  bf16 losses step 1 {:.6e} step 20 {:.6e}\n  relative gaps {:.2e} {:.2e}",
        f.losses[0], f.losses[19], b.losses[0], b.losses[19], rel(0), rel(19)
    ));
    // The loss is a mean of 2·512·576 squared errors: bf16 operands (8-bit mantissas, f32 accumulation) move it
    // by far less than 1%; both runs must also lower it by about the same amount over the 20 steps.
    r.expect(&format!("step 1 gap {:.2e} < 1e-2", rel(0)), rel(0) < 1e-2);
    r.expect(
        &format!("step 20 gap {:.2e} < 1e-2", rel(19)),
        rel(19) < 1e-2,
    );
    let (df, db) = (f.losses[0] - f.losses[19], b.losses[0] - b.losses[19]);
    r.expect(
        &format!("both descend (f32 {df:.3e}, bf16 {db:.3e}) within 25%"),
        df > 0.0 && db > 0.0 && ((db - df) / df).abs() < 0.25,
    );
    r.finish();
}
