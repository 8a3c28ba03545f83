//! The GPU twins of the remaining core ops against their f64 references: cross_entropy, embedding, silu, mul,
//! scale, sum/mean, softmax, transpose and matmul (strided-batched cuBLAS), each forward and backward on fresh
//! random inputs of several shapes (odd sizes included), at the 1e-5 relative bar of cuda_common::RTOL (exceptions
//! documented where made). New device buffers are NaN-poisoned, so an unwritten output fails, and NaN never
//! passes. Without a GPU each test prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::gpu::{GpuBuf, GpuContext};
use eqat::ops::cross_entropy::{self as ce, cuda as ce_cuda};
use eqat::ops::matmul::{self, MatmulDims};
use eqat::ops::{embedding, mul, scale, silu, softmax, sum, transpose};
use eqat::testing::to_f64;
use eqat::Rng;
use std::sync::Arc;

fn up_ints(ctx: &Arc<GpuContext>, v: &[i32]) -> GpuBuf {
    let bits: Vec<u32> = v.iter().map(|&t| t as u32).collect();
    ctx.upload_bits(&bits).unwrap()
}

#[test]
fn cross_entropy_matches_ref() {
    let Some(ctx) = device("cross_entropy") else {
        return;
    };
    let mut r = Report::new("cross_entropy fwd/bwd");
    let mut rng = Rng::new(301);
    // (N, V, std, offset, ignore_index): V = 1, below and above a warp and a block; logits near 1000 (the
    // max/log_sum split matters); an ignore_index inside [0, V); SmolLM2's V and the 128k of Llama 3.
    let cases = [
        (1, 1, 1.0, 0.0, -100),
        (1, 7, 1.0, 0.0, -100),
        (5, 13, 3.0, 0.0, -100),
        (8, 33, 3.0, 0.0, -100),
        (6, 1025, 2.0, 0.0, -100),
        (7, 300, 3.0, 1000.0, -100),
        (9, 13, 1.0, -50.0, 0),
        (17, 49_152, 4.0, 0.0, -100),
        (3, 128_256, 4.0, 0.0, -100),
    ];
    for (n, v, std, offset, ignore) in cases {
        let logits: Vec<f32> = rng
            .normal_vec(n * v, std)
            .iter()
            .map(|x| x + offset)
            .collect();
        // About a quarter of the rows ignored; row 0 always counts.
        let targets: Vec<i32> = (0..n)
            .map(|row| {
                let t = rng.below(v) as i32;
                if row > 0 && rng.below(4) == 0 {
                    ignore
                } else if t == ignore {
                    (t + 1) % v as i32
                } else {
                    t
                }
            })
            .collect();
        let count = targets.iter().filter(|&&t| t != ignore).count();
        let name = format!("N {n} V {v} offset {offset} ignore {ignore}");
        let (lb, tb) = (up(&ctx, &logits), up_ints(&ctx, &targets));
        let (mut loss, mut lse_max, mut lse_log_sum) = (
            ctx.alloc(1).unwrap(),
            ctx.alloc(n).unwrap(),
            ctx.alloc(n).unwrap(),
        );
        ce_cuda::cross_entropy_fwd_cuda(
            &mut loss,
            &mut lse_max,
            &mut lse_log_sum,
            &lb,
            &tb,
            ignore,
            v,
            count,
        )
        .unwrap();
        let l64 = to_f64(&logits);
        let want = ce::cross_entropy_fwd_ref(&l64, v, &targets, ignore);
        r.check(&format!("loss {name}"), &down(&loss), &[want]);

        let dout = 0.73f32;
        let mut dl = ctx.alloc(n * v).unwrap();
        ce_cuda::cross_entropy_bwd_cuda(
            &mut dl,
            &lb,
            &tb,
            ignore,
            &lse_max,
            &lse_log_sum,
            &up(&ctx, &[dout]),
            v,
            count,
        )
        .unwrap();
        let mut want = vec![0.0; n * v];
        ce::cross_entropy_bwd_ref(&mut want, &l64, v, &targets, ignore, dout as f64);
        r.check(&format!("dlogits {name}"), &down(&dl), &want);
    }

    // A NaN logit makes its row's loss and gradients NaN (as torch does) and leaves the other rows alone.
    let (n, v) = (3, 40);
    let mut logits = rng.normal_vec(n * v, 1.0);
    logits[v + 5] = f32::NAN;
    let targets = [1, 2, 3];
    let (lb, tb) = (up(&ctx, &logits), up_ints(&ctx, &targets));
    let (mut loss, mut lse_max, mut lse_log_sum) = (
        ctx.alloc(1).unwrap(),
        ctx.alloc(n).unwrap(),
        ctx.alloc(n).unwrap(),
    );
    ce_cuda::cross_entropy_fwd_cuda(
        &mut loss,
        &mut lse_max,
        &mut lse_log_sum,
        &lb,
        &tb,
        -100,
        v,
        3,
    )
    .unwrap();
    r.expect("NaN logit -> NaN loss", down(&loss)[0].is_nan());
    let mut dl = ctx.alloc(n * v).unwrap();
    let one = up(&ctx, &[1.0]);
    ce_cuda::cross_entropy_bwd_cuda(&mut dl, &lb, &tb, -100, &lse_max, &lse_log_sum, &one, v, 3)
        .unwrap();
    let dl = down(&dl);
    r.expect(
        "NaN row's gradients NaN, other rows finite",
        dl[v..2 * v].iter().all(|x| x.is_nan())
            && dl[..v].iter().chain(&dl[2 * v..]).all(|x| x.is_finite()),
    );
    r.finish();
}

