//! GEMM throughput: our blocked kernel (`eqat::ops::gemm::sgemm`) against the `gemm` crate at the shapes
//! SmolLM2-135M training runs (4096 tokens, hidden 576, FFN 1536) and at 2048³.
//!
//! Each benchmark counts one element per FLOP (2·m·n·k), so criterion's "Gelem/s" is GFLOP/s. Two groups:
//! `sgemm_wall` is wall-clock time (what a training step sees); `sgemm_cpu` divides by the CPU time of the whole
//! process (all threads, Linux only), i.e. GFLOP per core-second, which stays meaningful when other processes
//! share the cores (rayon's idle spinning counts against it, so it errs low). Before both, a register-only FMA
//! loop measures the peak to read them against.
//!
//! Run: `cargo bench --bench gemm -- --warm-up-time 1 --measurement-time 3`
use criterion::measurement::{Measurement, WallTime};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eqat::tensor::rng::Rng;
use std::time::{Duration, Instant};

type Sgemm = fn(bool, bool, usize, usize, usize, f32, &[f32], &[f32], f32, &mut [f32]);

/// (name, transa, transb, m, k, n). Linear forward is x·Wᵀ (B transposed); its backward is dX = dY·W (plain)
/// and dW = dYᵀ·X (A transposed, k = tokens). "up" is the 576 → 1536 projection, "down" 1536 → 576.
const SHAPES: &[(&str, bool, bool, usize, usize, usize)] = &[
    ("fwd_xWt_up", false, true, 4096, 576, 1536),
    ("fwd_xWt_down", false, true, 4096, 1536, 576),
    ("bwd_dX_up", false, false, 4096, 1536, 576),
    ("bwd_dX_down", false, false, 4096, 576, 1536),
    ("bwd_dW_up", true, false, 1536, 4096, 576),
    ("bwd_dW_down", true, false, 576, 4096, 1536),
    ("square", false, false, 2048, 2048, 2048),
];

/// The same contract as `eqat::ops::gemm::sgemm`, through the `gemm` crate (its AVX2/FMA kernels on stable).
#[allow(clippy::too_many_arguments)]
fn sgemm_crate(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n && k > 0);
    // (column stride, row stride) of each operand as the logical matrix.
    let (a_cs, a_rs) = if transa { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if transb { (k, 1) } else { (1, n) };
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    // SAFETY: the assert bounds every index the strides reach; c is a distinct &mut borrow. The crate computes
    // dst = alpha·dst + beta·lhs·rhs, hence our beta and alpha in that order.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// 12 independent FMA chains per thread (enough to cover FMA latency × 2 pipes), all threads at once: returns
/// (FLOP per wall second, FLOP per CPU second of the process, i.e. per core when others share the cores).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn fma_peak(threads: usize) -> Option<(f64, f64)> {
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
    let (start, cpu_start) = (Instant::now(), process_cpu_time());
    let sink: f32 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            // SAFETY: AVX2 and FMA were detected above.
            .map(|_| s.spawn(move || unsafe { chains(iters) }))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let (secs, cpu_secs) = (start.elapsed(), process_cpu_time() - cpu_start);
    std::hint::black_box(sink);
    let flop = (threads as u64 * iters * 12 * 8 * 2) as f64;
    Some((flop / secs.as_secs_f64(), flop / cpu_secs.as_secs_f64()))
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn fma_peak(_: usize) -> Option<(f64, f64)> {
    None
}

/// CPU time of the whole process (every thread), as a criterion measurement.
#[cfg(target_os = "linux")]
struct CpuTime {
    wall: WallTime,
}

#[cfg(target_os = "linux")]
fn process_cpu_time() -> Duration {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: glibc's clock_gettime writes one timespec (two 64-bit fields on 64-bit Linux) to a valid pointer.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(target_os = "linux")]
impl Measurement for CpuTime {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        process_cpu_time()
    }
    fn end(&self, start: Duration) -> Duration {
        process_cpu_time() - start
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn criterion::measurement::ValueFormatter {
        self.wall.formatter()
    }
}

fn bench_shapes<M: Measurement>(c: &mut Criterion<M>, group: &str) {
    let mut rng = Rng::new(1);
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    for &(name, ta, tb, m, k, n) in SHAPES {
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let impls: [(&str, Sgemm); 2] = [("ours", eqat::ops::gemm::sgemm), ("crate", sgemm_crate)];
        for (imp, f) in impls {
            let id = BenchmarkId::new(imp, format!("{name}/{m}x{k}x{n}"));
            group.bench_function(id, |bench| {
                bench.iter(|| f(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut out))
            });
        }
    }
    group.finish();
}

fn bench_wall(c: &mut Criterion) {
    let threads = rayon::current_num_threads();
    match (fma_peak(1), fma_peak(threads)) {
        (Some(one), Some(all)) => println!(
            "FMA peak: wall {:.1} GFLOP/s on 1 thread, {:.1} GFLOP/s on {threads} threads; \
             {:.1} and {:.1} GFLOP per CPU-second",
            one.0 / 1e9,
            all.0 / 1e9,
            one.1 / 1e9,
            all.1 / 1e9
        ),
        _ => println!("FMA peak: no AVX2+FMA on this CPU, not measured"),
    }
    bench_shapes(c, "sgemm_wall");
}

#[cfg(target_os = "linux")]
fn bench_cpu(c: &mut Criterion<CpuTime>) {
    bench_shapes(c, "sgemm_cpu");
}

criterion_group!(wall, bench_wall);
#[cfg(target_os = "linux")]
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(CpuTime { wall: WallTime });
    targets = bench_cpu
}
#[cfg(target_os = "linux")]
criterion_main!(wall, cpu);
#[cfg(not(target_os = "linux"))]
criterion_main!(wall);
