//! The GPU attention kernels (cuda/attention.cu) against the f64 references of src/ops/attention, with the
//! conventions of tests/cuda_equivalence.rs: fresh random inputs, NaN-poisoned device buffers, the 1e-5 relative
//! bar of cuda_common::RTOL, `skipped: no CUDA device` without a GPU.
//!
//! The bf16 tensor-core kernels (the context's bf16 mode, D 64 and 128) are checked against the same references with
//! bf16 bounds derived beside BF16_TOL.
//!
//! Timings (the H100 numbers in BENCHMARKS.md): `cargo test --release --features cuda --test cuda_attention --
//! --ignored --nocapture attention_timing`.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::autograd::Tape;
use eqat::gpu::GpuBuf;
use eqat::ops::attention::{self as att, AttentionShape, AttentionTiming};
use eqat::testing::to_f64;
use eqat::{Rng, Tensor};

fn shape(b: usize, t: usize, h: usize, g: usize, d: usize) -> AttentionShape {
    AttentionShape { b, t, h, g, d }
}

/// lse [B, H, T] in f64: log Σ_{j<=t} exp(scale · q_t·k_j) per query row.
/// The GPU backward with every gradient asked for, downloaded: (dq, dk, dv) of `[dout, q, k, v]`.
fn gpu_bwd(
    ctx: &std::sync::Arc<eqat::gpu::GpuContext>,
    [dout, q, k, v]: [&GpuBuf; 4],
    out: &GpuBuf,
    lse: &GpuBuf,
    s: AttentionShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
    let (mut dq, mut dk, mut dv) = (
        ctx.alloc(nq).unwrap(),
        ctx.alloc(nkv).unwrap(),
        ctx.alloc(nkv).unwrap(),
    );
    att::attention_bwd_cuda(
        Some(&mut dq),
        Some(&mut dk),
        Some(&mut dv),
        dout,
        q,
        k,
        v,
        out,
        lse,
        s,
    )
    .unwrap();
    (down(&dq), down(&dk), down(&dv))
}

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

        let (dq, dk, dv) = gpu_bwd(&ctx, [&db, &qb, &kb, &vb], &out, &lse, s);
        let (mut wq, mut wk, mut wv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        att::attention_bwd_ref(&mut wq, &mut wk, &mut wv, &d64, &q64, &k64, &v64, s);
        r.check(&format!("dq {name}"), &dq, &wq);
        r.check(&format!("dk {name}"), &dk, &wk);
        r.check(&format!("dv {name}"), &dv, &wv);

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
        r.expect(&format!("dk alone {name}"), down(&dk_only) == dk);
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

/// The unit roundoff of bf16 (8 significant bits, round to nearest): 2^-8 relative per rounding.
const BF16_U: f64 = 1.0 / 256.0;
/// The elementwise bar of the bf16 kernels: |got − want| <= BF16_TOL·(|want| + rms(want)) + BF16_FLOOR. An output
/// passes through about four bf16 roundings on its way (q and k into the scores, P or dS, v or dO or q or k into
/// the second product), each at most u relative to the terms it rounds, and those terms reach a few times
/// rms(want) where the sums cancel: 16u = 6.3e-2. The floor (inputs are N(0, 1), outputs O(0.1..1)) admits f32
/// rounding where the exact gradient is 0, as dq at T = 1.
const BF16_TOL: f64 = 16.0 * BF16_U;
const BF16_FLOOR: f64 = 1e-5;
/// The rms error of the bf16 kernels against the exact reference, over the rms error of the same f64 reference
/// run on bf16-rounded q, k, v and dO: the kernels add the roundings of P and dS (and f32 accumulation) to the
/// input roundings both share. Measured on the H100: 1.00 (lse; out, dv at T = 1) to 1.20 (dv), so the kernels
/// lose at most a fifth more than rounding their inputs does; 1.5 leaves room for other seeds.
const BF16_RATIO: f64 = 1.5;

fn round_bf16(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f64())
        .collect()
}

fn rms_diff(a: &[f64], b: &[f64]) -> f64 {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    rms(&d)
}

