//! sum and mean of all elements to a scalar. Backward: every input element gets dout (sum) or dout / n (mean).
//! On the GPU: `cuda/sum.cu` (f64 block partials added in a fixed order; dout read on the device).
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Sum in f64 per chunk so that long reductions do not lose precision; chunks fixed so the result is
/// deterministic whatever the thread count.
pub fn sum_fwd_cpu(x: &[f32]) -> f32 {
    x.par_chunks(4096)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>())
        .collect::<Vec<_>>()
        .iter()
        .sum::<f64>() as f32
}

/// The f64 sum, the reference of `sum_fwd_cpu` and `sum_fwd_cuda`.
pub fn sum_fwd_ref(x: &[f64]) -> f64 {
    x.iter().sum()
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "sum",
    code: include_str!("../../cuda/sum.cu"),
};

/// Blocks of the forward's first pass, each leaving one f64 partial (at most one block of the second pass).
#[cfg(feature = "cuda")]
const CUDA_PARTIALS: usize = 1024;

/// out[0] = (f32 of the f64 sum of x) · scale: 1 for sum, 1/n for mean.
#[cfg(feature = "cuda")]
pub fn sum_fwd_cuda(out: &mut GpuBuf, x: &GpuBuf, scale: f32) -> Result<()> {
    let n = x.len();
    let ctx = x.ctx().clone();
    let blocks = n
        .div_ceil(crate::gpu::BLOCK as usize)
        .clamp(1, CUDA_PARTIALS);
    // f64 partials, two f32 slots each (device allocations are 256-byte aligned).
    let partial = ctx.alloc(2 * blocks)?;
    ctx.launch(
        &CUDA,
        "sum_fwd_f32",
        (blocks as u32, 1, 1),
        (crate::gpu::BLOCK, 1, 1),
        0,
        &[partial.arg(), x.arg(), Arg::I64(n as i64)],
    )?;
    ctx.launch(
        &CUDA,
        "sum_fwd_total_f32",
        (1, 1, 1),
        (CUDA_PARTIALS as u32, 1, 1),
        0,
        &[
            out.arg(),
            partial.arg(),
            Arg::I32(blocks as i32),
            Arg::F32(scale),
        ],
    )
}

/// Every dx[i] = dout[0] · scale, dout read from the device scalar.
#[cfg(feature = "cuda")]
pub fn sum_bwd_cuda(dx: &mut GpuBuf, dout: &GpuBuf, scale: f32) -> Result<()> {
    let n = dx.len();
    dx.ctx().launch_1d(
        &CUDA,
        "sum_bwd_f32",
        n,
        &[dx.arg(), dout.arg(), Arg::F32(scale), Arg::I64(n as i64)],
    )
}

pub fn sum(tape: &mut Tape, x: Var) -> Result<Var> {
    reduce(tape, x, false)
}

pub fn mean(tape: &mut Tape, x: Var) -> Result<Var> {
    reduce(tape, x, true)
}

fn reduce(tape: &mut Tape, x: Var, mean: bool) -> Result<Var> {
    let op = if mean { "mean" } else { "sum" };
    let n = tape.value(x).numel();
    if n == 0 {
        return Err(Error::shape(op, "reduction over an empty tensor"));
    }
    let scale = if mean { 1.0 / n as f32 } else { 1.0 };
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of(op, &[tape.value(x)])? {
        let mut out = ctx.alloc(1)?;
        sum_fwd_cuda(&mut out, tape.value(x).gpu(op)?, scale)?;
        let out = Tensor::from_gpu(&[], out)?;
        return Ok(tape.push_op(out, &[x], Box::new(SumBackward { scale, op })));
    }
    let s = sum_fwd_cpu(tape.value(x).f32s(op)?);
    let out = tape.alloc_scalar(s * scale);
    Ok(tape.push_op(out, &[x], Box::new(SumBackward { scale, op })))
}

struct SumBackward {
    scale: f32,
    op: &'static str,
}

impl Backward for SumBackward {
    fn name(&self) -> &'static str {
        self.op
    }
    fn backward(
        &self,
        _: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            if let Some(dx) = &mut d[0] {
                sum_bwd_cuda(dx.gpu_mut("sum_bwd")?, dout.gpu("sum_bwd")?, self.scale)?;
            }
            return Ok(());
        }
        let g = dout.f32s("sum_bwd")?[0] * self.scale;
        if let Some(dx) = &mut d[0] {
            dx.f32s_mut("sum_bwd")?.fill(g);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;

    #[test]
    fn sum_and_mean_values_and_grads() {
        let mut rng = Rng::new(3);
        let x = rng.normal_vec(10_001, 1.0);
        let want = sum_fwd_ref(&crate::testing::to_f64(&x));
        let mut tape = Tape::new();
        let vx = tape.leaf(Tensor::from_vec(&[10_001], x.clone()).unwrap(), true);
        let m = mean(&mut tape, vx).unwrap();
        let got = tape.value(m).f32s("t").unwrap()[0] as f64;
        assert!(
            (got - want / 10_001.0).abs() < 1e-7,
            "mean {got} vs {}",
            want / 10_001.0
        );
        tape.backward(m).unwrap();
        assert!(tape
            .grad(vx)
            .unwrap()
            .f32s("t")
            .unwrap()
            .iter()
            .all(|&g| g == 1.0 / 10_001.0));
        let mut tape = Tape::new();
        let vx = tape.input(Tensor::zeros(&[0]));
        assert!(sum(&mut tape, vx).is_err());
    }
}
