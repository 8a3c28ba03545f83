//! E2E-QP's real-quant linear on the GPU against its f64 reference: dequantization (f32 and bf16), forward, and the
//! backward to x and to the scales, on random packed layers of 2, 3 and 4 bits (odd sizes included), at the 1e-5
//! relative bar of cuda_common::RTOL; the bf16 dequantization equals the cast of the f32 one bit for bit. New device
//! buffers are NaN-poisoned, so an unwritten output fails. Without a GPU each test prints `skipped: no CUDA device`.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::real_quant::quant_layer;
use cuda_common::*;
use eqat::gpu::GpuContext;
use eqat::ops::linear::cast_bf16_cuda;
use eqat::quant::real_quant::cuda as rq_cuda;
use eqat::quant::real_quant::linear::{self as rq, RealQuantDims};
use eqat::testing::to_f64;
use eqat::Rng;

#[test]
fn real_quant_linear_matches_ref() {
    let Some(ctx) = device("real_quant") else {
        return;
    };
    let mut r = Report::new("real_quant linear fwd/bwd");
    let mut rng = Rng::new(306);
    // (bits, rows, K, N, group): every width; K = 65 at 3 bits ends rows in a partial 10-value word; K = g
    // (one group per row); SmolLM2's w2g64 576 -> 1536.
    for (bits, rows, k, n, g) in [
        (2, 1, 32, 3, 16),
        (3, 5, 65, 7, 13),
        (3, 4, 70, 9, 10),
        (4, 7, 128, 33, 32),
        (8, 3, 96, 5, 96),
        // More groups than one word of packed zero points holds: 40 at 2 bits (3 words), 15 at 3 bits (2).
        (2, 3, 640, 5, 16),
        (3, 2, 240, 4, 16),
        (2, 37, 576, 64, 64),
        (4, 16, 1536, 40, 128),
    ] {
        let (qlin, w_int, zeros, scales) = quant_layer(&mut rng, bits, n, k, g);
        let d = RealQuantDims { rows, k, n, g };
        let (x, dout) = (rng.normal_vec(rows * k, 1.0), rng.normal_vec(rows * n, 1.0));
        let (x64, s64, d64) = (to_f64(&x), to_f64(&scales), to_f64(&dout));
        let (xb, sb, db) = (up(&ctx, &x), up(&ctx, &scales), up(&ctx, &dout));
        let name = format!("w{bits} g{g} rows {rows} K {k} N {n}");

        let packed = qlin.device_packed(&ctx).unwrap();
        let mut w = ctx.alloc(n * k).unwrap();
        rq_cuda::real_quant_dequant_cuda(&mut w, &qlin, &packed, &sb).unwrap();
        let cpu_w = qlin.dequantize().unwrap().to_f32_vec();
        r.expect(&format!("dequant == cpu bitwise {name}"), down(&w) == cpu_w);

        let mut out = ctx.alloc(rows * n).unwrap();
        rq_cuda::real_quant_linear_fwd_cuda(&mut out, &xb, &qlin, &sb, rows).unwrap();
        let mut want = vec![0.0; rows * n];
        rq::real_quant_linear_fwd_ref(&mut want, &x64, &w_int, &zeros, &s64, d);
        r.check(&format!("fwd {name}"), &down(&out), &want);

        let (mut dx, mut ds) = (ctx.alloc(rows * k).unwrap(), ctx.alloc(n * k / g).unwrap());
        rq_cuda::real_quant_linear_bwd_cuda(
            Some(&mut dx),
            Some(&mut ds),
            &db,
            (&xb, None),
            &qlin,
            &sb,
            rows,
        )
        .unwrap();
        let (mut wdx, mut wds) = (vec![0.0; rows * k], vec![0.0; n * k / g]);
        rq::real_quant_linear_bwd_ref(
            Some(&mut wdx),
            Some(&mut wds),
            &d64,
            &x64,
            &w_int,
            &zeros,
            &s64,
            d,
        );
        r.check(&format!("dx {name}"), &down(&dx), &wdx);
        r.check(&format!("dscales {name}"), &down(&ds), &wds);
        let mut ds_only = ctx.alloc(n * k / g).unwrap();
        rq_cuda::real_quant_linear_bwd_cuda(
            None,
            Some(&mut ds_only),
            &db,
            (&xb, None),
            &qlin,
            &sb,
            rows,
        )
        .unwrap();
        r.expect(
            &format!("dscales alone {name}"),
            down(&ds_only) == down(&ds),
        );
    }
    r.finish();
}