/// Checks a bf16-kernel output against the exact reference `want` elementwise (BF16_TOL) and in rms against the
/// error of the reference on bf16-rounded inputs, `rounded` (BF16_RATIO); prints both errors.
fn check_bf16(r: &mut Report, what: &str, got: &[f32], want: &[f64], rounded: &[f64]) {
    let scale = rms(want);
    // The largest of n rounding errors grows like sqrt(2 ln n): the element bar is BF16_TOL up to 2^16 elements
    // and widens with that tail beyond (×1.15 at 2.2M).
    let tail = ((want.len().max(2) as f64).ln() / (65536f64).ln())
        .sqrt()
        .max(1.0);
    r.check_tol(
        what,
        got,
        want,
        tail * BF16_TOL * scale + BF16_FLOOR,
        BF16_TOL,
    );
    let e_gpu = rms_diff(&to_f64(got), want);
    let e_in = rms_diff(rounded, want);
    // Relative to rms(want), or absolute where the exact result is 0 (dq and dk at T = 1).
    let unit = if scale > 0.0 { scale } else { 1.0 };
    say(&format!(
        "  {what:<34} rms(want) {scale:.3e}  rms err{}: kernel {:.2e}, ref on bf16 inputs {:.2e}, ratio {:.2}",
        if scale > 0.0 { "" } else { " (absolute)" },
        e_gpu / unit,
        e_in / unit,
        e_gpu / e_in
    ));
    r.expect(
        &format!(
            "{what}: rms error {e_gpu:.3e} <= {BF16_RATIO} x {e_in:.3e} (bf16 inputs) + floor"
        ),
        e_gpu <= BF16_RATIO * e_in + BF16_FLOOR,
    );
}

