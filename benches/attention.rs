//! Causal grouped-query attention on the CPU, forward and forward+backward, at the shape: T = 512,
//! 9 query heads over 3 key/value heads of dim 64 (SmolLM2-135M's attention), batch 1 and 2.
//!
//! Throughput counts FLOPs (criterion's "elem/s" is FLOP/s) of the causal half only, one multiply-add = 2:
//! forward = 2 products (QKᵀ, PV) × 2·(T²/2)·D per head = 2·B·H·T²·D; backward = 5 products (QKᵀ again,
//! dP, dV, dQ, dK) = 5·B·H·T²·D, 2.5× forward; forward+backward = 7·B·H·T²·D. Work the code does beyond
//! that (the masked half of the diagonal blocks, exp, gathers) is not counted.
//!
//! Run: cargo bench --bench attention -- --warm-up-time 1 --measurement-time 3
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eqat::ops::attention::{attention_bwd_cpu, attention_fwd_cpu, AttentionShape};
use eqat::Rng;
use std::hint::black_box;

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    for b in [1, 2] {
        let s = AttentionShape {
            b,
            t: 512,
            h: 9,
            g: 3,
            d: 64,
        };
        let causal_product = (s.b * s.h * s.t * s.t * s.d) as u64; // 2·(T²/2)·D per head and product
        let mut rng = Rng::new(1);
        let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
        let q = rng.normal_vec(nq, 1.0);
        let k = rng.normal_vec(nkv, 1.0);
        let v = rng.normal_vec(nkv, 1.0);
        let dout = rng.normal_vec(nq, 1.0);
        let mut out = vec![0.0; nq];
        let mut lse = vec![0.0; s.b * s.h * s.t];
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        let name = format!("B{}_T{}_H{}_G{}_D{}", s.b, s.t, s.h, s.g, s.d);

        group.throughput(Throughput::Elements(2 * causal_product));
        group.bench_function(format!("fwd/{name}"), |bench| {
            bench.iter(|| attention_fwd_cpu(&mut out, &mut lse, &q, &k, &v, black_box(s)))
        });
        group.throughput(Throughput::Elements(7 * causal_product));
        group.bench_function(format!("fwd_bwd/{name}"), |bench| {
            bench.iter(|| {
                attention_fwd_cpu(&mut out, &mut lse, &q, &k, &v, black_box(s));
                attention_bwd_cpu(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, s);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
