//! GEMM throughput: our blocked kernel (`sgemm_blocked`) against the `gemm` crate (`sgemm_crate`) at the shapes
//! SmolLM2-135M training runs (4096 tokens, hidden 576, FFN 1536) and at 2048³. Criterion reports elements/s with
//! one element per FLOP (2·m·n·k), i.e. its "Gelem/s" is GFLOP/s. Before the GEMMs, a register-only FMA loop
//! measures this machine's peak so the numbers can be read as a fraction of it.
//!
//! Run: `cargo bench --bench gemm -- --warm-up-time 1 --measurement-time 3`
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eqat::ops::gemm::{sgemm_blocked, sgemm_crate};
use eqat::tensor::rng::Rng;
use std::time::Instant;

type Sgemm = fn(bool, bool, usize, usize, usize, f32, &[f32], &[f32], f32, &mut [f32]);

/// (name, transa, transb, m, k, n). Linear forward is x·Wᵀ (B transposed); its backward is dX = dY·W (plain)
/// and dW = dYᵀ·X (A transposed, k = tokens).
const SHAPES: &[(&str, bool, bool, usize, usize, usize)] = &[
    ("fwd_xWt_up", false, true, 4096, 576, 1536),
    ("fwd_xWt_down", false, true, 4096, 1536, 576),
    ("bwd_dX_up", false, false, 4096, 1536, 576),
    ("bwd_dX_down", false, false, 4096, 576, 1536),
    ("bwd_dW_up", true, false, 1536, 4096, 576),
    ("bwd_dW_down", true, false, 576, 4096, 1536),
    ("square", false, false, 2048, 2048, 2048),
];

/// FLOP/s of 12 independent FMA chains per thread (enough to cover FMA latency × pipes), all threads at once.
#[cfg(target_arch = "x86_64")]
fn fma_peak(threads: usize) -> Option<f64> {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx2,fma")]
    fn chains(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        let mut out = [0.0f32; 8];
        let s = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &r| _mm256_add_ps(s, r));
        // SAFETY: out holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return None;
    }
    let iters = 100_000_000u64;
    let start = Instant::now();
    let sink: f32 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            // SAFETY: AVX2 and FMA were detected above.
            .map(|_| s.spawn(move || unsafe { chains(iters) }))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    Some((threads as u64 * iters * 12 * 8 * 2) as f64 / secs)
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak(_: usize) -> Option<f64> {
    None
}

fn bench_gemm(c: &mut Criterion) {
    let threads = rayon::current_num_threads();
    match (fma_peak(1), fma_peak(threads)) {
        (Some(one), Some(all)) => println!(
            "FMA peak: {:.1} GFLOP/s on 1 thread, {:.1} GFLOP/s on {threads} threads",
            one / 1e9,
            all / 1e9
        ),
        _ => println!("FMA peak: no AVX2+FMA on this CPU, not measured"),
    }
    let mut rng = Rng::new(1);
    let mut group = c.benchmark_group("sgemm");
    group.sample_size(10);
    for &(name, ta, tb, m, k, n) in SHAPES {
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let impls: [(&str, Sgemm); 2] = [("blocked", sgemm_blocked), ("crate", sgemm_crate)];
        for (imp, f) in impls {
            let id = BenchmarkId::new(imp, format!("{name}/{m}x{k}x{n}"));
            group.bench_function(id, |bench| {
                bench.iter(|| f(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut out))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_gemm);
criterion_main!(benches);
