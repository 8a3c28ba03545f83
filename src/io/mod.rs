//! Readers and writers for model and checkpoint files.
pub mod checkpoint;
pub mod export;
pub mod ggml_quants;
pub mod gguf;
pub mod hf;
pub mod mmap;
pub mod safetensors;
pub mod tokenizer;
