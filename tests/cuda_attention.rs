//! The GPU attention kernels (cuda/attention.cu) against the f64 references of src/ops/attention, with the
//! conventions of tests/cuda_equivalence.rs: fresh random inputs, NaN-poisoned device buffers, the 1e-5 relative
//! bar of cuda_common::RTOL, `skipped: no CUDA device` without a GPU.
//!
//! Timings (the H100 numbers in BENCHMARKS.md): `cargo test --release --features cuda --test cuda_attention --
//! --ignored --nocapture attention_timing`.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::autograd::Tape;
use eqat::ops::attention::{self as att, AttentionShape, AttentionTiming};
use eqat::testing::to_f64;
use eqat::{Rng, Tensor};

fn shape(b: usize, t: usize, h: usize, g: usize, d: usize) -> AttentionShape {
    AttentionShape { b, t, h, g, d }
}

/// lse [B, H, T] in f64: log Σ_{j<=t} exp(scale · q_t·k_j) per query row.
fn lse_ref(q: &[f64], k: &[f64], s: AttentionShape) -> Vec<f64> {
    let mut lse = vec![0.0; s.b * s.h * s.t];
    for b in 0..s.b {
        for h in 0..s.h {
            for t in 0..s.t {
                let qi = ((b * s.t + t) * s.h + h) * s.d;
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let kj = ((b * s.t + j) * s.g + h / s.group()) * s.d;
                        s.scale() * (0..s.d).map(|c| q[qi + c] * k[kj + c]).sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                lse[(b * s.h + h) * s.t + t] = m + sum.ln();
            }
        }
    }
    lse
}

#[test]
fn attention_matches_ref() {
    let Some(ctx) = device("attention") else {
        return;
    };
    let mut r = Report::new("attention fwd/lse/bwd");
    let mut rng = Rng::new(111);
    // T 1, 7, 33, 129 (partial 64-row tiles), GQA ratios 1/3/8, D 64 and 128 plus D 40 and 96, which run
    // zero-padded in the 64 and 128 kernels.
    for s in [
        shape(1, 1, 1, 1, 64),
        shape(2, 7, 3, 1, 64),
        shape(1, 33, 3, 3, 128),
        shape(2, 129, 8, 1, 64),
        shape(1, 129, 6, 2, 128),
        shape(1, 64, 9, 3, 64),
        shape(1, 70, 4, 4, 40),
        shape(2, 33, 2, 1, 96),
        shape(1, 200, 8, 8, 128),
    ] {
        let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
        let (q, k, v, dout) = (
            rng.normal_vec(nq, 1.0),
            rng.normal_vec(nkv, 1.0),
            rng.normal_vec(nkv, 1.0),
            rng.normal_vec(nq, 1.0),
        );
        let (q64, k64, v64, d64) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&dout));
        let (qb, kb, vb, db) = (up(&ctx, &q), up(&ctx, &k), up(&ctx, &v), up(&ctx, &dout));
        let name = format!("B{} T{} H{} G{} D{}", s.b, s.t, s.h, s.g, s.d);

        let (mut out, mut lse) = (ctx.alloc(nq).unwrap(), ctx.alloc(s.b * s.h * s.t).unwrap());
        att::attention_fwd_cuda(&mut out, &mut lse, &qb, &kb, &vb, s).unwrap();
        let mut want = vec![0.0; nq];
        att::attention_fwd_ref(&mut want, &q64, &k64, &v64, s);
        r.check(&format!("out {name}"), &down(&out), &want);
        r.check(&format!("lse {name}"), &down(&lse), &lse_ref(&q64, &k64, s));

        let (mut dq, mut dk, mut dv) = (
            ctx.alloc(nq).unwrap(),
            ctx.alloc(nkv).unwrap(),
            ctx.alloc(nkv).unwrap(),
        );
        att::attention_bwd_cuda(
            Some(&mut dq),
            Some(&mut dk),
            Some(&mut dv),
            &db,
            &qb,
            &kb,
            &vb,
            &out,
            &lse,
            s,
        )
        .unwrap();
        let (mut wq, mut wk, mut wv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        att::attention_bwd_ref(&mut wq, &mut wk, &mut wv, &d64, &q64, &k64, &v64, s);
        r.check(&format!("dq {name}"), &down(&dq), &wq);
        r.check(&format!("dk {name}"), &down(&dk), &wk);
        r.check(&format!("dv {name}"), &down(&dv), &wv);

        // dK alone (dq and dv null) is the joint pass's dK: the kernel sums it in a fixed order.
        let mut dk_only = ctx.alloc(nkv).unwrap();
        att::attention_bwd_cuda(
            None,
            Some(&mut dk_only),
            None,
            &db,
            &qb,
            &kb,
            &vb,
            &out,
            &lse,
            s,
        )
        .unwrap();
        r.expect(&format!("dk alone {name}"), down(&dk_only) == down(&dk));
    }
    r.finish();
}

