//! rmsnorm on the GPU: its kernels against the f64 reference (forward, rstd, and the backward to x and to the
//! weight, alone and together) on rows from 1 to 16384 values, and the residual add fused into the norm's pass
//! (`add_rmsnorm`) against `add` then `rmsnorm` bit for bit. New device buffers are NaN-poisoned, so an unwritten
//! output fails, and NaN never passes. Without a GPU each test prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::gpu::GpuContext;
use eqat::ops::{add::add, mse::mse, rmsnorm, rmsnorm::rmsnorm};
use eqat::testing::to_f64;
use eqat::{Rng, Tape, Tensor};

#[test]
fn rmsnorm_matches_ref() {
    let Some(ctx) = device("rmsnorm") else { return };
    let mut r = Report::new("rmsnorm fwd/bwd");
    let mut rng = Rng::new(103);
    // 67 rows end in a partial 4-row backward block; C 1/7/13/33 are below a warp; 8192 fills the 8-value-per-
    // thread kernel's 1024 threads, 12288 and 16384 take the wide kernel (32 per thread).
    let shapes = [
        (1, 1),
        (3, 7),
        (5, 13),
        (100, 33),
        (4, 576),
        (67, 4096),
        (9, 8192),
        (6, 12288),
        (3, 16384),
    ];
    for (rows, c) in shapes {
        let mut x = rng.normal_vec(rows * c, 1.0);
        for row in x.chunks_mut(c) {
            let s = 0.1 + 3.0 * rng.uniform() as f32;
            row.iter_mut().for_each(|v| *v *= s);
        }
        let (w, dout) = (rng.normal_vec(c, 1.0), rng.normal_vec(rows * c, 1.0));
        let (x64, w64, d64) = (to_f64(&x), to_f64(&w), to_f64(&dout));
        let (xb, wb, db) = (up(&ctx, &x), up(&ctx, &w), up(&ctx, &dout));
        let (mut out, mut rstd) = (ctx.alloc(rows * c).unwrap(), ctx.alloc(rows).unwrap());
        rmsnorm::rmsnorm_fwd_cuda(&mut out, &mut rstd, &xb, &wb, 1e-5).unwrap();
        let (mut want, mut want_rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        rmsnorm::rmsnorm_fwd_ref(&mut want, &mut want_rstd, &x64, &w64, 1e-5);
        r.check(&format!("fwd [{rows}, {c}]"), &down(&out), &want);
        r.check(&format!("rstd [{rows}, {c}]"), &down(&rstd), &want_rstd);

        let (mut dx, mut dw) = (ctx.alloc(rows * c).unwrap(), ctx.alloc(c).unwrap());
        rmsnorm::rmsnorm_bwd_cuda(Some(&mut dx), Some(&mut dw), &db, &xb, &wb, &rstd).unwrap();
        let (mut wdx, mut wdw) = (vec![0.0; rows * c], vec![0.0; c]);
        rmsnorm::rmsnorm_bwd_ref(&mut wdx, &mut wdw, &d64, &x64, &w64, &want_rstd);
        // dx = rstd·w·dy − k·x is a difference of two terms of size |rstd·w·dy| (for C = 1 they cancel exactly
        // in exact arithmetic), so its error is judged on the scale of that term rather than of dx itself.
        let term: Vec<f64> = (0..rows * c)
            .map(|i| want_rstd[i / c] * w64[i % c] * d64[i])
            .collect();
        r.check_tol(
            &format!("dx [{rows}, {c}]"),
            &down(&dx),
            &wdx,
            RTOL * rms(&term),
            RTOL,
        );
        r.check(&format!("dw [{rows}, {c}]"), &down(&dw), &wdw);
        let mut dx_only = ctx.alloc(rows * c).unwrap();
        rmsnorm::rmsnorm_bwd_cuda(Some(&mut dx_only), None, &db, &xb, &wb, &rstd).unwrap();
        r.expect(
            &format!("dx alone [{rows}, {c}]"),
            down(&dx_only) == down(&dx),
        );
        let mut dw_only = ctx.alloc(c).unwrap();
        rmsnorm::rmsnorm_bwd_cuda(None, Some(&mut dw_only), &db, &xb, &wb, &rstd).unwrap();
        r.expect(
            &format!("dw alone [{rows}, {c}]"),
            down(&dw_only) == down(&dw),
        );
    }
    let (c, wide) = (16385, ctx.alloc(16385).unwrap());
    let (mut out, mut rstd) = (ctx.alloc(c).unwrap(), ctx.alloc(1).unwrap());
    r.expect(
        "rows over 16384 values are refused",
        rmsnorm::rmsnorm_fwd_cuda(&mut out, &mut rstd, &wide, &wide, 1e-5).is_err(),
    );
    r.finish();
}

/// `add_rmsnorm` (the residual add fused into the norm's pass) against `add` then `rmsnorm`: the sum, the norm, its
/// bf16 copy's product and every gradient bit for bit, in the f32 and the bf16 mode, on rows of the 8-value and the
/// wide kernels.
#[test]
fn add_rmsnorm_equals_add_then_rmsnorm() {
    let Some(_) = device("add_rmsnorm") else {
        return;
    };
    let ctx = GpuContext::new(0).unwrap();
    ctx.set_poison(true);
    let mut r = Report::new("add_rmsnorm");
    let mut rng = Rng::new(733);
    for (rows, c) in [(37, 64), (5, 576), (3, 12288)] {
        let x = Tensor::randn(&[rows, c], 1.0, &mut rng);
        let o = Tensor::randn(&[rows, c], 0.5, &mut rng);
        let w = Tensor::randn(&[c], 1.0, &mut rng);
        let (t1, t2) = (
            Tensor::randn(&[rows, c], 1.0, &mut rng),
            Tensor::randn(&[rows, c], 1.0, &mut rng),
        );
        for bf16 in [false, true] {
            ctx.set_matmul_bf16(bf16);
            let run = |fused: bool| -> Vec<Vec<f32>> {
                let mut tape = Tape::new();
                let wv = tape.param(w.to_device(&ctx).unwrap()).unwrap();
                let xv = tape.leaf(x.to_device(&ctx).unwrap(), true);
                let ov = tape.leaf(o.to_device(&ctx).unwrap(), true);
                let (sum, h) = match fused {
                    true => eqat::ops::rmsnorm::add_rmsnorm(&mut tape, xv, ov, wv, 1e-5).unwrap(),
                    false => {
                        let s = add(&mut tape, xv, ov).unwrap();
                        (s, rmsnorm(&mut tape, s, wv, 1e-5).unwrap())
                    }
                };
                let hb = tape.bf16_copy(h).map(|b| b.to_f32_vec().unwrap());
                let (tv1, tv2) = (
                    tape.input(t1.to_device(&ctx).unwrap()),
                    tape.input(t2.to_device(&ctx).unwrap()),
                );
                let (l1, l2) = (
                    mse(&mut tape, h, tv1).unwrap(),
                    mse(&mut tape, sum, tv2).unwrap(),
                );
                let l = add(&mut tape, l1, l2).unwrap();
                tape.backward(l).unwrap();
                let mut got = vec![
                    tape.value(sum).to_f32_vec(),
                    tape.value(h).to_f32_vec(),
                    hb.unwrap(),
                ];
                got.extend(
                    [xv, ov, wv]
                        .iter()
                        .map(|&v| tape.grad(v).unwrap().to_f32_vec()),
                );
                got
            };
            let (fused, plain) = (run(true), run(false));
            for (i, what) in ["x + res", "norm", "norm's bf16 copy", "dx", "dres", "dw"]
                .iter()
                .enumerate()
            {
                r.expect(
                    &format!("[{rows}, {c}] bf16 {bf16}: {what} bit for bit"),
                    fused[i] == plain[i],
                );
            }
        }
    }
    r.finish();
}
