//! cross_entropy: loss = mean over counted rows r of -log softmax(logits[r])[targets[r]], a scalar, with
//! torch `F.cross_entropy(logits, targets, ignore_index=...)` semantics: rows whose target equals
//! `ignore_index` count neither in the sum nor in the mean. logits are [.., V] (usually [N, V] or [B, T, V]),
//! one target per row.
//!
//! Where torch returns NaN because no row counts, `cross_entropy` returns an error instead (a NaN loss would
//! only surface steps later); `cross_entropy_nll_sum`, the no-grad helper for perplexity, returns (0, 0) then.
//!
//! Forward keeps per row only the max and log-sum-exp shift (two f32), never a softmax [N, V]: at
//! N = 8192, V = 49152 (SmolLM2) that buffer would be 1.6 GB. Backward recomputes softmax from the logits:
//! dlogits[r] = (softmax(logits[r]) - onehot(target)) · dout / count for counted rows, 0 for ignored rows.
//! Activation grads are written (`=`); the tape does the `+=`. On the GPU: [`cuda`] (`cuda/cross_entropy.cu`),
//! the same two saved f32 per row, the targets uploaded once and kept for the backward.
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::f32x8;

/// Exponentials are summed 8 per lane in f32 over blocks of this many logits, blocks added in f64: the f32
/// rounding stays that of a 32-term sum even at V = 49152, without converting every element.
const SUM_BLOCK: usize = 256;

/// One row's log-sum-exp as max + log_sum, kept apart: with logits near 1000 a single f32 log-sum-exp would be
/// off by up to 3e-5 (half an ulp), a 3e-5 relative error in every recomputed softmax value.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowLse {
    pub max: f32,
    pub log_sum: f32,
}

fn lanes(s: &[f32]) -> f32x8 {
    f32x8::new(s.try_into().expect("8 lanes"))
}

/// Mean NLL over rows with target != ignore_index. Targets must be in [0, V) or ignore_index, and some row
/// must count (the tape wrapper checks both).
pub fn cross_entropy_fwd_ref(logits: &[f64], v: usize, targets: &[i32], ignore_index: i32) -> f64 {
    let (mut sum, mut count) = (0.0, 0);
    for (row, &t) in logits.chunks(v).zip(targets) {
        if t == ignore_index {
            continue;
        }
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        sum += lse - row[t as usize];
        count += 1;
    }
    sum / count as f64
}

pub fn cross_entropy_bwd_ref(
    dlogits: &mut [f64],
    logits: &[f64],
    v: usize,
    targets: &[i32],
    ignore_index: i32,
    dout: f64,
) {
    let count = targets.iter().filter(|&&t| t != ignore_index).count();
    for ((d, row), &t) in dlogits.chunks_mut(v).zip(logits.chunks(v)).zip(targets) {
        if t == ignore_index {
            d.fill(0.0);
            continue;
        }
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
        for (d, x) in d.iter_mut().zip(row) {
            *d = (x - m).exp() / z * dout / count as f64;
        }
        d[t as usize] -= dout / count as f64;
    }
}

/// max and log(sum exp(x - max)) of one row. Any NaN makes the result NaN (wide's exp maps NaN to 0, so
/// NaNs are caught here rather than vanishing from the sum).
fn row_lse(row: &[f32]) -> (f32, f64) {
    let n8 = row.len() / 8 * 8;
    let (mut mv, mut nan) = (f32x8::splat(f32::NEG_INFINITY), f32x8::ZERO);
    for c in row[..n8].chunks_exact(8) {
        let x = lanes(c);
        nan |= x.is_nan();
        mv = mv.fast_max(x);
    }
    let mut m = mv
        .as_array_ref()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut has_nan = nan.any();
    for &x in &row[n8..] {
        m = m.max(x);
        has_nan |= x.is_nan();
    }
    if has_nan {
        return (f32::NAN, f64::NAN);
    }
    let msplat = f32x8::splat(m);
    let mut total = 0.0f64;
    for block in row.chunks(SUM_BLOCK) {
        let n8 = block.len() / 8 * 8;
        let mut acc = f32x8::ZERO;
        for c in block[..n8].chunks_exact(8) {
            acc += (lanes(c) - msplat).exp();
        }
        total += acc.reduce_add() as f64;
        total += block[n8..]
            .iter()
            .map(|&x| ((x - m) as f64).exp())
            .sum::<f64>();
    }
    (m, total.ln())
}

