//! One op per file: forward and backward together, the f64 `_ref` loops beside the f32 SIMD/rayon `_cpu`
//! version (and, with the `cuda` feature, the launch of its `cuda/<op>.cu` twin).
//!
//! Shape glossary: B batch, T time (tokens), C channels (hidden size), H query heads, G key/value heads,
//! D head dim, V vocabulary, N out features, K in features.
pub mod simd;

pub mod add;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod matmul;
pub mod mse;
pub mod mul;
pub mod reshape;
pub mod rmsnorm;
pub mod rope;
pub mod scale;
pub mod silu;
pub mod softmax;
pub mod sum;
pub mod swiglu;
pub mod transpose;

use crate::error::{Error, Result};

/// Checks that `b` broadcasts against `a`: equal (two scalars too), or a non-empty suffix of `a`'s shape.
pub fn check_suffix(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a == b || (b.len() <= a.len() && a[a.len() - b.len()..] == *b && !b.is_empty()) {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{b:?} does not broadcast against {a:?} (must equal it or a suffix of it)"),
        ))
    }
}

/// Checks that two shapes are equal.
pub fn check_same(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::shape(op, format!("{a:?} vs {b:?} (must be equal)")))
    }
}

/// db[j] = sum over rows r of dout[r * n + j], n = db.len(): the gradient of a broadcast operand.
pub fn reduce_rows(db: &mut [f32], dout: &[f32]) {
    db.fill(0.0);
    for row in dout.chunks_exact(db.len()) {
        simd::add_assign(db, row);
    }
}
