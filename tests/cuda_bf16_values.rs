//! The bf16 mode's bf16 activations (torch.autocast's): the MLP's gate, up and SwiGLU output, and attention on
//! bf16 q, k, v with a bf16 output, against f64 and against the same graphs with f32 activations in the same mode.
//! Without a GPU each test prints `skipped: no CUDA device`.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::bf16_mode::*;
use cuda_common::*;
use eqat::autograd::Tape;
use eqat::gpu::GpuContext;
use eqat::ops::attention as att;
use eqat::ops::linear::cast_bf16_cuda;
use eqat::ops::swiglu::{
    swiglu, swiglu_bwd_bf16_cuda, swiglu_bwd_ref, swiglu_fwd_bf16_cuda, swiglu_fwd_ref,
};
use eqat::quant::fake_quant::{fake_quant_linear, fake_quant_linear_bf16_out, QuantConfig};
use eqat::tensor::DType;
use eqat::testing::to_f64;
use eqat::{Rng, Tensor};

/// The bf16 mode's MLP keeps gate, up, the SwiGLU output and their gradients in bf16 (torch.autocast's
/// activations). The bf16 SwiGLU kernels against the f64 formulas on the same bf16 inputs: one rounding of each
/// output (2^-8 relative) beyond f32 arithmetic. Then the MLP on the tape (gate and up from
/// `fake_quant_linear_bf16_out`) against the same MLP with f32 activations in the same mode.
#[test]
fn bf16_mlp_matches_f64_and_the_f32_activation_mlp() {
    let Some((ctx, mut r, mut rng)) = bf16_mode("bf16 mlp", 311) else {
        return;
    };
    // 8-value chunks and a partial last one.
    for n in [8, 1003, 4096] {
        let gate = round_bf16(&rng.normal_vec(n, 4.0));
        let upv = round_bf16(&rng.normal_vec(n, 1.0));
        let dout = round_bf16(&rng.normal_vec(n, 1.0));
        let b = |v: &[f32]| cast_bf16_cuda(&up(&ctx, v)).unwrap();
        let (gb, ub, db) = (b(&gate), b(&upv), b(&dout));
        let mut out = ctx.alloc_bf16(n).unwrap();
        swiglu_fwd_bf16_cuda(&mut out, &gb, &ub).unwrap();
        let (mut dg, mut du) = (ctx.alloc_bf16(n).unwrap(), ctx.alloc_bf16(n).unwrap());
        swiglu_bwd_bf16_cuda(Some(&mut dg), Some(&mut du), &db, &gb, &ub).unwrap();
        let (g64, u64_, d64) = (to_f64(&gate), to_f64(&upv), to_f64(&dout));
        let mut want = vec![0.0; n];
        swiglu_fwd_ref(&mut want, &g64, &u64_);
        let (mut wdg, mut wdu) = (vec![0.0; n], vec![0.0; n]);
        swiglu_bwd_ref(Some(&mut wdg), Some(&mut wdu), &d64, &g64, &u64_);
        for (what, got, want) in [
            ("fwd", out.to_f32_vec().unwrap(), want),
            ("dgate", dg.to_f32_vec().unwrap(), wdg),
            ("dup", du.to_f32_vec().unwrap(), wdu),
        ] {
            // f32 math ~1e-6 of the terms (1 + g(1 - s) cancels near g = -1.28), then one bf16 rounding.
            let atol = 1e-6 * rms(&want);
            r.check_tol(
                &format!("swiglu bf16 {what} n {n}"),
                &got,
                &want,
                atol,
                2f64.powi(-8) + 1e-5,
            );
        }
    }

    // The MLP on the tape: down(swiglu(gate(x), up(x))), g 16, against the f32-activation MLP.
    let (rows, c, f) = (37, 64, 96);
    let cfg = QuantConfig::new(2, 16).unwrap();
    let x = Tensor::randn(&[rows, c], 1.0, &mut rng);
    let target = Tensor::randn(&[rows, c], 0.1, &mut rng);
    let ws: Vec<Tensor> = [(f, c), (f, c), (c, f)]
        .iter()
        .map(|&(o, i)| Tensor::randn(&[o, i], 0.2, &mut rng))
        .collect();
    let mut runs = Vec::new();
    for bf16_acts in [false, true] {
        let mut tape = Tape::new();
        let params = quant_params(&mut tape, &ctx, &ws, cfg);
        let xv = tape.leaf(x.to_device(&ctx).unwrap(), true);
        let lin = match bf16_acts {
            true => fake_quant_linear_bf16_out,
            false => fake_quant_linear,
        };
        let gate = lin(&mut tape, xv, params[0][0], params[0][1], params[0][2], cfg).unwrap();
        let upv = lin(&mut tape, xv, params[1][0], params[1][1], params[1][2], cfg).unwrap();
        let h = swiglu(&mut tape, gate, upv).unwrap();
        let y =
            fake_quant_linear(&mut tape, h, params[2][0], params[2][1], params[2][2], cfg).unwrap();
        r.expect(
            &format!("bf16 activations {bf16_acts}: gate and h dtypes"),
            (tape.value(gate).dtype() == DType::BF16) == bf16_acts
                && (tape.value(h).dtype() == DType::BF16) == bf16_acts
                && tape.value(y).dtype() == DType::F32,
        );
        let t = tape.input(target.to_device(&ctx).unwrap());
        let loss = eqat::ops::mse::mse(&mut tape, y, t).unwrap();
        tape.backward(loss).unwrap();
        let mut got = vec![
            tape.value(y).to_f32_vec(),
            tape.grad(xv).unwrap().to_f32_vec(),
        ];
        for p in &params {
            got.extend(p.iter().map(|&v| tape.grad(v).unwrap().to_f32_vec()));
        }
        runs.push(got);
    }
    let names = [
        "y", "dx", "dw gate", "ds gate", "dz gate", "dw up", "ds up", "dz up", "dw down",
    ];
    for (i, what) in names.iter().enumerate() {
        let want = to_f64(&runs[0][i]);
        let diff: Vec<f64> = runs[1][i]
            .iter()
            .zip(&want)
            .map(|(&a, &b)| a as f64 - b)
            .collect();
        // (dz is all zeros while min-max init clamps nothing: then the difference itself must be 0.)
        let rel = rms(&diff) / rms(&want).max(f64::MIN_POSITIVE);
        say(&format!(
            "  bf16 mlp {what}: rms relative difference {rel:.2e}"
        ));
        // A few bf16 roundings (2^-9 each) on the way to each value; a mix-up of gate and up, or a gradient
        // left unwritten, is far above it.
        r.expect(
            &format!("bf16 mlp {what}: rms relative difference {rel:.2e} < 1e-2"),
            rel < 1e-2,
        );
    }
    r.finish();
}

