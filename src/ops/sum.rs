//! sum and mean of all elements to a scalar. Backward: every input element gets dout (sum) or dout / n (mean).
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
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
    let s = sum_fwd_cpu(tape.value(x).f32s(op)?);
    let scale = if mean { 1.0 / n as f32 } else { 1.0 };
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
        let want: f64 = x.iter().map(|&v| v as f64).sum();
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
