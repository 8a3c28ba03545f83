//! A whole Llama block on the tape: backward against finite differences, and a short Block-AP run that must
//! lower its loss and replay bit for bit.
use eqat::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use eqat::ops::rope::RopeLayout;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::block_ap::{train_block, BlockApOptions, TensorPairs};
use eqat::{Rng, Tape, Tensor};

fn tiny(layout: RopeLayout) -> LlamaConfig {
    LlamaConfig {
        hidden: 16,
        intermediate: 24,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
        n_layers: 1,
        vocab: 32,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_layout: layout,
        tie_embeddings: false,
        attn_bias: false,
    }
}

/// Weights large enough (std 0.3) that the block is far from linear, so the check exercises every op.
fn tiny_weights(cfg: &LlamaConfig, rng: &mut Rng) -> BlockWeights {
    let mut w = BlockWeights::random(cfg, rng);
    for l in &mut w.linears {
        let shape = l.shape().to_vec();
        *l = Tensor::randn(&shape, 0.3, rng);
    }
    w
}

/// loss(params) = sum(block(x) * r) computed in f64 from the f32 forward.
fn loss_of(cfg: &LlamaConfig, w: &BlockWeights, x: &Tensor, r: &[f32]) -> f64 {
    let mut tape = Tape::new();
    let vars = BlockVars::register(&mut tape, w, None).unwrap();
    let xv = tape.input(x.clone());
    let out = block_forward(&mut tape, cfg, &vars, xv).unwrap();
    tape.value(out)
        .f32s("t")
        .unwrap()
        .iter()
        .zip(r)
        .map(|(&o, &r)| o as f64 * r as f64)
        .sum()
}

#[test]
fn block_backward_matches_finite_differences_in_both_rope_layouts() {
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let cfg = tiny(layout);
        let mut rng = Rng::new(42);
        let w = tiny_weights(&cfg, &mut rng);
        let (b, t) = (2, 5);
        let x = Tensor::randn(&[b, t, cfg.hidden], 1.0, &mut rng);
        let r = rng.normal_vec(b * t * cfg.hidden, 1.0);

        let mut tape = Tape::new();
        let vars = BlockVars::register(&mut tape, &w, None).unwrap();
        let xv = tape.leaf(x.clone(), true);
        let out = block_forward(&mut tape, &cfg, &vars, xv).unwrap();
        let rv = tape.input(Tensor::from_vec(&[b, t, cfg.hidden], r.clone()).unwrap());
        let prod = eqat::ops::mul::mul(&mut tape, out, rv).unwrap();
        let loss = eqat::ops::sum::sum(&mut tape, prod).unwrap();
        tape.backward(loss).unwrap();

        // Directional derivatives along a random direction u for each tensor: (L(p+hu) - L(p-hu)) / 2h vs <g, u>.
        // The weights (std 0.3) make the block strongly nonlinear: h = 1e-2 already leaves 5% truncation error
        // (seen on attn_norm), h = 3e-3 brings it under 1%; the f32 forward's ~1e-5 rounding in L adds ~2e-3.
        let h = 3e-3f32;
        let mut check = |name: &str, grad: &[f32], perturb: &dyn Fn(&[f32], f32) -> f64| {
            let u: Vec<f32> = rng.normal_vec(grad.len(), 1.0);
            let analytic: f64 = grad
                .iter()
                .zip(&u)
                .map(|(&g, &u)| g as f64 * u as f64)
                .sum();
            let numeric = (perturb(&u, h) - perturb(&u, -h)) / (2.0 * h as f64);
            let tol = 2e-2 * analytic.abs().max(numeric.abs()) + 1e-3;
            assert!(
                (analytic - numeric).abs() <= tol,
                "{layout:?} {name}: analytic {analytic} numeric {numeric}"
            );
        };
        let gx = tape.grad(xv).unwrap().f32s("t").unwrap().to_vec();
        check("x", &gx, &|u, s| {
            let xs: Vec<f32> = x
                .f32s("t")
                .unwrap()
                .iter()
                .zip(u)
                .map(|(a, u)| a + s * u)
                .collect();
            loss_of(&cfg, &w, &Tensor::from_vec(x.shape(), xs).unwrap(), &r)
        });
        let bumped = |t: &Tensor, u: &[f32], s: f32| {
            let v: Vec<f32> = t
                .f32s("t")
                .unwrap()
                .iter()
                .zip(u)
                .map(|(a, u)| a + s * u)
                .collect();
            Tensor::from_vec(t.shape(), v).unwrap()
        };
        let g = tape
            .grad(vars.attn_norm)
            .unwrap()
            .f32s("t")
            .unwrap()
            .to_vec();
        check("attn_norm", &g, &|u, s| {
            let mut w2 = w.clone();
            w2.attn_norm = bumped(&w.attn_norm, u, s);
            loss_of(&cfg, &w2, &x, &r)
        });
        let g = tape
            .grad(vars.ffn_norm)
            .unwrap()
            .f32s("t")
            .unwrap()
            .to_vec();
        check("ffn_norm", &g, &|u, s| {
            let mut w2 = w.clone();
            w2.ffn_norm = bumped(&w.ffn_norm, u, s);
            loss_of(&cfg, &w2, &x, &r)
        });
        for (i, (name, _, _)) in cfg.linear_shapes().iter().enumerate() {
            let g = tape
                .grad(vars.linears[i].weight)
                .unwrap()
                .f32s("t")
                .unwrap()
                .to_vec();
            check(name, &g, &|u, s| {
                let mut w2 = w.clone();
                w2.linears[i] = bumped(&w.linears[i], u, s);
                loss_of(&cfg, &w2, &x, &r)
            });
        }
    }
}