/// In the bf16 mode q, k and v may be bf16 values (the block's rope outputs and v projection): the attention reads
/// them as they are and writes a bf16 output, and the gradients come back bf16. Against f32 inputs holding the same
/// bf16 values in the same mode, both followed by the o projection (`fake_quant_linear`, which reads a bf16 x as
/// it is): the output is the f32 one rounded to bf16 (the same kernels on the same operands, one more rounding),
/// so the projection's output is bit for bit the same; the gradients differ by the roundings of dO and O to bf16
/// (delta = rowsum(dO∘O) from the bf16 O), a few bf16 ulps.
#[test]
fn bf16_values_track_the_f32_inputs() {
    let Some((ctx, mut r, mut rng)) = bf16_mode("attention bf16 values", 113) else {
        return;
    };
    let cfg = eqat::quant::fake_quant::QuantConfig::new(4, 32).unwrap();
    for s in [shape(2, 45, 6, 2, 64), shape(1, 130, 4, 4, 128)] {
        let tensors = bf16_qkv(s, &mut rng);
        let c = s.h * s.d;
        let w = Tensor::randn(&[c, c], 0.05, &mut rng);
        let (ws, wz) = eqat::quant::fake_quant::init_minmax(&w, cfg).unwrap();
        let target = Tensor::randn(&[s.b, s.t, c], 1.0, &mut rng);
        let run = |bf16_values: bool| -> Vec<Vec<f32>> {
            let mut tape = Tape::new();
            let p: Vec<_> = [&w, &ws, &wz]
                .iter()
                .map(|t| tape.param(t.to_device(&ctx).unwrap()).unwrap())
                .collect();
            let vars: Vec<_> = tensors
                .iter()
                .map(|t| {
                    let d = t.to_device(&ctx).unwrap();
                    let d = match bf16_values {
                        true => {
                            let b =
                                eqat::ops::linear::cast_bf16_cuda(d.gpu("test").unwrap()).unwrap();
                            Tensor::from_gpu_bf16(t.shape(), b).unwrap()
                        }
                        false => d,
                    };
                    tape.leaf(d, true)
                })
                .collect();
            let out = att::attention(&mut tape, vars[0], vars[1], vars[2]).unwrap();
            let a = eqat::ops::reshape::reshape(&mut tape, out, &[s.b, s.t, c]).unwrap();
            let y = eqat::quant::fake_quant::fake_quant_linear(&mut tape, a, p[0], p[1], p[2], cfg)
                .unwrap();
            let t = tape.input(target.to_device(&ctx).unwrap());
            let loss = eqat::ops::mse::mse(&mut tape, y, t).unwrap();
            tape.backward(loss).unwrap();
            assert_eq!(
                tape.value(out).dtype() == eqat::tensor::DType::BF16,
                bf16_values
            );
            let mut got = vec![tape.value(out).to_f32_vec(), tape.value(y).to_f32_vec()];
            for &v in &vars {
                let g = tape.grad(v).unwrap();
                assert_grad_dtype(g, bf16_values);
                got.push(g.to_f32_vec());
            }
            got
        };
        let (f, b) = (run(false), run(true));
        let name = format!("{s:?}");
        r.expect(
            &format!("{name}: out = bf16(f32 out) bit for bit"),
            round_bf16(&f[0]) == b[0],
        );
        r.expect(
            &format!("{name}: the projection's output bit for bit"),
            f[1] == b[1],
        );
        for (i, what) in ["dq", "dk", "dv"].iter().enumerate() {
            let want = to_f64(&f[i + 2]);
            let diff: Vec<f64> = b[i + 2]
                .iter()
                .zip(&want)
                .map(|(&x, &w)| x as f64 - w)
                .collect();
            let rel = rms(&diff) / rms(&want);
            say(&format!(
                "  {name} {what}: rms relative difference {rel:.2e}"
            ));
            r.expect(
                &format!("{name}: {what} rms relative difference {rel:.2e} < 1e-2"),
                rel < 1e-2,
            );
        }
    }
    r.finish();
}