#[test]
fn embedding_matches_ref() {
    let Some(ctx) = device("embedding") else {
        return;
    };
    let mut r = Report::new("embedding fwd/bwd");
    let mut rng = Rng::new(302);
    // (V, C, positions): ids from the first half of V only, so ids repeat and some rows get no gradient.
    for (v, c, p) in [
        (1, 1, 1),
        (5, 7, 13),
        (13, 33, 40),
        (50, 576, 64),
        (1000, 65, 3000),
    ] {
        let weight = rng.normal_vec(v * c, 1.0);
        let ids: Vec<u32> = (0..p).map(|_| rng.below(v.div_ceil(2)) as u32).collect();
        let name = format!("V {v} C {c} P {p}");
        let mut out = ctx.alloc(p * c).unwrap();
        let ids_d = ctx.upload_bits(&ids).unwrap();
        embedding::embedding_fwd_cuda(&mut out, &up(&ctx, &weight), &ids_d, c).unwrap();
        let mut want = vec![0.0; p * c];
        embedding::embedding_fwd_ref(&mut want, &to_f64(&weight), &ids, c);
        // A gather: exact.
        r.check_tol(&format!("fwd {name}"), &down(&out), &want, 0.0, 0.0);

        // The backward adds into an existing gradient (a second micro-batch, say).
        let (dw0, dout) = (rng.normal_vec(v * c, 1.0), rng.normal_vec(p * c, 1.0));
        let mut dw = up(&ctx, &dw0);
        embedding::embedding_bwd_cuda(&mut dw, &up(&ctx, &dout), &ids, c).unwrap();
        let mut want = to_f64(&dw0);
        embedding::embedding_bwd_ref(&mut want, &to_f64(&dout), &ids, c);
        r.check(&format!("dweight {name}"), &down(&dw), &want);
        // Same additions in the same order as the CPU path: the same bits.
        let mut cpu = dw0.clone();
        embedding::embedding_bwd_cpu(&mut cpu, &dout, &ids, c);
        r.expect(&format!("dweight == cpu bitwise {name}"), down(&dw) == cpu);
    }
    // An id past V is an error naming it, never a write outside dweight.
    let mut dw = ctx.zeros(5 * 3).unwrap();
    let e = embedding::embedding_bwd_cuda(&mut dw, &ctx.zeros(2 * 3).unwrap(), &[1, 5], 3)
        .map_err(|e| e.to_string());
    r.expect(
        &format!("id past V: {e:?}"),
        e.is_err_and(|e| e.contains("token id 5") && e.contains("V = 5")),
    );
    r.finish();
}

