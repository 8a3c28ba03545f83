//! GPU kernels against the CPU references (rmsnorm's are in tests/cuda_norms.rs): every op's `_cuda` forward and
//! backward on fresh random inputs of several shapes (odd sizes included), compared with the f64 `_ref` at 1e-5
//! relative (cuda_common::RTOL); the exceptions are documented where they are made. New device buffers are
//! NaN-poisoned, so an output element a kernel forgets to write fails, and NaN never passes. Without a GPU each test
//! prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::ops::linear::cast_bf16_cuda;
use eqat::ops::{add, linear, mse, rope, swiglu};
use eqat::quant::fake_quant::{self as fq, QuantConfig, PER_CHANNEL};
use eqat::testing::to_f64;
use eqat::{Rng, Tensor};

#[test]
fn add_matches_ref() {
    let Some(ctx) = device("add") else { return };
    let mut r = Report::new("add fwd/bwd/assign");
    let mut rng = Rng::new(101);
    for (na, nb) in [
        (1, 1),
        (7 * 13, 13),
        (3 * 5 * 33, 5 * 33),
        (1000 * 257, 257),
        (4096, 4096),
    ] {
        let (a, b, dout) = (
            rng.normal_vec(na, 1.0),
            rng.normal_vec(nb, 1.0),
            rng.normal_vec(na, 1.0),
        );
        let mut out = ctx.alloc(na).unwrap();
        add::add_fwd_cuda(&mut out, &up(&ctx, &a), &up(&ctx, &b)).unwrap();
        let mut want = vec![0.0; na];
        add::add_fwd_ref(&mut want, &to_f64(&a), &to_f64(&b));
        r.check(&format!("fwd {na}/{nb}"), &down(&out), &want);

        let mut db = ctx.alloc(nb).unwrap();
        add::add_bwd_cuda(&mut db, &up(&ctx, &dout)).unwrap();
        let mut want_db = vec![0.0; nb];
        add::add_bwd_ref(None, Some(&mut want_db), &to_f64(&dout));
        r.check(&format!("db {na}/{nb}"), &down(&db), &want_db);

        let mut acc = up(&ctx, &a);
        add::add_assign_cuda(&mut acc, &up(&ctx, &dout)).unwrap();
        let want: Vec<f64> = a
            .iter()
            .zip(&dout)
            .map(|(x, y)| *x as f64 + *y as f64)
            .collect();
        r.check(&format!("assign {na}"), &down(&acc), &want);
    }
    r.finish();
}

#[test]
fn swiglu_matches_ref() {
    let Some(ctx) = device("swiglu") else { return };
    let mut r = Report::new("swiglu fwd/bwd");
    let mut rng = Rng::new(102);
    for n in [1, 7, 13, 33, 1536, 100_003] {
        let mut gate = rng.normal_vec(n, 4.0);
        gate[0] = -150.0; // sigmoid underflows to 0: the limit must come out, not a NaN
        let (up_v, dout) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
        let (g64, u64_, d64) = (to_f64(&gate), to_f64(&up_v), to_f64(&dout));
        let (gb, ub, db) = (up(&ctx, &gate), up(&ctx, &up_v), up(&ctx, &dout));
        let mut out = ctx.alloc(n).unwrap();
        swiglu::swiglu_fwd_cuda(&mut out, &gb, &ub).unwrap();
        let mut want = vec![0.0; n];
        swiglu::swiglu_fwd_ref(&mut want, &g64, &u64_);
        r.check(&format!("fwd n={n}"), &down(&out), &want);

        let (mut dg, mut du) = (ctx.alloc(n).unwrap(), ctx.alloc(n).unwrap());
        swiglu::swiglu_bwd_cuda(Some(&mut dg), Some(&mut du), &db, &gb, &ub).unwrap();
        let (mut wg, mut wu) = (vec![0.0; n], vec![0.0; n]);
        swiglu::swiglu_bwd_ref(Some(&mut wg), Some(&mut wu), &d64, &g64, &u64_);
        r.check(&format!("dgate n={n}"), &down(&dg), &wg);
        r.check(&format!("dup n={n}"), &down(&du), &wu);
        // One gradient alone (the other pointer null) equals the joint pass.
        let mut dg_only = ctx.alloc(n).unwrap();
        swiglu::swiglu_bwd_cuda(Some(&mut dg_only), None, &db, &gb, &ub).unwrap();
        r.expect(&format!("dgate alone n={n}"), down(&dg_only) == down(&dg));
        let mut du_only = ctx.alloc(n).unwrap();
        swiglu::swiglu_bwd_cuda(None, Some(&mut du_only), &db, &gb, &ub).unwrap();
        r.expect(&format!("dup alone n={n}"), down(&du_only) == down(&du));
    }
    r.finish();
}