/// In bf16 mode the linear dequantizes straight into bf16: its products must equal cuBLAS on the bf16 cast of
/// the f32 Ŵ (the path it replaced) bit for bit, forward and dx.
#[test]
fn real_quant_bf16_dequant_equals_the_cast() {
    let Some(_) = device("real_quant bf16") else {
        return;
    };
    // A context of its own: the bf16 mode is per context.
    let ctx = GpuContext::new(0).unwrap();
    ctx.set_poison(true);
    ctx.set_matmul_bf16(true);
    let mut r = Report::new("real_quant bf16 dequant");
    let mut rng = Rng::new(307);
    // The bf16 dequant (a packed word per thread) against the f32 one cast: odd K (single values, a partial last
    // word), groups that start inside a word (g 13, 10 at 3 bits), 8 bits, a 70B-wide row.
    for (bits, k, n, g) in [
        (2, 32, 3, 16),
        (3, 65, 7, 13),
        (3, 70, 9, 10),
        (4, 128, 33, 32),
        (8, 96, 5, 96),
        (2, 640, 5, 16),
        (3, 240, 4, 16),
        (2, 28672, 3, 64),
    ] {
        let (qlin, _, _, scales) = quant_layer(&mut rng, bits, n, k, g);
        let (sb, packed) = (up(&ctx, &scales), qlin.device_packed(&ctx).unwrap());
        let mut w = ctx.alloc(n * k).unwrap();
        rq_cuda::real_quant_dequant_cuda(&mut w, &qlin, &packed, &sb).unwrap();
        let want = cast_bf16_cuda(&w).unwrap().to_f32_vec().unwrap();
        let mut wb = ctx.alloc_bf16(n * k).unwrap();
        rq_cuda::real_quant_dequant_bf16_cuda(&mut wb, &qlin, &packed, &sb).unwrap();
        let got = wb.to_f32_vec().unwrap();
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        r.expect(
            &format!("dequant bf16 == cast(dequant f32), w{bits} g{g} K {k} N {n}"),
            same,
        );
    }
    for (bits, rows, k, n, g) in [(2, 5, 640, 7, 16), (3, 4, 240, 9, 16), (4, 3, 128, 33, 32)] {
        let (qlin, _, _, scales) = quant_layer(&mut rng, bits, n, k, g);
        let name = format!("w{bits} g{g} rows {rows} K {k} N {n}");
        let (x, dout) = (rng.normal_vec(rows * k, 1.0), rng.normal_vec(rows * n, 1.0));
        let (xb, sb, db) = (up(&ctx, &x), up(&ctx, &scales), up(&ctx, &dout));
        let packed = qlin.device_packed(&ctx).unwrap();
        let mut w = ctx.alloc(n * k).unwrap();
        rq_cuda::real_quant_dequant_cuda(&mut w, &qlin, &packed, &sb).unwrap();
        let wc = cast_bf16_cuda(&w).unwrap();
        let (xc, dc) = (cast_bf16_cuda(&xb).unwrap(), cast_bf16_cuda(&db).unwrap());
        let mut want = ctx.alloc(rows * n).unwrap();
        ctx.gemm_bf16(false, true, rows, n, k, 1.0, &xc, &wc, 0.0, &mut want)
            .unwrap();
        let mut got = ctx.alloc(rows * n).unwrap();
        rq_cuda::real_quant_linear_fwd_cuda(&mut got, &xb, &qlin, &sb, rows).unwrap();
        r.expect(&format!("fwd {name}"), down(&got) == down(&want));
        let mut want_dx = ctx.alloc(rows * k).unwrap();
        ctx.gemm_bf16(false, false, rows, k, n, 1.0, &dc, &wc, 0.0, &mut want_dx)
            .unwrap();
        let mut dx = ctx.alloc(rows * k).unwrap();
        rq_cuda::real_quant_linear_bwd_cuda(
            Some(&mut dx),
            None,
            &db,
            (&xb, None),
            &qlin,
            &sb,
            rows,
        )
        .unwrap();
        r.expect(&format!("dx {name}"), down(&dx) == down(&want_dx));
        // dscales from the caller's bf16 copy of x (the tape's) equal those from x cast here.
        let (mut ds_cast, mut ds_copy) =
            (ctx.alloc(n * k / g).unwrap(), ctx.alloc(n * k / g).unwrap());
        rq_cuda::real_quant_linear_bwd_cuda(
            None,
            Some(&mut ds_cast),
            &db,
            (&xb, None),
            &qlin,
            &sb,
            rows,
        )
        .unwrap();
        let xc = (&xb, Some(&xc));
        rq_cuda::real_quant_linear_bwd_cuda(None, Some(&mut ds_copy), &db, xc, &qlin, &sb, rows)
            .unwrap();
        r.expect(
            &format!("dscales from a given bf16 x {name}"),
            down(&ds_cast) == down(&ds_copy),
        );
    }
    r.finish();
}
