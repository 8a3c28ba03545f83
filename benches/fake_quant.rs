//! fake_quant forward + backward on a Llama-2-7B MLP weight (4096 × 11008), w2g128, CPU kernels.
//!
//! Bytes counted per iteration (the minimum traffic, each array touched once): read W, scales, zeros, dŴ;
//! write Ŵ, dW, dscales, dzeros = 4 B · (4·N·K + 4·N·K/g) = 727 MB. The backward re-reads W, scales and zeros,
//! so the real traffic is higher; GB/s here is that minimum over the measured time.
//!
//! Run: `cargo bench --bench fake_quant -- --warm-up-time 1 --measurement-time 3`
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eqat::quant::fake_quant::{fake_quant_bwd_cpu, fake_quant_fwd_cpu, init_minmax, QuantConfig};
use eqat::{Rng, Tensor};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let (n, k, g) = (4096usize, 11008usize, 128usize);
    let cfg = QuantConfig::new(2, g as i64).expect("w2g128");
    let mut rng = Rng::new(1);
    let w = rng.normal_vec(n * k, 0.02);
    let dout = rng.normal_vec(n * k, 1e-3);
    let (s, z) =
        init_minmax(&Tensor::from_vec(&[n, k], w.clone()).expect("shape"), cfg).expect("init");
    let (s, z) = (
        s.f32s("bench").expect("f32").to_vec(),
        z.f32s("bench").expect("f32").to_vec(),
    );
    let (mut out, mut dw) = (vec![0.0f32; n * k], vec![0.0f32; n * k]);
    let (mut ds, mut dz) = (vec![0.0f32; s.len()], vec![0.0f32; s.len()]);
    let bytes = 4 * (4 * n * k + 4 * s.len()) as u64;

    let mut group = c.benchmark_group("fake_quant");
    group.sample_size(10).throughput(Throughput::Bytes(bytes));
    group.bench_function("fwd_bwd/4096x11008/w2g128", |b| {
        b.iter(|| {
            fake_quant_fwd_cpu(&mut out, &w, &s, &z, g, cfg.qmax());
            fake_quant_bwd_cpu(
                Some(&mut dw),
                Some(&mut ds),
                Some(&mut dz),
                &dout,
                &w,
                &s,
                &z,
                g,
                cfg.qmax(),
            );
            black_box((&out, &dw, &ds, &dz));
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
