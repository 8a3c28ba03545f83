//! One tape whose every op of tests/cuda_ops.rs, E2E-QP's real-quant linear included (its own checks are in
//! tests/cuda_real_quant.rs), runs on the device against the same tape on the host (reshape is checked here: it is
//! a device copy). Without a GPU the test prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::real_quant::quant_layer;
use cuda_common::*;
use eqat::gpu::GpuContext;
use eqat::ops::cross_entropy as ce;
use eqat::ops::matmul;
use eqat::ops::{embedding, mul, reshape, scale, silu, softmax, sum, transpose};
use eqat::quant::real_quant::linear as rq;
use eqat::quant::real_quant::QuantizedLinear;
use eqat::testing::to_f64;
use eqat::{Rng, Tape, Tensor, Var};
use std::sync::Arc;

/// The leaves of [`tape_graph`]: an embedding table, a packed layer's trainable scales, a gain vector.
struct Leaves {
    emb: Var,
    scales: Var,
    gain: Var,
}

/// One graph through every op of this file: embedding -> real_quant_linear -> silu -> mul -> reshape ->
/// transpose -> softmax -> matmul -> scale -> cross_entropy, plus mean and sum of a side branch. Returns the
/// (cross-entropy loss, mean loss) Vars; values come in host tensors and are moved to `ctx` when given.
fn tape_graph(
    tape: &mut Tape,
    ctx: Option<&Arc<GpuContext>>,
    qlin: &QuantizedLinear,
    init: &[Tensor; 3],
    ids: &[u32],
    targets: &[i32],
) -> (Leaves, Var, Var) {
    let dev = |t: &Tensor| match ctx {
        Some(c) => t.to_device(c).unwrap(),
        None => t.clone(),
    };
    let leaves = Leaves {
        emb: tape.param(dev(&init[0])).unwrap(),
        scales: tape.param(dev(&init[1])).unwrap(),
        gain: tape.param(dev(&init[2])).unwrap(),
    };
    let h = embedding::embedding(tape, leaves.emb, ids, &[2, 9]).unwrap();
    let q = rq::real_quant_linear(tape, h, qlin, leaves.scales).unwrap();
    let s = silu::silu(tape, q).unwrap();
    let m = mul::mul(tape, s, leaves.gain).unwrap();
    let heads = reshape::reshape(tape, m, &[2, 9, 5, 8]).unwrap();
    let t = transpose::transpose(tape, heads, 1, 2).unwrap(); // [2, 5, 9, 8]
    let p = softmax::softmax(tape, t).unwrap();
    let pt = transpose::transpose(tape, p, 2, 3).unwrap(); // [2, 5, 8, 9]
    let mm = matmul::matmul(tape, t, pt).unwrap(); // [2, 5, 9, 9]
    let sc = scale::scale(tape, mm, 0.3).unwrap();
    let logits = reshape::reshape(tape, sc, &[90, 9]).unwrap();
    let ce_loss = ce::cross_entropy(tape, logits, targets, -100).unwrap();
    let sq = mul::mul(tape, m, m).unwrap();
    let mean_loss = sum::mean(tape, sq).unwrap();
    (leaves, ce_loss, mean_loss)
}

#[test]
fn tape_ops_dispatch_to_the_device() {
    let Some(ctx) = device("tape") else { return };
    let mut r = Report::new("tape on the device vs host");
    let mut rng = Rng::new(307);
    let (qlin, _, _, scales) = quant_layer(&mut rng, 3, 40, 24, 8);
    let init = [
        Tensor::randn(&[37, 24], 1.0, &mut rng),
        Tensor::from_vec(&[40, 3], scales).unwrap(),
        Tensor::randn(&[40], 1.0, &mut rng),
    ];
    let ids: Vec<u32> = (0..18).map(|_| rng.below(20) as u32).collect();
    let targets: Vec<i32> = (0..90)
        .map(|i| match i % 7 {
            3 => -100,
            _ => rng.below(9) as i32,
        })
        .collect();
    // Both losses, one backward each, on a fresh tape per place (host, device).
    let mut results: Vec<Vec<Vec<f32>>> = Vec::new();
    for place in [None, Some(&ctx)] {
        let mut per_loss = Vec::new();
        for which in 0..2 {
            let mut tape = Tape::new();
            let (l, ce_loss, mean_loss) =
                tape_graph(&mut tape, place, &qlin, &init, &ids, &targets);
            let loss = [ce_loss, mean_loss][which];
            r.expect(
                &format!("loss {which} lives on {:?}", place.map(|c| c.ordinal())),
                tape.value(loss).is_cuda() == place.is_some(),
            );
            tape.backward(loss).unwrap();
            per_loss.push(tape.value(loss).to_host().unwrap().to_f32_vec());
            for v in [l.emb, l.scales, l.gain] {
                let g = tape.grad(v).map(|g| g.to_host().unwrap().to_f32_vec());
                per_loss.push(g.unwrap_or_default());
            }
        }
        results.push(per_loss);
    }
    let names = ["ce loss", "ce demb", "ce dscales", "ce dgain"]
        .into_iter()
        .chain(["mean loss", "mean demb", "mean dscales", "mean dgain"]);
    for (i, name) in names.enumerate() {
        let (host, dev) = (&results[0][i], &results[1][i]);
        r.expect(
            &format!("{name} has values"),
            !host.is_empty() && host.len() == dev.len(),
        );
        // Two f32 computations (not f32 against f64) through a dozen ops whose roundings compound, the
        // softmax and cross-entropy amplifying them: 1e-4 relative. The per-op tests above hold the 1e-5 bar;
        // this one checks that every forward and Backward ran on the device and routed gradients alike.
        r.check_tol(name, dev, &to_f64(host), 1e-4 * rms(&to_f64(host)), 1e-4);
    }
    r.finish();
}