#[test]
fn silu_mul_scale_match_ref() {
    let Some(ctx) = device("silu/mul/scale") else {
        return;
    };
    let mut r = Report::new("silu, mul, scale fwd/bwd");
    let mut rng = Rng::new(303);
    for n in [1, 7, 13, 33, 1536, 100_003] {
        let mut x = rng.normal_vec(n, 4.0);
        // Past expf's overflow: the sigmoid's limits must come out, not a NaN.
        for (i, v) in [-200.0, -88.0, 88.0, 200.0].iter().enumerate() {
            if i * 3 < n {
                x[i * 3] = *v;
            }
        }
        let dout = rng.normal_vec(n, 1.0);
        let (x64, d64) = (to_f64(&x), to_f64(&dout));
        let (xb, db) = (up(&ctx, &x), up(&ctx, &dout));
        let mut out = ctx.alloc(n).unwrap();
        silu::silu_fwd_cuda(&mut out, &xb).unwrap();
        let mut want = vec![0.0; n];
        silu::silu_fwd_ref(&mut want, &x64);
        r.check(&format!("silu fwd n={n}"), &down(&out), &want);
        let mut dx = ctx.alloc(n).unwrap();
        silu::silu_bwd_cuda(&mut dx, &db, &xb).unwrap();
        let mut want = vec![0.0; n];
        silu::silu_bwd_ref(&mut want, &d64, &x64);
        r.check(&format!("silu dx n={n}"), &down(&dx), &want);

        let c = -0.37f32;
        let mut out = ctx.alloc(n).unwrap();
        scale::scale_fwd_cuda(&mut out, &db, c).unwrap();
        let mut want = vec![0.0; n];
        scale::scale_fwd_ref(&mut want, &d64, c as f64);
        // The backward is this same kernel on dout (the op is self-adjoint).
        r.check(&format!("scale fwd/bwd n={n}"), &down(&out), &want);
    }
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
        let (a64, b64, d64) = (to_f64(&a), to_f64(&b), to_f64(&dout));
        let (ab, bb, db) = (up(&ctx, &a), up(&ctx, &b), up(&ctx, &dout));
        let mut out = ctx.alloc(na).unwrap();
        mul::mul_fwd_cuda(&mut out, &ab, &bb).unwrap();
        let mut want = vec![0.0; na];
        mul::mul_fwd_ref(&mut want, &a64, &b64);
        r.check(&format!("mul fwd {na}/{nb}"), &down(&out), &want);
        let (mut da, mut dbb) = (ctx.alloc(na).unwrap(), ctx.alloc(nb).unwrap());
        mul::mul_bwd_cuda(Some(&mut da), Some(&mut dbb), &db, &ab, &bb).unwrap();
        let (mut wa, mut wb) = (vec![0.0; na], vec![0.0; nb]);
        mul::mul_bwd_ref(Some(&mut wa), Some(&mut wb), &d64, &a64, &b64);
        r.check(&format!("mul da {na}/{nb}"), &down(&da), &wa);
        r.check(&format!("mul db {na}/{nb}"), &down(&dbb), &wb);
        let mut db_only = ctx.alloc(nb).unwrap();
        mul::mul_bwd_cuda(None, Some(&mut db_only), &db, &ab, &bb).unwrap();
        r.expect(
            &format!("mul db alone {na}/{nb}"),
            down(&db_only) == down(&dbb),
        );
    }
    r.finish();
}

#[test]
fn sum_mean_softmax_match_ref() {
    let Some(ctx) = device("sum/softmax") else {
        return;
    };
    let mut r = Report::new("sum, mean, softmax fwd/bwd");
    let mut rng = Rng::new(304);
    // 2^20 + 3 elements need more than the 1024 first-pass blocks' one sweep.
    for n in [1, 7, 13, 4096, 9_001, (1 << 20) + 3] {
        let x = rng.normal_vec(n, 1.0);
        let xb = up(&ctx, &x);
        let total = sum::sum_fwd_ref(&to_f64(&x));
        for (what, s) in [("sum", 1.0f32), ("mean", 1.0 / n as f32)] {
            let mut out = ctx.alloc(1).unwrap();
            sum::sum_fwd_cuda(&mut out, &xb, s).unwrap();
            let want = if what == "sum" {
                total
            } else {
                total / n as f64
            };
            // f64 partials: what remains is the final rounding to f32 (and the f32 product with 1/n).
            r.check(&format!("{what} n={n}"), &down(&out), &[want]);
            let dout = 1.7f32;
            let mut dx = ctx.alloc(n).unwrap();
            sum::sum_bwd_cuda(&mut dx, &up(&ctx, &[dout]), s).unwrap();
            let want = vec![dout as f64 * s as f64; n];
            r.check(&format!("{what} dx n={n}"), &down(&dx), &want);
        }
    }
    for (rows, c) in [
        (1, 1),
        (3, 7),
        (5, 13),
        (4, 33),
        (2, 1000),
        (700, 9),
        (3, 4097),
    ] {
        let mut x = rng.normal_vec(rows * c, 3.0);
        // Row 0 near 1000 (overflows without the max), row 1 half masked with -inf as causal attention does.
        x[..c].iter_mut().for_each(|v| *v += 1000.0);
        if rows > 1 && c > 2 {
            x[c + c / 2..2 * c].fill(f32::NEG_INFINITY);
        }
        let dout = rng.normal_vec(rows * c, 1.0);
        let name = format!("[{rows}, {c}]");
        let mut y = ctx.alloc(rows * c).unwrap();
        softmax::softmax_fwd_cuda(&mut y, &up(&ctx, &x), c).unwrap();
        let mut want_y = vec![0.0; rows * c];
        softmax::softmax_fwd_ref(&mut want_y, &to_f64(&x), c);
        r.check(&format!("softmax fwd {name}"), &down(&y), &want_y);
        // Both backwards from the reference output, so that only the backward is compared.
        let yb = up(&ctx, &eqat::testing::to_f32(&want_y));
        let mut dx = ctx.alloc(rows * c).unwrap();
        softmax::softmax_bwd_cuda(&mut dx, &up(&ctx, &dout), &yb, c).unwrap();
        let mut want = vec![0.0; rows * c];
        softmax::softmax_bwd_ref(&mut want, &to_f64(&dout), &want_y, c);
        r.check(&format!("softmax dx {name}"), &down(&dx), &want);
    }
    r.finish();
}