#[test]
fn rope_matches_ref() {
    let Some(ctx) = device("rope") else { return };
    let mut r = Report::new("rope fwd/bwd");
    let mut rng = Rng::new(104);
    let shapes = [
        [1, 1, 1, 2],
        [2, 5, 3, 8],
        [1, 7, 2, 6],
        [2, 13, 3, 64],
        [2, 37, 5, 128],
    ];
    for shape in shapes {
        for layout in [rope::RopeLayout::HalfSplit, rope::RopeLayout::Interleaved] {
            // pos0 4090 with Llama 3's base: large angles, where an f32 angle would be off by ~2e-4 rad.
            for (pos0, base) in [(0, 1e4f32), (4090, 5e5)] {
                let n = shape.iter().product();
                let (x, dout) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
                let table = rope::RopeTable::new(shape[1], shape[3], pos0, base);
                let dt = table.to_device(&ctx).unwrap();
                let name = format!("{shape:?} {layout:?} pos0 {pos0}");
                let mut out = ctx.alloc(n).unwrap();
                let bufs = rope::RopeBufs::F32(&mut out, &up(&ctx, &x));
                rope::rope_fwd_cuda(bufs, shape, &dt, layout).unwrap();
                let mut want = vec![0.0; n];
                rope::rope_fwd_ref(&mut want, &to_f64(&x), shape, pos0, base as f64, layout);
                r.check(&format!("fwd {name}"), &down(&out), &want);
                let mut dx = ctx.alloc(n).unwrap();
                let bufs = rope::RopeBufs::F32(&mut dx, &up(&ctx, &dout));
                rope::rope_bwd_cuda(bufs, shape, &dt, layout).unwrap();
                let mut want_dx = vec![0.0; n];
                rope::rope_bwd_ref(
                    &mut want_dx,
                    &to_f64(&dout),
                    shape,
                    pos0,
                    base as f64,
                    layout,
                );
                r.check(&format!("dx {name}"), &down(&dx), &want_dx);
                // bf16 in and out (the bf16 mode's q and k): the f32 results of the bf16-rounded inputs,
                // rounded once more (2^-8 relative), near zero the f32 error of a two-term sum.
                let rounded = |v: &[f32]| -> Vec<f32> {
                    v.iter()
                        .map(|&a| half::bf16::from_f32(a).to_f32())
                        .collect()
                };
                let (xr, dr) = (rounded(&x), rounded(&dout));
                let mut want = vec![0.0; n];
                rope::rope_fwd_ref(&mut want, &to_f64(&xr), shape, pos0, base as f64, layout);
                let mut out_b = ctx.alloc_bf16(n).unwrap();
                let xb = cast_bf16_cuda(&up(&ctx, &xr)).unwrap();
                rope::rope_fwd_cuda(rope::RopeBufs::Bf16(&mut out_b, &xb), shape, &dt, layout)
                    .unwrap();
                let atol = 1e-6 * rms(&want);
                let rtol = 2f64.powi(-8) + 1e-5;
                let got = out_b.to_f32_vec().unwrap();
                r.check_tol(&format!("bf16 fwd {name}"), &got, &want, atol, rtol);
                let mut want = vec![0.0; n];
                rope::rope_bwd_ref(&mut want, &to_f64(&dr), shape, pos0, base as f64, layout);
                let mut dx_b = ctx.alloc_bf16(n).unwrap();
                let db = cast_bf16_cuda(&up(&ctx, &dr)).unwrap();
                rope::rope_bwd_cuda(rope::RopeBufs::Bf16(&mut dx_b, &db), shape, &dt, layout)
                    .unwrap();
                let got = dx_b.to_f32_vec().unwrap();
                r.check_tol(
                    &format!("bf16 dx {name}"),
                    &got,
                    &want,
                    1e-6 * rms(&want),
                    rtol,
                );
                // An f32 gradient in, bf16 out (attention's unrounded dq): f32 dx rounded once.
                let mut dx_b = ctx.alloc_bf16(n).unwrap();
                let bufs = rope::RopeBufs::Bf16FromF32(&mut dx_b, &up(&ctx, &dout));
                rope::rope_bwd_cuda(bufs, shape, &dt, layout).unwrap();
                let got = dx_b.to_f32_vec().unwrap();
                r.check_tol(
                    &format!("f32 to bf16 dx {name}"),
                    &got,
                    &want_dx,
                    1e-6 * rms(&want_dx),
                    rtol,
                );
                let mut out_b = ctx.alloc_bf16(n).unwrap();
                let bufs = rope::RopeBufs::Bf16FromF32(&mut out_b, &up(&ctx, &x));
                r.expect(
                    &format!("no f32-to-bf16 forward {name}"),
                    rope::rope_fwd_cuda(bufs, shape, &dt, layout).is_err(),
                );
            }
        }
    }
    r.finish();
}

