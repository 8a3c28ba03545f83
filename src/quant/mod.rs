//! Quantization: fake-quant (training), packers and real-quant linear (later issues).
pub mod fake_quant;
