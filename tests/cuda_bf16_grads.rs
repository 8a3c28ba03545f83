//! The bf16 mode's gradient paths: a residual add handing a linear bf16(dout) (`Tape::takes_bf16_dout`), the bf16
//! twins ops write for it (`Tape::wants_bf16_twin`), and rope's outputs taking attention's gradients in f32
//! (`Backward::reads_f32_dout`). Without a GPU each test prints `skipped: no CUDA device`.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::bf16_mode::*;
use cuda_common::*;
use eqat::autograd::Tape;
use eqat::ops::attention as att;
use eqat::ops::linear::cast_bf16_cuda;
use eqat::quant::fake_quant::{fake_quant_linear, init_minmax, QuantConfig};
use eqat::testing::to_f64;
use eqat::Tensor;

/// A residual add (a pass-through node) hands a bf16-mode linear's output (Block-AP's fake-quantized one, E2E-QP's
/// real-quantized one), read only by the add, bf16(dout) itself instead of an f32 copy for the linear to cast: the
/// same bits as when an op in between (scale by 1) gives the linear an f32 dout, in every gradient.
#[test]
fn residual_add_hands_a_linear_its_bf16_gradient() {
    let Some((ctx, mut r, mut rng)) = bf16_mode("bf16 pass-through", 613) else {
        return;
    };
    let cfg = QuantConfig::new(2, 32).unwrap();
    let (rows, k, n) = (45, 64, 96);
    let x = Tensor::randn(&[rows, k], 1.0, &mut rng);
    let a = Tensor::randn(&[rows, n], 1.0, &mut rng);
    let t = Tensor::randn(&[rows, n], 1.0, &mut rng);
    let w = Tensor::randn(&[n, k], 0.2, &mut rng);
    let (s, _) = init_minmax(&w, cfg).unwrap();
    let ints: Vec<u32> = (0..n * k).map(|_| rng.below(4) as u32).collect();
    let zints: Vec<u32> = (0..n * k / 32).map(|_| rng.below(4) as u32).collect();
    let qlin =
        eqat::quant::real_quant::QuantizedLinear::from_ints(2, 32, k, n, &ints, &zints, s.clone())
            .unwrap();
    // (real-quantized, an op between) -> the gradients of x, a and the linear's parameters.
    let run = |real: bool, between: bool| -> Vec<Vec<f32>> {
        let mut tape = Tape::new();
        let p = quant_params(&mut tape, &ctx, std::slice::from_ref(&w), cfg).remove(0);
        let qs = tape.param(s.to_device(&ctx).unwrap()).unwrap();
        let xv = tape.leaf(x.to_device(&ctx).unwrap(), true);
        let av = tape.leaf(a.to_device(&ctx).unwrap(), true);
        let (mut y, params) = match real {
            true => {
                let y =
                    eqat::quant::real_quant::linear::real_quant_linear(&mut tape, xv, &qlin, qs);
                (y.unwrap(), vec![qs])
            }
            false => (
                fake_quant_linear(&mut tape, xv, p[0], p[1], p[2], cfg).unwrap(),
                p.clone(),
            ),
        };
        if between {
            y = eqat::ops::scale::scale(&mut tape, y, 1.0).unwrap();
        }
        let sum = eqat::ops::add::add(&mut tape, av, y).unwrap();
        let tv = tape.input(t.to_device(&ctx).unwrap());
        let loss = eqat::ops::mse::mse(&mut tape, sum, tv).unwrap();
        tape.backward(loss).unwrap();
        [xv, av]
            .iter()
            .chain(&params)
            .map(|&v| tape.grad(v).unwrap().to_f32_vec())
            .collect()
    };
    for real in [false, true] {
        let (direct, between) = (run(real, false), run(real, true));
        let names = ["dx", "da", "dw or dscales", "ds", "dz"];
        for (i, what) in names.iter().enumerate().take(direct.len()) {
            r.expect(
                &format!("real-quant {real}: {what} bit for bit"),
                direct[i] == between[i],
            );
        }
    }
    r.finish();
}