/// The folded attention norm (ops::rmsnorm::fold): q, k, v fake-quantized bf16 linears reading
/// h = rmsnorm(x)·γ of an x without a gradient get dŵ and dγ from G = dYᵀ·x̂ instead of from dh = dY·Ŵ. Against the
/// same graph with the plain norm in the bf16 mode and in the f32 mode (the reference): the folded gradients are
/// as close to the f32 ones as the plain bf16 ones are (the algebra is exact, only roundings move), and within
/// bf16 roundings of the plain bf16 ones. The fold refuses an x that needs a gradient, and `linear` refuses a
/// folded input.
#[test]
fn folded_attention_norm_matches_the_plain_norm() {
    let Some(_) = device("folded norm") else {
        return;
    };
    let ctx = GpuContext::new(0).unwrap();
    ctx.set_poison(true);
    let mut r = Report::new("folded norm");
    let mut rng = Rng::new(417);
    let (b, t, c, eps) = (2, 37, 128, 1e-5);
    let cfg = QuantConfig::new(2, 32).unwrap();
    let x = Tensor::randn(&[b, t, c], 1.0, &mut rng);
    let gamma =
        Tensor::from_vec(&[c], (0..c).map(|_| 0.5 + rng.uniform() as f32).collect()).unwrap();
    let ws: Vec<Tensor> = [128, 64, 64]
        .iter()
        .map(|&n| Tensor::randn(&[n, c], 0.1, &mut rng))
        .collect();
    let targets: Vec<Tensor> = ws
        .iter()
        .map(|w| Tensor::randn(&[b, t, w.shape()[0]], 0.5, &mut rng))
        .collect();
    // (bf16 mode, folded) -> [dγ, then dw, ds, dz of q, k, v]
    let mut run = |bf16: bool, folded: bool| -> Vec<Vec<f32>> {
        ctx.set_matmul_bf16(bf16);
        let mut tape = Tape::new();
        let g = tape.param(gamma.to_device(&ctx).unwrap()).unwrap();
        let params = quant_params(&mut tape, &ctx, &ws, cfg);
        let xv = tape.input(x.to_device(&ctx).unwrap());
        let h = match folded {
            true => eqat::ops::rmsnorm::rmsnorm_folded(&mut tape, xv, g, eps).unwrap(),
            false => eqat::ops::rmsnorm::rmsnorm(&mut tape, xv, g, eps).unwrap(),
        };
        let mut loss = None;
        for (p, target) in params.iter().zip(&targets) {
            let y = fake_quant_linear(&mut tape, h, p[0], p[1], p[2], cfg).unwrap();
            let tv = tape.input(target.to_device(&ctx).unwrap());
            let l = eqat::ops::mse::mse(&mut tape, y, tv).unwrap();
            loss = Some(match loss {
                None => l,
                Some(sum) => eqat::ops::add::add(&mut tape, sum, l).unwrap(),
            });
        }
        if folded {
            let e = eqat::ops::linear::linear(&mut tape, h, params[0][0], None);
            r.expect("linear refuses a folded input", e.is_err());
        }
        tape.backward(loss.unwrap()).unwrap();
        let mut got = vec![tape.grad(g).unwrap().to_f32_vec()];
        for p in &params {
            got.extend(p.iter().map(|&v| tape.grad(v).unwrap().to_f32_vec()));
        }
        got
    };
    let reference = run(false, false);
    let plain = run(true, false);
    let folded = run(true, true);
    let rel = |a: &[f32], want: &[f32]| {
        let d: Vec<f64> = a.iter().zip(want).map(|(&a, &b)| (a - b) as f64).collect();
        rms(&d) / rms(&to_f64(want)).max(f64::MIN_POSITIVE)
    };
    let names = [
        "dγ", "dw q", "ds q", "dz q", "dw k", "ds k", "dz k", "dw v", "ds v", "dz v",
    ];
    for (i, what) in names.iter().enumerate() {
        let (f, p) = (
            rel(&folded[i], &reference[i]),
            rel(&plain[i], &reference[i]),
        );
        let fp = rel(&folded[i], &plain[i]);
        say(&format!(
            "  folded norm {what}: vs f32 {f:.2e} (plain bf16 {p:.2e}), vs plain bf16 {fp:.2e}"
        ));
        // A dγ or dŵ that misses γ, or a wrong column, is off by O(1).
        r.expect(
            &format!("folded norm {what}: vs f32 {f:.2e} <= 2 x plain {p:.2e} + 2e-3, vs plain {fp:.2e} < 1e-2"),
            f <= 2.0 * p + 2e-3 && fp < 1e-2,
        );
    }
    r.expect("dγ is not zero", rms(&to_f64(&folded[0])) > 0.0);
    ctx.set_matmul_bf16(true);
    let mut tape = Tape::new();
    let g = tape.param(gamma.to_device(&ctx).unwrap()).unwrap();
    let xv = tape.leaf(x.to_device(&ctx).unwrap(), true);
    r.expect(
        "the fold refuses an x that needs a gradient",
        eqat::ops::rmsnorm::rmsnorm_folded(&mut tape, xv, g, eps).is_err(),
    );
    r.finish();
}