#[test]
fn transpose_and_matmul_match_ref() {
    let Some(ctx) = device("transpose/matmul") else {
        return;
    };
    let mut r = Report::new("transpose, matmul fwd/bwd");
    let mut rng = Rng::new(305);
    let cases: [(&[usize], usize, usize); 8] = [
        (&[1, 1], 0, 1),
        (&[7, 13], 0, 1),
        (&[33, 17], 1, 0),
        (&[2, 5, 3, 16], 1, 2),
        (&[3, 7, 2, 5, 3], 1, 3),
        (&[2, 1, 9, 4], 3, 1),
        (&[4, 6], 1, 1),
        (&[2, 301, 77], 1, 2),
    ];
    for (shape, d0, d1) in cases {
        let n: usize = shape.iter().product();
        let (x, dout) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
        let out_shape = transpose::transposed_shape(shape, d0, d1);
        let name = format!("{shape:?} ({d0}, {d1})");
        let mut out = ctx.alloc(n).unwrap();
        transpose::transpose_fwd_cuda(&mut out, &up(&ctx, &x), shape, d0, d1).unwrap();
        let mut want = vec![0.0; n];
        transpose::transpose_fwd_ref(&mut want, &to_f64(&x), shape, d0, d1);
        // A permutation: exact.
        r.check_tol(
            &format!("transpose fwd {name}"),
            &down(&out),
            &want,
            0.0,
            0.0,
        );
        let mut dx = ctx.alloc(n).unwrap();
        transpose::transpose_fwd_cuda(&mut dx, &up(&ctx, &dout), &out_shape, d0, d1).unwrap();
        let mut want = vec![0.0; n];
        transpose::transpose_fwd_ref(&mut want, &to_f64(&dout), &out_shape, d0, d1);
        r.check_tol(&format!("transpose dx {name}"), &down(&dx), &want, 0.0, 0.0);
    }
    // (batch, M, K, N): 2-D, batches, odd sizes, K = 0 (an empty sum: zeros), attention-like many small heads.
    for (batch, m, k, n) in [
        (1, 1, 1, 1),
        (1, 7, 13, 5),
        (3, 1, 9, 17),
        (6, 5, 7, 3),
        (4, 33, 65, 20),
        (2, 150, 40, 70),
        (2, 3, 0, 4),
        (48, 37, 64, 37),
    ] {
        let d = MatmulDims { batch, m, k, n };
        let (a, b, g) = (
            rng.normal_vec(batch * m * k, 1.0),
            rng.normal_vec(batch * k * n, 1.0),
            rng.normal_vec(batch * m * n, 1.0),
        );
        let (a64, b64, g64) = (to_f64(&a), to_f64(&b), to_f64(&g));
        let (ab, bb, gb) = (up(&ctx, &a), up(&ctx, &b), up(&ctx, &g));
        let name = format!("{d:?}");
        let mut out = ctx.alloc(batch * m * n).unwrap();
        matmul::matmul_fwd_cuda(&mut out, &ab, &bb, d).unwrap();
        let mut want = vec![0.0; batch * m * n];
        matmul::matmul_fwd_ref(&mut want, &a64, &b64, d);
        r.check(&format!("matmul fwd {name}"), &down(&out), &want);
        let (mut da, mut db) = (
            ctx.alloc(batch * m * k).unwrap(),
            ctx.alloc(batch * k * n).unwrap(),
        );
        matmul::matmul_bwd_cuda(Some(&mut da), Some(&mut db), &gb, &ab, &bb, d).unwrap();
        let (mut wa, mut wb) = (vec![0.0; a.len()], vec![0.0; b.len()]);
        matmul::matmul_bwd_ref(Some(&mut wa), Some(&mut wb), &g64, &a64, &b64, d);
        r.check(&format!("matmul da {name}"), &down(&da), &wa);
        r.check(&format!("matmul db {name}"), &down(&db), &wb);
    }
    r.finish();
}