/// Fills `lse` for counted rows and returns (sum of their NLL in f64, their count). Per-row values are summed
/// in row order, so the result does not depend on the thread count. Targets must be valid (see `check_targets`).
pub fn cross_entropy_fwd_cpu(
    lse: &mut [RowLse],
    logits: &[f32],
    v: usize,
    targets: &[i32],
    ignore_index: i32,
) -> (f64, usize) {
    let nll: Vec<Option<f64>> = lse
        .par_iter_mut()
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .map(|(l, (row, &t))| {
            if t == ignore_index {
                return None;
            }
            let (max, log_sum) = row_lse(row);
            *l = RowLse {
                max,
                log_sum: log_sum as f32,
            };
            Some(max as f64 + log_sum - row[t as usize] as f64)
        })
        .collect();
    nll.iter()
        .flatten()
        .fold((0.0, 0), |(s, c), &x| (s + x, c + 1))
}

/// dlogits = (softmax - onehot) · scale for counted rows (scale = dout / count), 0 for ignored rows.
pub fn cross_entropy_bwd_cpu(
    dlogits: &mut [f32],
    logits: &[f32],
    v: usize,
    targets: &[i32],
    ignore_index: i32,
    lse: &[RowLse],
    scale: f32,
) {
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter().zip(lse.par_iter()))
        .for_each(|((d, row), (&t, l))| {
            if t == ignore_index {
                d.fill(0.0);
                return;
            }
            // A row with a NaN logit (its max is NaN) gets NaN gradients, as in torch; wide's exp would turn
            // them into zeros.
            if l.max.is_nan() {
                d.fill(f32::NAN);
                return;
            }
            let n8 = v / 8 * 8;
            let (mv, sv, gv) = (
                f32x8::splat(l.max),
                f32x8::splat(l.log_sum),
                f32x8::splat(scale),
            );
            for (d, x) in d[..n8].chunks_exact_mut(8).zip(row[..n8].chunks_exact(8)) {
                d.copy_from_slice((((lanes(x) - mv) - sv).exp() * gv).as_array_ref());
            }
            for (d, &x) in d[n8..].iter_mut().zip(&row[n8..]) {
                *d = ((x - l.max) - l.log_sum).exp() * scale;
            }
            d[t as usize] -= scale;
        });
}

/// (rows N, vocabulary V) of logits [.., V].
fn rows_vocab(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.last() {
        Some(&v) if v > 0 => Ok((shape.iter().product::<usize>() / v, v)),
        _ => Err(Error::shape(
            op,
            format!("logits {shape:?} must be [.., V] with V > 0"),
        )),
    }
}

/// One target per row, each in [0, V) or equal to ignore_index.
fn check_targets(
    op: &'static str,
    shape: &[usize],
    n: usize,
    v: usize,
    targets: &[i32],
    ignore_index: i32,
) -> Result<()> {
    if targets.len() != n {
        return Err(Error::shape(
            op,
            format!(
                "logits {shape:?} have {n} rows but targets has {} entries",
                targets.len()
            ),
        ));
    }
    let bad = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != ignore_index && (t < 0 || t as usize >= v));
    match bad {
        Some((r, t)) => Err(Error::invalid(
            op,
            format!(
                "target {t} at row {r} is outside [0, {v}) and is not ignore_index {ignore_index}"
            ),
        )),
        None => Ok(()),
    }
}

/// No-grad sum of per-token NLL over counted rows and their count, for perplexity (exp(sum / count) over a
/// whole evaluation set). Returns (0.0, 0) when every target is ignore_index.
pub fn cross_entropy_nll_sum(
    logits: &Tensor,
    targets: &[i32],
    ignore_index: i32,
) -> Result<(f64, usize)> {
    const OP: &str = "cross_entropy_nll_sum";
    let (n, v) = rows_vocab(OP, logits.shape())?;
    check_targets(OP, logits.shape(), n, v, targets, ignore_index)?;
    let mut lse = vec![RowLse::default(); n];
    Ok(cross_entropy_fwd_cpu(
        &mut lse,
        logits.f32s(OP)?,
        v,
        targets,
        ignore_index,
    ))
}