#[test]
fn attention_bf16_matches_ref() {
    if device("attention bf16").is_none() {
        return;
    }
    // A context of its own: the bf16 mode must not leak into the f32 tests running beside this one.
    let ctx = eqat::gpu::GpuContext::new(0).unwrap();
    ctx.set_poison(true);
    ctx.set_matmul_bf16(true);
    let mut r = Report::new("attention bf16 fwd/lse/bwd");
    let mut rng = Rng::new(113);
    // T 1, 17, 300 and 2048 (one row; partial 64-row tiles; 32 full tiles), D 64 and 128, GQA ratios 1, 2, 3.
    // The D 64 backward shares a key block's query blocks between 2 blocks when there are too few key blocks for
    // the GPU (every D 64 shape above on an H100); 4 × 512 × 17 kv heads has 272 blocks of 128 keys, no split.
    for s in [
        shape(1, 1, 2, 1, 64),
        shape(2, 17, 4, 2, 128),
        shape(1, 300, 6, 2, 64),
        shape(2, 300, 3, 3, 128),
        shape(1, 2048, 2, 1, 64),
        shape(1, 2048, 2, 2, 128),
        shape(4, 512, 17, 17, 64),
    ] {
        assert!(att::runs_bf16(&ctx, s));
        let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
        let (q, k, v, dout) = (
            rng.normal_vec(nq, 1.0),
            rng.normal_vec(nkv, 1.0),
            rng.normal_vec(nkv, 1.0),
            rng.normal_vec(nq, 1.0),
        );
        let (q64, k64, v64, d64) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&dout));
        let (qr, kr, vr, dr) = (
            round_bf16(&q),
            round_bf16(&k),
            round_bf16(&v),
            round_bf16(&dout),
        );
        let (qb, kb, vb, db) = (up(&ctx, &q), up(&ctx, &k), up(&ctx, &v), up(&ctx, &dout));
        let name = format!("B{} T{} H{} G{} D{}", s.b, s.t, s.h, s.g, s.d);

        let (mut out, mut lse) = (ctx.alloc(nq).unwrap(), ctx.alloc(s.b * s.h * s.t).unwrap());
        att::attention_fwd_cuda(&mut out, &mut lse, &qb, &kb, &vb, s).unwrap();
        let (mut want, mut want_r) = (vec![0.0; nq], vec![0.0; nq]);
        att::attention_fwd_ref(&mut want, &q64, &k64, &v64, s);
        att::attention_fwd_ref(&mut want_r, &qr, &kr, &vr, s);
        check_bf16(&mut r, &format!("out {name}"), &down(&out), &want, &want_r);
        check_bf16(
            &mut r,
            &format!("lse {name}"),
            &down(&lse),
            &lse_ref(&q64, &k64, s),
            &lse_ref(&qr, &kr, s),
        );

        let (dq, dk, dv) = gpu_bwd(&ctx, [&db, &qb, &kb, &vb], &out, &lse, s);
        let (mut wq, mut wk, mut wv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        att::attention_bwd_ref(&mut wq, &mut wk, &mut wv, &d64, &q64, &k64, &v64, s);
        let (mut rq, mut rk, mut rv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        att::attention_bwd_ref(&mut rq, &mut rk, &mut rv, &dr, &qr, &kr, &vr, s);
        check_bf16(&mut r, &format!("dq {name}"), &dq, &wq, &rq);
        check_bf16(&mut r, &format!("dk {name}"), &dk, &wk, &rk);
        check_bf16(&mut r, &format!("dv {name}"), &dv, &wv, &rv);

        // dK alone (dq and dv null) is the joint pass's dK: summed in a fixed order, independent of dQ.
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
        r.expect(&format!("dk alone {name}"), down(&dk_only) == dk);
    }
    // Through the tape (loss = sum(out ∘ r), so dout = r): the backward reuses the forward's bf16 copies of q, k,
    // v, and must give what the standalone calls give: out, dk and dv bitwise (fixed summation order), dq up to
    // the order of its atomic adds.
    let s = shape(2, 45, 6, 2, 64);
    let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
    let host = [nq, nkv, nkv, nq].map(|n| rng.normal_vec(n, 1.0));
    let bufs: Vec<GpuBuf> = host.iter().map(|v| up(&ctx, v)).collect();
    let (mut out, mut lse) = (ctx.alloc(nq).unwrap(), ctx.alloc(s.b * s.h * s.t).unwrap());
    att::attention_fwd_cuda(&mut out, &mut lse, &bufs[0], &bufs[1], &bufs[2], s).unwrap();
    let (dq, dk, dv) = gpu_bwd(
        &ctx,
        [&bufs[3], &bufs[0], &bufs[1], &bufs[2]],
        &out,
        &lse,
        s,
    );
    let mut tape = Tape::new();
    let vars: Vec<_> = [s.h, s.g, s.g]
        .iter()
        .zip(&host)
        .map(|(&heads, v)| {
            let t = Tensor::from_vec(&[s.b, s.t, heads, s.d], v.clone()).unwrap();
            tape.leaf(t.to_device(&ctx).unwrap(), true)
        })
        .collect();
    let y = att::attention(&mut tape, vars[0], vars[1], vars[2]).unwrap();
    let rv = tape.input(
        Tensor::from_vec(&[s.b, s.t, s.h, s.d], host[3].clone())
            .unwrap()
            .to_device(&ctx)
            .unwrap(),
    );
    let prod = eqat::ops::mul::mul(&mut tape, y, rv).unwrap();
    let loss = eqat::ops::sum::sum(&mut tape, prod).unwrap();
    tape.backward(loss).unwrap();
    let host_of = |t: &Tensor| t.to_host().unwrap().to_f32_vec();
    r.expect("tape out", host_of(tape.value(y)) == down(&out));
    r.expect("tape dk", host_of(tape.grad(vars[1]).unwrap()) == dk);
    r.expect("tape dv", host_of(tape.grad(vars[2]).unwrap()) == dv);
    r.check(
        "tape dq",
        &host_of(tape.grad(vars[0]).unwrap()),
        &to_f64(&dq),
    );

    // A NaN in k reaches every later row of the output (NaN never passes as a small error).
    let s = shape(1, 70, 2, 1, 64);
    let mut k = rng.normal_vec(s.t * s.g * s.d, 1.0);
    k[5 * s.d] = f32::NAN;
    let q = up(&ctx, &rng.normal_vec(s.t * s.h * s.d, 1.0));
    let (k, v) = (
        up(&ctx, &k),
        up(&ctx, &rng.normal_vec(s.t * s.g * s.d, 1.0)),
    );
    let (mut out, mut lse) = (
        ctx.alloc(s.t * s.h * s.d).unwrap(),
        ctx.alloc(s.h * s.t).unwrap(),
    );
    att::attention_fwd_cuda(&mut out, &mut lse, &q, &k, &v, s).unwrap();
    let out = down(&out);
    let row = s.h * s.d;
    r.expect(
        "rows before the NaN key stay finite",
        out[..5 * row].iter().all(|x| x.is_finite()),
    );
    r.expect(
        "rows at and after the NaN key are NaN",
        out[5 * row..].iter().all(|x| x.is_nan()),
    );
    r.finish();
}

/// Forward and forward+backward at the Llama-2-7B and SmolLM2-135M attention shapes; prints TFLOP/s.
#[test]
#[ignore = "timing: run on the GPU with --ignored --nocapture"]
fn attention_timing() {
    let Some(ctx) = device("attention timing") else {
        return;
    };
    ctx.set_poison(false);
    let bctx = eqat::gpu::GpuContext::new(0).unwrap();
    bctx.set_matmul_bf16(true);
    for (model, s) in [
        ("Llama-2-7B", shape(2, 2048, 32, 32, 128)),
        ("Llama-2-70B", shape(2, 2048, 64, 8, 128)),
        ("SmolLM2-135M", shape(2, 2048, 9, 3, 64)),
    ] {
        for (mode, c) in [("f32", &ctx), ("bf16", &bctx)] {
            let t: AttentionTiming = att::time_attention_cuda(c, s, 20).unwrap();
            say(&format!(
            "attention {mode:<4} {model:<13} B{} T{} H{} G{} D{}: fwd {:.3} ms ({:.1} TFLOP/s), fwd+bwd {:.3} ms ({:.1} TFLOP/s)",
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
    }
    ctx.set_poison(true);
}