#[test]
fn mse_matches_ref() {
    let Some(ctx) = device("mse") else { return };
    let mut r = Report::new("mse fwd/bwd");
    let mut rng = Rng::new(105);
    // 2^20 + 3 elements need more than the 1024 first-pass blocks' one sweep: the grid-stride loop runs.
    for n in [1, 7, 13, 64, 9_001, (1 << 20) + 3] {
        let (p, t) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
        let (p64, t64) = (to_f64(&p), to_f64(&t));
        let (pb, tb) = (up(&ctx, &p), up(&ctx, &t));
        let mut loss = ctx.alloc(1).unwrap();
        mse::mse_fwd_cuda(&mut loss, &pb, &tb).unwrap();
        r.check(
            &format!("loss n={n}"),
            &down(&loss),
            &[mse::mse_fwd_ref(&p64, &t64)],
        );
        let dout = 0.37f32;
        let (mut dp, mut dt) = (ctx.alloc(n).unwrap(), ctx.alloc(n).unwrap());
        mse::mse_bwd_cuda(Some(&mut dp), Some(&mut dt), &pb, &tb, &up(&ctx, &[dout])).unwrap();
        let (mut wp, mut wt) = (vec![0.0; n], vec![0.0; n]);
        mse::mse_bwd_ref(Some(&mut wp), Some(&mut wt), &p64, &t64, dout as f64);
        r.check(&format!("dpred n={n}"), &down(&dp), &wp);
        r.check(&format!("dtarget n={n}"), &down(&dt), &wt);
        // The CPU path does the same f32 operations per element: the gradients agree bit for bit.
        let (mut cp, mut ct) = (vec![0.0; n], vec![0.0; n]);
        mse::mse_bwd_cpu(Some(&mut cp), Some(&mut ct), &p, &t, dout);
        r.expect(
            &format!("dpred == cpu n={n}"),
            down(&dp) == cp && down(&dt) == ct,
        );
        // mse_loss: the forward's early gradient (dout = 1) equals mse's backward bit for bit, as the loss
        // backward starts from and, through a sum of two, as a part of one.
        let grads = |as_loss: bool, twice: bool| {
            let mut tape = eqat::autograd::Tape::new();
            let pv = tape.leaf(
                Tensor::from_vec(&[n], p.clone())
                    .unwrap()
                    .to_device(&ctx)
                    .unwrap(),
                true,
            );
            let tv = tape.input(
                Tensor::from_vec(&[n], t.clone())
                    .unwrap()
                    .to_device(&ctx)
                    .unwrap(),
            );
            let f = if as_loss { mse::mse_loss } else { mse::mse };
            let mut l = f(&mut tape, pv, tv).unwrap();
            if twice {
                let l2 = f(&mut tape, pv, tv).unwrap();
                l = add::add(&mut tape, l, l2).unwrap();
            }
            tape.backward(l).unwrap();
            (
                tape.value(l).to_f32_vec(),
                tape.grad(pv).unwrap().to_f32_vec(),
            )
        };
        for twice in [false, true] {
            r.expect(
                &format!("mse_loss == mse, loss and dpred, n={n} twice {twice}"),
                grads(true, twice) == grads(false, twice),
            );
        }
    }
    r.finish();
}

