//! A packed layer for the real-quant GPU tests (tests/cuda_real_quant.rs, tests/cuda_ops.rs).
use eqat::quant::real_quant::QuantizedLinear;
use eqat::{Rng, Tensor};

/// A packed layer with random integers and zero points and positive scales, and its integers for the reference.
pub fn quant_layer(
    rng: &mut Rng,
    bits: u32,
    n: usize,
    k: usize,
    g: usize,
) -> (QuantizedLinear, Vec<u32>, Vec<u32>, Vec<f32>) {
    let levels = 1usize << bits;
    let w_int: Vec<u32> = (0..n * k).map(|_| rng.below(levels) as u32).collect();
    let zeros: Vec<u32> = (0..n * k / g).map(|_| rng.below(levels) as u32).collect();
    let scales: Vec<f32> = (0..n * k / g)
        .map(|_| 0.01 + 0.04 * rng.uniform() as f32)
        .collect();
    let st = Tensor::from_vec(&[n, k / g], scales.clone()).unwrap();
    let qlin = QuantizedLinear::from_ints(bits, g, k, n, &w_int, &zeros, st).unwrap();
    (qlin, w_int, zeros, scales)
}