fn short_block_ap_run(seed: u64) -> Vec<f32> {
    let cfg = LlamaConfig {
        hidden: 64,
        intermediate: 96,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        ..tiny(RopeLayout::HalfSplit)
    };
    let mut rng = Rng::new(seed);
    let w = BlockWeights::random(&cfg, &mut rng);
    let (n, t) = (4, 16);
    let inputs = Tensor::randn(&[n, t, cfg.hidden], 1.0, &mut rng);
    // Targets: the full-precision block on the same inputs.
    let mut tape = Tape::new();
    let vars = BlockVars::register(&mut tape, &w, None).unwrap();
    let targets = tape.no_grad(|tape| {
        let x = tape.input(inputs.clone());
        let y = block_forward(tape, &cfg, &vars, x).unwrap();
        tape.value(y).clone()
    });
    let mut opts = BlockApOptions::recipe(QuantConfig::new(2, 16).unwrap());
    // 20 steps: 4 samples at batch 1 for 5 epochs, with learning rates 10x the 4096-sample recipe so that
    // 20 steps move the loss visibly.
    opts.batch_size = 1;
    opts.epochs = 5;
    opts.quant_lr = 1e-3;
    opts.weight_lr = 1e-4;
    train_block(
        &cfg,
        &w,
        &TensorPairs {
            inputs: &inputs,
            targets: &targets,
        },
        None,
        &opts,
        |_| {},
    )
    .unwrap()
    .step_losses
}

#[test]
fn twenty_block_ap_steps_lower_the_loss_and_replay_identically() {
    let a = short_block_ap_run(7);
    let b = short_block_ap_run(7);
    assert_eq!(a.len(), 20);
    assert_eq!(
        a, b,
        "per-step losses differ between two runs with the same seed"
    );
    let first: f32 = a[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = a[16..].iter().sum::<f32>() / 4.0;
    assert!(
        last < 0.8 * first,
        "loss did not fall: first five {:?}, last five {:?}",
        &a[..5],
        &a[15..]
    );
}

#[test]
fn steady_state_steps_reuse_the_tape_buffers() {
    let cfg = tiny(RopeLayout::HalfSplit);
    let mut rng = Rng::new(3);
    let w = tiny_weights(&cfg, &mut rng);
    let mut tape = Tape::new();
    let vars = BlockVars::register(&mut tape, &w, Some(QuantConfig::new(4, 8).unwrap())).unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        tape.reset();
        let x = tape.input(Tensor::randn(&[2, 5, cfg.hidden], 1.0, &mut rng));
        let out = block_forward(&mut tape, &cfg, &vars, x).unwrap();
        let loss = eqat::ops::sum::mean(&mut tape, out).unwrap();
        tape.zero_grad();
        tape.backward(loss).unwrap();
        tape.reset();
        held.push(tape.pool_held_values());
    }
    assert!(held[1] > 0, "the pool kept nothing");
    assert_eq!(
        held[1], held[3],
        "pool grew after the first steps: {held:?}"
    );
}