pub fn cross_entropy(
    tape: &mut Tape,
    logits: Var,
    targets: &[i32],
    ignore_index: i32,
) -> Result<Var> {
    const OP: &str = "cross_entropy";
    let shape = tape.value(logits).shape().to_vec();
    let (n, v) = rows_vocab(OP, &shape)?;
    check_targets(OP, &shape, n, v, targets, ignore_index)?;
    let count = targets.iter().filter(|&&t| t != ignore_index).count();
    if count == 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "all {n} targets of logits {shape:?} equal ignore_index {ignore_index}: the mean over zero \
                 tokens is undefined (torch would return NaN)"
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of(OP, &[tape.value(logits)])? {
        let (mut loss, mut lse_max, mut lse_log_sum) =
            (ctx.alloc(1)?, ctx.alloc(n)?, ctx.alloc(n)?);
        let targets_d = ctx.upload_bits(bytemuck::cast_slice(targets))?;
        cuda::cross_entropy_fwd_cuda(
            &mut loss,
            &mut lse_max,
            &mut lse_log_sum,
            tape.value(logits).gpu(OP)?,
            &targets_d,
            ignore_index,
            v,
            count,
        )?;
        let out = Tensor::from_gpu(&[], loss)?;
        let saved = Saved::Cuda(Box::new(SavedCuda {
            targets: targets_d,
            lse_max,
            lse_log_sum,
        }));
        return Ok(push(tape, out, logits, ignore_index, saved, count, v));
    }
    let mut lse = vec![RowLse::default(); n];
    let (sum, _) = cross_entropy_fwd_cpu(
        &mut lse,
        tape.value(logits).f32s(OP)?,
        v,
        targets,
        ignore_index,
    );
    let out = tape.alloc_scalar((sum / count as f64) as f32);
    let saved = Saved::Cpu {
        targets: targets.to_vec(),
        lse,
    };
    Ok(push(tape, out, logits, ignore_index, saved, count, v))
}

/// Records the loss, with its backward when the logits need a gradient.
fn push(
    tape: &mut Tape,
    out: Tensor,
    logits: Var,
    ignore_index: i32,
    saved: Saved,
    count: usize,
    v: usize,
) -> Var {
    if !tape.needs_grad(&[logits]) {
        return tape.push_const(out);
    }
    let backward = CrossEntropyBackward {
        ignore_index,
        saved,
        count,
        v,
    };
    tape.push_op(out, &[logits], Box::new(backward))
}

/// What the backward needs, where the forward ran.
enum Saved {
    Cpu {
        targets: Vec<i32>,
        lse: Vec<RowLse>,
    },
    /// Boxed: three device buffers would make every `Saved` five times the host variant's size.
    #[cfg(feature = "cuda")]
    Cuda(Box<SavedCuda>),
}

#[cfg(feature = "cuda")]
struct SavedCuda {
    targets: crate::gpu::GpuBuf,
    lse_max: crate::gpu::GpuBuf,
    lse_log_sum: crate::gpu::GpuBuf,
}

struct CrossEntropyBackward {
    ignore_index: i32,
    saved: Saved,
    count: usize,
    v: usize,
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn backward(
        &self,
        x: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        const OP: &str = "cross_entropy_bwd";
        let Some(dl) = &mut d[0] else {
            return Ok(());
        };
        match &self.saved {
            Saved::Cpu { targets, lse } => {
                let scale = (dout.f32s(OP)?[0] as f64 / self.count as f64) as f32;
                cross_entropy_bwd_cpu(
                    dl.f32s_mut(OP)?,
                    x[0].f32s(OP)?,
                    self.v,
                    targets,
                    self.ignore_index,
                    lse,
                    scale,
                );
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Saved::Cuda(saved) => cuda::cross_entropy_bwd_cuda(
                dl.gpu_mut(OP)?,
                x[0].gpu(OP)?,
                &saved.targets,
                self.ignore_index,
                &saved.lse_max,
                &saved.lse_log_sum,
                dout.gpu(OP)?,
                self.v,
                self.count,
            ),
        }
    }
}

#[cfg(test)]
mod tests;