/// The bf16 twins of gradients: `mse_loss` (the loss's gradient, in its forward) and `add_rmsnorm`'s backward (the
/// residual stream's gradient, after adding dx) write bf16(gradient) in their own pass when a residual add hands
/// that gradient to a bf16-mode linear next, so no cast runs. The same bits as the casts (twins off) in every
/// gradient and the loss, with both twins handed on.
#[test]
fn gradient_twins_give_the_casts_bits() {
    let Some((ctx, mut r, mut rng)) = bf16_mode("bf16 gradient twins", 614) else {
        return;
    };
    let cfg = QuantConfig::new(2, 32).unwrap();
    let (rows, k, n) = (37, 64, 96);
    let x = Tensor::randn(&[rows, k], 1.0, &mut rng);
    let a = Tensor::randn(&[rows, n], 1.0, &mut rng);
    let t = Tensor::randn(&[rows, n], 1.0, &mut rng);
    let gamma = Tensor::randn(&[n], 0.5, &mut rng);
    let ws = [
        Tensor::randn(&[n, k], 0.2, &mut rng),
        Tensor::randn(&[n, n], 0.2, &mut rng),
    ];
    // y = lin0(x); (s, h) = add_rmsnorm(a, y, γ); loss = mse_loss(s + lin1(h), t).
    let run = |twins: bool| -> (Vec<Vec<f32>>, usize) {
        let mut tape = Tape::new();
        tape.set_bf16_twins(twins);
        let p = quant_params(&mut tape, &ctx, &ws, cfg);
        let g = tape.param(gamma.to_device(&ctx).unwrap()).unwrap();
        let xv = tape.leaf(x.to_device(&ctx).unwrap(), true);
        let av = tape.leaf(a.to_device(&ctx).unwrap(), true);
        let y = fake_quant_linear(&mut tape, xv, p[0][0], p[0][1], p[0][2], cfg).unwrap();
        let (s, h) = eqat::ops::rmsnorm::add_rmsnorm(&mut tape, av, y, g, 1e-5).unwrap();
        let y1 = fake_quant_linear(&mut tape, h, p[1][0], p[1][1], p[1][2], cfg).unwrap();
        let out = eqat::ops::add::add(&mut tape, s, y1).unwrap();
        let tv = tape.input(t.to_device(&ctx).unwrap());
        let loss = eqat::ops::mse::mse_loss(&mut tape, out, tv).unwrap();
        tape.backward(loss).unwrap();
        let mut vals = vec![tape.value(loss).to_f32_vec()];
        for v in [xv, av, g].iter().chain(p.iter().flatten()) {
            vals.push(tape.grad(*v).unwrap().to_f32_vec());
        }
        (vals, tape.bf16_twins_used())
    };
    let ((with, used), (without, none)) = (run(true), run(false));
    r.expect(
        &format!("both twins handed on ({used}), none when off ({none})"),
        used == 2 && none == 0,
    );
    let names = [
        "loss", "dx", "da", "dγ", "dw0", "ds0", "dz0", "dw1", "ds1", "dz1",
    ];
    for (i, what) in names.iter().enumerate() {
        r.expect(
            &format!("{what} bit for bit, finite"),
            with[i] == without[i] && with[i].iter().all(|v| v.is_finite()),
        );
    }
    r.finish();
}

/// rope's outputs get f32 gradients (`Backward::reads_f32_dout`): attention writes dq and dk unrounded, rope's
/// backward rotates and rounds once. Against the f32 run, q's and k's gradients are closer than when a reshape
/// between rope and attention (a pass-through that keeps bf16 gradients) makes attention round first, and v's
/// are the same bits.
#[test]
fn rope_takes_attention_gradients_in_f32() {
    let Some((ctx, mut r, mut rng)) = bf16_mode("rope f32 gradients", 615) else {
        return;
    };
    for s in [shape(2, 45, 6, 2, 64), shape(1, 130, 4, 4, 128)] {
        let inputs = bf16_qkv(s, &mut rng);
        let c = s.h * s.d;
        let w = Tensor::randn(&[c, c], 0.05, &mut rng);
        let cfg = QuantConfig::new(4, 32).unwrap();
        let target = Tensor::randn(&[s.b, s.t, c], 1.0, &mut rng);
        // (bf16 values, a reshape between rope and attention) -> the gradients of q, k, v before rope.
        let run = |bf16: bool, between: bool| -> Vec<Vec<f32>> {
            let mut tape = Tape::new();
            let p = quant_params(&mut tape, &ctx, std::slice::from_ref(&w), cfg).remove(0);
            let vars: Vec<_> = inputs
                .iter()
                .map(|t| {
                    let d = t.to_device(&ctx).unwrap();
                    let d = match bf16 {
                        true => Tensor::from_gpu_bf16(
                            t.shape(),
                            cast_bf16_cuda(d.gpu("t").unwrap()).unwrap(),
                        )
                        .unwrap(),
                        false => d,
                    };
                    tape.leaf(d, true)
                })
                .collect();
            let layout = eqat::ops::rope::RopeLayout::HalfSplit;
            let mut qk = [vars[0], vars[1]]
                .map(|v| eqat::ops::rope::rope(&mut tape, v, 0, 1e4, layout).unwrap());
            if between {
                qk = qk.map(|v| {
                    let sh = tape.value(v).shape().to_vec();
                    eqat::ops::reshape::reshape(&mut tape, v, &sh).unwrap()
                });
            }
            let out = att::attention(&mut tape, qk[0], qk[1], vars[2]).unwrap();
            let a = eqat::ops::reshape::reshape(&mut tape, out, &[s.b, s.t, c]).unwrap();
            let y = fake_quant_linear(&mut tape, a, p[0], p[1], p[2], cfg).unwrap();
            let tv = tape.input(target.to_device(&ctx).unwrap());
            let loss = eqat::ops::mse::mse(&mut tape, y, tv).unwrap();
            tape.backward(loss).unwrap();
            vars.iter()
                .map(|&v| {
                    let g = tape.grad(v).unwrap();
                    assert_grad_dtype(g, bf16);
                    g.to_f32_vec()
                })
                .collect()
        };
        let (f32s, direct, rounded) = (run(false, false), run(true, false), run(true, true));
        for (i, what) in ["dq", "dk"].iter().enumerate() {
            let want = to_f64(&f32s[i]);
            let err = |got: &[f32]| {
                let d: Vec<f64> = got.iter().zip(&want).map(|(&x, &w)| x as f64 - w).collect();
                rms(&d) / rms(&want)
            };
            let (e_direct, e_rounded) = (err(&direct[i]), err(&rounded[i]));
            say(&format!("  {s:?} {what}: rms relative difference {e_direct:.3e} (rounded first: {e_rounded:.3e})"));
            r.expect(
                &format!("{s:?} {what}: {e_direct:.3e} < {e_rounded:.3e} < 1e-2"),
                e_direct < e_rounded && e_rounded < 1e-2,
            );
        }
        r.expect(&format!("{s:?} dv bit for bit"), direct[2] == rounded[2]);
    }
    r.finish();
}