/// Weights, scales and zeros as the CPU tests draw them: min-max init perturbed so that some elements clamp, and
/// weights moved off the .5 ties where f32 and f64 quotients could round apart.
fn fake_quant_case(
    rng: &mut Rng,
    n: usize,
    k: usize,
    cfg: QuantConfig,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = cfg.group_len(k).unwrap();
    let mut w = rng.normal_vec(n * k, 0.05);
    let (s0, z0) = fq::init_minmax(&Tensor::from_vec(&[n, k], w.clone()).unwrap(), cfg).unwrap();
    let s: Vec<f32> = s0
        .to_f32_vec()
        .iter()
        .map(|&s| s * (0.6 + 0.8 * rng.uniform() as f32))
        .collect();
    let z: Vec<f32> = z0
        .to_f32_vec()
        .iter()
        .map(|&z| z + (4.0 * rng.uniform() - 2.0) as f32)
        .collect();
    for (i, w) in w.iter_mut().enumerate() {
        let x = *w as f64 / s[i / g] as f64;
        if ((x - x.floor()) - 0.5).abs() < 1e-3 {
            *w += 0.1 * s[i / g];
        }
    }
    (w, s, z)
}

#[test]
fn fake_quant_matches_ref() {
    let Some(ctx) = device("fake_quant") else {
        return;
    };
    let mut r = Report::new("fake_quant fwd/bwd");
    let mut rng = Rng::new(106);
    let mut clamped = 0usize;
    for (n, k, wbits, group) in [
        (1, 8, 2, 8),
        (3, 13, 3, PER_CHANNEL),
        (5, 86, 4, 43),
        (7, 128, 2, 32),
        (4, 256, 8, 128),
        (2, 33, 5, 11),
        (64, 576, 2, 64),
        (33, 1536, 4, 128),
    ] {
        let cfg = QuantConfig::new(wbits, group).unwrap();
        let g = cfg.group_len(k).unwrap();
        let (qmax, qmax64) = (cfg.qmax(), cfg.qmax() as f64);
        let (w, s, z) = fake_quant_case(&mut rng, n, k, cfg);
        let dout = rng.normal_vec(n * k, 1.0);
        let (w64, s64, z64, d64) = (to_f64(&w), to_f64(&s), to_f64(&z), to_f64(&dout));
        let (wb, sb, zb, db) = (up(&ctx, &w), up(&ctx, &s), up(&ctx, &z), up(&ctx, &dout));
        let name = format!("n{n} k{k} w{wbits} g{g}");

        let mut out = ctx.alloc(n * k).unwrap();
        fq::fake_quant_fwd_cuda(&mut out, &wb, &sb, &zb, g, qmax).unwrap();
        let mut want = vec![0.0; n * k];
        fq::fake_quant_fwd_ref(&mut want, &w64, &s64, &z64, g, qmax64);
        r.check(&format!("fwd {name}"), &down(&out), &want);
        let mut cpu = vec![0.0; n * k];
        fq::fake_quant_fwd_cpu(&mut cpu, &w, &s, &z, g, qmax);
        r.expect(&format!("fwd == cpu bitwise {name}"), down(&out) == cpu);

        let ng = s.len();
        let (mut dw, mut ds, mut dz) = (
            ctx.alloc(n * k).unwrap(),
            ctx.alloc(ng).unwrap(),
            ctx.alloc(ng).unwrap(),
        );
        fq::fake_quant_bwd_cuda(
            Some(&mut dw),
            Some(&mut ds),
            Some(&mut dz),
            &db,
            &wb,
            &sb,
            &zb,
            g,
            qmax,
        )
        .unwrap();
        let (mut wdw, mut wds, mut wdz) = (vec![0.0; n * k], vec![0.0; ng], vec![0.0; ng]);
        fq::fake_quant_bwd_ref(
            &mut wdw, &mut wds, &mut wdz, &d64, &w64, &s64, &z64, g, qmax64,
        );
        clamped += wdw
            .iter()
            .zip(&d64)
            .filter(|(a, b)| **a == 0.0 && **b != 0.0)
            .count();
        r.check(&format!("dw {name}"), &down(&dw), &wdw);
        r.check(&format!("dz {name}"), &down(&dz), &wdz);
        // Exception, ds against the f64 reference: x = w/s is rounded to f32 before round(x) - x is taken. With
        // |x| up to ~qmax (255 at 8 bits) that rounding is up to 1.5e-5 absolute per element, which the f64
        // reference does not make; summed over a group of up to 1536 it reaches ~1e-4 (the CPU tests' DS_ATOL).
        r.check_tol(&format!("ds vs ref {name}"), &down(&ds), &wds, 1e-4, 1e-5);
        // ... and against the CPU path, which rounds x identically: the standard 1e-5 bar.
        let (mut cdw, mut cds, mut cdz) = (vec![0.0; n * k], vec![0.0; ng], vec![0.0; ng]);
        fq::fake_quant_bwd_cpu(
            Some(&mut cdw),
            Some(&mut cds),
            Some(&mut cdz),
            &dout,
            &w,
            &s,
            &z,
            g,
            qmax,
        );
        r.check(&format!("ds vs cpu {name}"), &down(&ds), &to_f64(&cds));
        r.expect(&format!("dw == cpu bitwise {name}"), down(&dw) == cdw);
        // Only ds wanted (dw and dz null): the same ds.
        let mut ds_only = ctx.alloc(ng).unwrap();
        fq::fake_quant_bwd_cuda(None, Some(&mut ds_only), None, &db, &wb, &sb, &zb, g, qmax)
            .unwrap();
        r.expect(&format!("ds alone {name}"), down(&ds_only) == down(&ds));
    }
    r.expect(&format!("some elements clamp ({clamped})"), clamped > 0);
    r.finish();
}

