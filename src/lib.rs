//! eqat: EfficientQAT (Block-AP and E2E-QP) for Llama-family models, from scratch in Rust.
//!
//! Shape glossary used across the crate: B batch, T tokens, C hidden size, H query heads, G key/value heads,
//! D head dim, F feed-forward width, V vocabulary, N out features, K in features, `group_size` quantization
//! group along K, `wbits` bits per weight.
pub mod autograd;
pub mod bench;
pub mod dist;
pub mod error;
pub mod eval;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod io;
pub mod model;
pub mod ops;
pub mod plan;
pub mod quant;
pub mod tensor;
pub mod testing;
pub mod train;

pub use autograd::{Tape, Var};
pub use error::{Error, Result};
pub use tensor::{rng::Rng, DType, Tensor};
