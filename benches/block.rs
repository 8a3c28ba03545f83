//! One Block-AP training step of a SmolLM2-135M-shaped block (w2g64, batch 2, T 512) on the CPU:
//! fake-quant of the seven linears, forward, MSE, backward, AdamW.
use criterion::{criterion_group, criterion_main, Criterion};
use eqat::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use eqat::ops::mse::mse;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::adamw::{AdamW, ParamGroup};
use eqat::{Rng, Tape, Tensor};

fn block_step(c: &mut Criterion) {
    let cfg = LlamaConfig::smollm2_135m();
    let mut rng = Rng::new(0);
    let w = BlockWeights::random(&cfg, &mut rng);
    let (b, t) = (2, 512);
    let x = Tensor::randn(&[b, t, cfg.hidden], 1.0, &mut rng);
    let y = Tensor::randn(&[b, t, cfg.hidden], 1.0, &mut rng);
    let mut tape = Tape::new();
    let vars = BlockVars::register(&mut tape, &w, Some(QuantConfig::new(2, 64).unwrap())).unwrap();
    let params: Vec<_> = tape.params().collect();
    let mut opt = AdamW::new(vec![ParamGroup { params, lr: 1e-5, weight_decay: 0.0 }], 0.9, 0.999, 1e-8);
    let mut g = c.benchmark_group("block_ap_step");
    g.sample_size(10);
    g.bench_function("smollm2_135m/w2g64/b2_t512", |bench| {
        bench.iter(|| {
            tape.reset();
            let xv = tape.input(x.clone());
            let yv = tape.input(y.clone());
            let out = block_forward(&mut tape, &cfg, &vars, xv).unwrap();
            let loss = mse(&mut tape, out, yv).unwrap();
            tape.zero_grad();
            tape.backward(loss).unwrap();
            opt.step(&mut tape, 1.0).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, block_step);
criterion_main!(benches);
