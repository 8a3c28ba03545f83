//! Quantization: fake-quant (training), bit packers, and the real-quant linear with its GPTQ tensors.
pub mod fake_quant;
pub mod pack;
pub mod real_quant;