#[test]
fn attention_on_gpu_tape_matches_cpu_tape() {
    let Some(ctx) = device("attention tape") else {
        return;
    };
    let mut r = Report::new("attention tape gpu vs cpu");
    let mut rng = Rng::new(112);
    let s = shape(2, 45, 6, 2, 64);
    let tensors: Vec<Tensor> = [s.h, s.g, s.g]
        .iter()
        .map(|&heads| Tensor::randn(&[s.b, s.t, heads, s.d], 1.0, &mut rng))
        .collect();
    let target = rng.normal_vec(s.b * s.t * s.h * s.d, 1.0);
    // loss = mse(out, target) (an op with a GPU path), so dout = 2·(out − target)/N on both tapes.
    let run = |on_gpu: bool| -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut tape = Tape::new();
        let place = |t: &Tensor| match on_gpu {
            true => t.to_device(&ctx).unwrap(),
            false => t.clone(),
        };
        let vars: Vec<_> = tensors.iter().map(|t| tape.leaf(place(t), true)).collect();
        let out = att::attention(&mut tape, vars[0], vars[1], vars[2]).unwrap();
        let target = tape.input(place(
            &Tensor::from_vec(&[s.b, s.t, s.h, s.d], target.clone()).unwrap(),
        ));
        let loss = eqat::ops::mse::mse(&mut tape, out, target).unwrap();
        tape.backward(loss).unwrap();
        let host = |t: &Tensor| t.to_host().unwrap().to_f32_vec();
        let grads = vars.iter().map(|&v| host(tape.grad(v).unwrap())).collect();
        (host(tape.value(out)), grads)
    };
    let (cpu_out, cpu_grads) = run(false);
    let (gpu_out, gpu_grads) = run(true);
    r.check("out", &gpu_out, &to_f64(&cpu_out));
    for (name, (g, c)) in ["dq", "dk", "dv"]
        .iter()
        .zip(gpu_grads.iter().zip(&cpu_grads))
    {
        r.check(name, g, &to_f64(c));
    }
    r.finish();

    let big = Tensor::zeros(&[1, 2, 1, 192]).to_device(&ctx).unwrap();
    let mut tape = Tape::new();
    let x = tape.input(big);
    let e = att::attention(&mut tape, x, x, x).unwrap_err().to_string();
    assert!(
        e.contains("attention") && e.contains("D <= 128"),
        "head dim over 128 on the GPU: {e}"
    );
}

/// Forward and forward+backward at the Llama-2-7B and SmolLM2-135M attention shapes; prints TFLOP/s.
#[test]
#[ignore = "timing: run on the GPU with --ignored --nocapture"]
fn attention_timing() {
    let Some(ctx) = device("attention timing") else {
        return;
    };
    ctx.set_poison(false);
    for (model, s) in [
        ("Llama-2-7B", shape(2, 2048, 32, 32, 128)),
        ("SmolLM2-135M", shape(2, 2048, 9, 3, 64)),
    ] {
        let t: AttentionTiming = att::time_attention_cuda(&ctx, s, 20).unwrap();
        say(&format!(
            "attention f32 {model:<13} B{} T{} H{} G{} D{}: fwd {:.3} ms ({:.1} TFLOP/s), fwd+bwd {:.3} ms ({:.1} TFLOP/s)",
            s.b,
            s.t,
            s.h,
            s.g,
            s.d,
            t.fwd_ms,
            t.fwd_tflops(s),
            t.fwd_bwd_ms,
            t.fwd_bwd_tflops(s)
        ));
    }
    ctx.set_poison(true);
}
