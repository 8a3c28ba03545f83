//! Readers and writers for model and checkpoint files.
pub mod gguf;
pub mod ggml_quants;
pub mod tokenizer;