#[test]
fn linear_matches_ref() {
    let Some(ctx) = device("linear") else { return };
    let mut r = Report::new("linear (cuBLAS) fwd/bwd");
    let mut rng = Rng::new(107);
    // (rows, K, N): odd sizes, K = 0 (an empty sum: out is the bias), and a SmolLM2-sized MLP product.
    for (rows, k, n) in [
        (1, 1, 1),
        (1, 7, 3),
        (6, 13, 5),
        (33, 17, 65),
        (300, 40, 24),
        (2, 0, 3),
        (64, 576, 1536),
    ] {
        let d = linear::LinearDims { rows, k, n };
        for with_bias in [false, true] {
            let (x, w, dout) = (
                rng.normal_vec(rows * k, 1.0),
                rng.normal_vec(n * k, 1.0),
                rng.normal_vec(rows * n, 1.0),
            );
            let b = rng.normal_vec(n, 1.0);
            let bias = with_bias.then_some(&b);
            let (x64, w64, b64, d64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dout));
            let (xb, wb, bb, db) = (up(&ctx, &x), up(&ctx, &w), up(&ctx, &b), up(&ctx, &dout));
            let name = format!("rows {rows} k {k} n {n} bias {with_bias}");
            let mut out = ctx.alloc(rows * n).unwrap();
            linear::linear_fwd_cuda(&mut out, &xb, &wb, bias.map(|_| &bb), d).unwrap();
            let mut want = vec![0.0; rows * n];
            linear::linear_fwd_ref(&mut want, &x64, &w64, bias.map(|_| &b64[..]), d);
            r.check(&format!("fwd {name}"), &down(&out), &want);

            let (mut dx, mut dw, mut dbias) = (
                ctx.alloc(rows * k).unwrap(),
                ctx.alloc(n * k).unwrap(),
                ctx.alloc(n).unwrap(),
            );
            linear::linear_bwd_cuda(
                Some(&mut dx),
                Some(&mut dw),
                Some(&mut dbias),
                &db,
                &xb,
                &wb,
                d,
            )
            .unwrap();
            let (mut wx, mut ww, mut wbias) = (vec![0.0; rows * k], vec![0.0; n * k], vec![0.0; n]);
            linear::linear_bwd_ref(
                Some(&mut wx),
                Some(&mut ww),
                Some(&mut wbias),
                &d64,
                &x64,
                &w64,
                d,
            );
            r.check(&format!("dx {name}"), &down(&dx), &wx);
            r.check(&format!("dw {name}"), &down(&dw), &ww);
            r.check(&format!("db {name}"), &down(&dbias), &wbias);
        }
    }
    r.finish();
}
