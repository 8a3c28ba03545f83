//! The Llama block and model, built from ops, and the sources of their weights.
pub mod forward;
#[cfg(feature = "cuda")]
pub mod forward_cuda;
pub mod generate;
pub mod gguf;
pub mod gptq;
pub mod hf;
pub mod llama;
pub mod quantized;
pub mod source;

pub use forward::LlamaModel;
pub use source::{open_model, WeightSource};
