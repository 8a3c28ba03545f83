//! The folded norm: h = rmsnorm(x)·γ read only by fake-quantized bf16 linears (Block-AP's q, k and v), when x
//! needs no gradient (Block-AP's block input is data).
//!
//! With x̂ = x·rstd per row, h = x̂·diag(γ), and a linear y = h·Ŵᵀ:
//!   dŴ = dYᵀ·h = (dYᵀ·x̂)·diag(γ) = G·diag(γ)
//!   dγ_c = Σ_t dh_tc·x̂_tc with dh = dY·Ŵ, so dγ_c = Σ_t Σ_j dY_tj·Ŵ_jc·x̂_tc = Σ_j Ŵ_jc·G_jc.
//! γ's gradient thus comes from G, which the weight gradient needs anyway: dh = dY·Ŵ (a GEMM as large as the
//! forward's, for each of q, k and v) and rmsnorm's backward are never computed. The algebra is exact; in bf16
//! only the roundings move: the dŴ GEMM reads bf16(x̂) instead of bf16(h), and G is rounded to bf16 before ·γ.
//!
//! `rmsnorm_folded` records h as a bf16 value without a gradient and leaves (x̂_b, γ) on the tape for it
//! (`Tape::norm_fold`); fake_quant_linear's bf16 path finds them, takes γ as a fifth input and finishes the
//! backward with `norm_fold_bwd_cuda`. Any other reader of h would leave γ's gradient short, so `linear` refuses
//! a folded input and `block_forward` folds only when q, k and v are all fake-quantized bf16 linears.
use super::check_operands;
use super::cuda::{rmsnorm_fwd_cuda_into, FwdOutputs, CUDA};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::gpu::{opt_arg, Arg, Bf16Buf, GpuBuf};
use crate::tensor::Tensor;
use std::sync::Arc;

/// Rows of G per block of `norm_fold_bwd`: the dγ partials are [n / 32, k], a small read for add_bwd_f32, and
/// the grid keeps ≥ 1024 blocks of 256 threads at the 7B and 70B q shapes.
const FOLD_ROWS: usize = 32;

/// What a folded norm's readers need for their backward: bf16(x̂) (the dŴ GEMM's operand) and γ's tape entry.
#[derive(Clone)]
pub struct NormFold {
    pub xhat: Arc<Bf16Buf>,
    pub gamma: Var,
}

/// h = rmsnorm(x)·γ as a bf16 device value without a gradient of its own; γ's gradient reaches it through the
/// linears that read h (module docs). Errors when x needs a gradient or outside the GPU's bf16 mode.
pub fn rmsnorm_folded(tape: &mut Tape, x: Var, gamma: Var, eps: f32) -> Result<Var> {
    const OP: &str = "rmsnorm_folded";
    let sx = check_operands(tape, OP, x, gamma, eps)?;
    if tape.needs_grad(&[x]) {
        return Err(Error::invalid(
            OP,
            "x needs a gradient, which the folded norm does not compute: use rmsnorm",
        ));
    }
    let ctx = match crate::gpu::device_of(OP, &[tape.value(x), tape.value(gamma)])? {
        Some(ctx) if ctx.matmul_bf16() => ctx,
        _ => {
            return Err(Error::invalid(
                OP,
                "needs device values in the bf16 mode (set_matmul_bf16)",
            ))
        }
    };
    let numel = tape.value(x).numel();
    let (mut h, mut xhat) = (ctx.alloc_bf16(numel)?, ctx.alloc_bf16(numel)?);
    let outs = FwdOutputs {
        out_b: Some(&mut h),
        xhat_b: Some(&mut xhat),
        ..FwdOutputs::default()
    };
    rmsnorm_fwd_cuda_into(
        outs,
        tape.value(x).gpu(OP)?,
        tape.value(gamma).gpu(OP)?,
        eps,
    )?;
    let h = tape.push_const(Tensor::from_gpu_bf16(&sx, h)?);
    tape.set_norm_fold(
        h,
        NormFold {
            xhat: Arc::new(xhat),
            gamma,
        },
    );
    Ok(h)
}

/// Given G = dYᵀ·x̂ ([n, k] bf16) and the linear's Ŵ_b, writes dŴ = G·diag(γ) over G and, when asked for,
/// dγ_c = Σ_j Ŵ_jc·G_jc into `dgamma` (`=`, not `+=`); k = γ.len() must be even.
pub fn norm_fold_bwd_cuda(
    g: &mut Bf16Buf,
    wq: &Bf16Buf,
    gamma: &GpuBuf,
    dgamma: Option<&mut GpuBuf>,
) -> Result<()> {
    let k = gamma.len();
    let n = g.len() / k.max(1);
    if k == 0
        || !k.is_multiple_of(2)
        || g.len() != n * k
        || wq.len() != g.len()
        || dgamma.as_ref().is_some_and(|d| d.len() != k)
        || n.div_ceil(FOLD_ROWS) > 65535
    {
        return Err(Error::shape(
            "norm_fold_bwd_cuda",
            format!(
                "G {} and Ŵ {} values, γ {k} (even, > 0), dγ {:?}: need G and Ŵ [n, {k}] (n < 2^21), dγ [{k}]",
                g.len(),
                wq.len(),
                dgamma.as_ref().map(|d| d.len())
            ),
        ));
    }
    let ctx = gamma.ctx().clone();
    let row_blocks = n.div_ceil(FOLD_ROWS);
    let mut partial = dgamma
        .is_some()
        .then(|| ctx.alloc(row_blocks * k))
        .transpose()?;
    ctx.launch(
        &CUDA,
        "norm_fold_bwd",
        (
            (k / 2).div_ceil(crate::gpu::BLOCK as usize) as u32,
            row_blocks as u32,
            1,
        ),
        (crate::gpu::BLOCK, 1, 1),
        0,
        &[
            g.arg(),
            wq.arg(),
            gamma.arg(),
            opt_arg(&partial.as_mut()),
            Arg::I64(n as i64),
            Arg::I32(k as i32),
            Arg::I32(FOLD_ROWS as i32),
        ],
    )?;
    match (dgamma, &partial) {
        (Some(d), Some(p)) => crate::ops::add::add_bwd_cuda(d, p),
        _ => Ok(()),
    }
}
