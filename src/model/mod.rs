//! The Llama block and model, built from ops.
pub mod llama;
pub mod quantized;
