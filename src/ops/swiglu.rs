//! swiglu: y = silu(gate) * up, elementwise over two tensors of one shape (the Llama MLP's
//! `act(gate_proj(x)) * up_proj(x)`), fused so that the [.., F] intermediate silu(gate) is never stored.
//!
//! Backward, with s = sigmoid(gate): dgate = dy * up * s * (1 + gate * (1 - s)); dup = dy * gate * s.
//! Both come out of one pass that recomputes s. Activation gradients are written (`=`); the tape accumulates.
//! On a GPU, bf16 gate and up (the bf16 mode's MLP, `fake_quant_linear_bf16_out`) give a bf16 output and bf16
//! gradients, as torch.autocast keeps them: the same f32 math, each output rounded once.
use crate::autograd::{Backward, Tape, Var};
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::gpu::{opt_arg, Arg, Bf16Buf, GpuBuf, KernelSource};
use crate::ops::silu::sigmoid64;
use crate::ops::silu::{sigmoid, sigmoid8, CHUNK};
use crate::ops::{check_same, simd};
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::f32x8;

pub fn swiglu_fwd_ref(out: &mut [f64], gate: &[f64], up: &[f64]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid64(g) * u;
    }
}

pub fn swiglu_bwd_ref(
    dgate: Option<&mut [f64]>,
    dup: Option<&mut [f64]>,
    dout: &[f64],
    gate: &[f64],
    up: &[f64],
) {
    if let Some(dg) = dgate {
        for i in 0..dg.len() {
            let s = sigmoid64(gate[i]);
            dg[i] = dout[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
        }
    }
    if let Some(du) = dup {
        for i in 0..du.len() {
            du[i] = dout[i] * gate[i] * sigmoid64(gate[i]);
        }
    }
}

pub fn swiglu_fwd_cpu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            let n = o.len() / 8 * 8;
            for ((o, g), u) in o[..n]
                .chunks_exact_mut(8)
                .zip(g[..n].chunks_exact(8))
                .zip(u[..n].chunks_exact(8))
            {
                let g = simd::load(g);
                o.copy_from_slice((g * sigmoid8(g) * simd::load(u)).as_array_ref());
            }
            for ((o, &g), &u) in o[n..].iter_mut().zip(&g[n..]).zip(&u[n..]) {
                *o = g * sigmoid(g) * u;
            }
        });
}

/// Splits an optional gradient buffer into the same CHUNK pieces as the inputs, so that one parallel pass
/// can write whichever of dgate/dup is wanted.
fn chunks_or_none(d: Option<&mut [f32]>, n: usize) -> Vec<Option<&mut [f32]>> {
    match d {
        Some(d) => d.chunks_mut(CHUNK).map(Some).collect(),
        None => (0..n.div_ceil(CHUNK)).map(|_| None).collect(),
    }
}

pub fn swiglu_bwd_cpu(
    dgate: Option<&mut [f32]>,
    dup: Option<&mut [f32]>,
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
) {
    let n = dout.len();
    chunks_or_none(dgate, n)
        .into_par_iter()
        .zip(chunks_or_none(dup, n))
        .zip(dout.par_chunks(CHUNK).zip(gate.par_chunks(CHUNK)))
        .zip(up.par_chunks(CHUNK))
        .for_each(|(((mut dg, mut du), (dy, g)), u)| {
            let m = dy.len() / 8 * 8;
            for i in (0..m).step_by(8) {
                let (dyv, gv, uv) = (
                    simd::load(&dy[i..]),
                    simd::load(&g[i..]),
                    simd::load(&u[i..]),
                );
                let s = sigmoid8(gv);
                if let Some(dg) = dg.as_deref_mut() {
                    let r = dyv * uv * s * gv.mul_add(f32x8::ONE - s, f32x8::ONE);
                    dg[i..i + 8].copy_from_slice(r.as_array_ref());
                }
                if let Some(du) = du.as_deref_mut() {
                    du[i..i + 8].copy_from_slice((dyv * gv * s).as_array_ref());
                }
            }
            for i in m..dy.len() {
                let s = sigmoid(g[i]);
                if let Some(dg) = dg.as_deref_mut() {
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
                if let Some(du) = du.as_deref_mut() {
                    du[i] = dy[i] * g[i] * s;
                }
            }
        });
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "swiglu",
    code: include_str!("../../cuda/swiglu.cu"),
};

#[cfg(feature = "cuda")]
pub fn swiglu_fwd_cuda(out: &mut GpuBuf, gate: &GpuBuf, up: &GpuBuf) -> Result<()> {
    swiglu_fwd_cuda_into(out, None, gate, up)
}

/// `swiglu_fwd_cuda`, also writing bf16(out) into `out_b` when given (the bf16 mode's GEMM operand).
#[cfg(feature = "cuda")]
fn swiglu_fwd_cuda_into(
    out: &mut GpuBuf,
    out_b: Option<&mut Bf16Buf>,
    gate: &GpuBuf,
    up: &GpuBuf,
) -> Result<()> {
    let n = out.len();
    let out_b = out_b.map_or(Arg::NULL, |b| b.arg());
    out.ctx().launch_1d(
        &CUDA,
        "swiglu_fwd_f32",
        n,
        &[out.arg(), out_b, gate.arg(), up.arg(), Arg::I64(n as i64)],
    )
}

/// out = swiglu(gate, up) with every buffer bf16 (the bf16 mode's MLP; f32 math, outputs rounded to nearest even).
#[cfg(feature = "cuda")]
pub fn swiglu_fwd_bf16_cuda(out: &mut Bf16Buf, gate: &Bf16Buf, up: &Bf16Buf) -> Result<()> {
    let n = out.len();
    check_bf16_lens("swiglu_fwd_bf16", n, &[gate.len(), up.len()])?;
    out.ctx().launch_1d(
        &CUDA,
        "swiglu_fwd_bf16",
        n.div_ceil(8),
        &[out.arg(), gate.arg(), up.arg(), Arg::I64(n as i64)],
    )
}

/// [`swiglu_bwd_cuda`] with every buffer bf16.
#[cfg(feature = "cuda")]
pub fn swiglu_bwd_bf16_cuda(
    dgate: Option<&mut Bf16Buf>,
    dup: Option<&mut Bf16Buf>,
    dout: &Bf16Buf,
    gate: &Bf16Buf,
    up: &Bf16Buf,
) -> Result<()> {
    let n = dout.len();
    let lens: Vec<usize> = [
        dgate.as_ref().map(|b| b.len()),
        dup.as_ref().map(|b| b.len()),
    ]
    .into_iter()
    .flatten()
    .chain([gate.len(), up.len()])
    .collect();
    check_bf16_lens("swiglu_bwd_bf16", n, &lens)?;
    let arg = |b: Option<&mut Bf16Buf>| b.map_or(Arg::NULL, |b| b.arg());
    dout.ctx().launch_1d(
        &CUDA,
        "swiglu_bwd_bf16",
        n.div_ceil(8),
        &[
            arg(dgate),
            arg(dup),
            dout.arg(),
            gate.arg(),
            up.arg(),
            Arg::I64(n as i64),
        ],
    )
}

#[cfg(feature = "cuda")]
fn check_bf16_lens(op: &'static str, n: usize, lens: &[usize]) -> Result<()> {
    match lens.iter().all(|&l| l == n) {
        true => Ok(()),
        false => Err(crate::error::Error::shape(
            op,
            format!("buffers of {lens:?} values, expected {n}"),
        )),
    }
}

/// Writes whichever of dgate and dup is given, in one pass.
#[cfg(feature = "cuda")]
pub fn swiglu_bwd_cuda(
    dgate: Option<&mut GpuBuf>,
    dup: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    gate: &GpuBuf,
    up: &GpuBuf,
) -> Result<()> {
    let n = dout.len();
    dout.ctx().launch_1d(
        &CUDA,
        "swiglu_bwd_f32",
        n,
        &[
            opt_arg(&dgate),
            opt_arg(&dup),
            dout.arg(),
            gate.arg(),
            up.arg(),
            Arg::I64(n as i64),
        ],
    )
}

pub fn swiglu(tape: &mut Tape, gate: Var, up: Var) -> Result<Var> {
    let shape = tape.value(gate).shape().to_vec();
    check_same("swiglu", &shape, tape.value(up).shape())?;
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("swiglu", &[tape.value(gate), tape.value(up)])? {
        let n = tape.value(gate).numel();
        // bf16 gate and up (the bf16 mode's MLP): a bf16 output, the down projection's operand as it is.
        if tape.value(gate).dtype() == crate::tensor::DType::BF16 {
            let mut out = ctx.alloc_bf16(n)?;
            let op = "swiglu";
            swiglu_fwd_bf16_cuda(
                &mut out,
                tape.value(gate).gpu_bf16(op)?,
                tape.value(up).gpu_bf16(op)?,
            )?;
            let out = Tensor::from_gpu_bf16(&shape, out)?;
            return Ok(tape.push_op(out, &[gate, up], Box::new(SwigluBackward)));
        }
        let mut out = ctx.alloc(n)?;
        // In the bf16 mode the output is a GEMM operand next: write its bf16 copy in the same pass.
        let mut out_b = ctx.matmul_bf16().then(|| ctx.alloc_bf16(n)).transpose()?;
        swiglu_fwd_cuda_into(
            &mut out,
            out_b.as_mut(),
            tape.value(gate).gpu("swiglu")?,
            tape.value(up).gpu("swiglu")?,
        )?;
        let out = Tensor::from_gpu(&shape, out)?;
        let y = tape.push_op(out, &[gate, up], Box::new(SwigluBackward));
        if let Some(b) = out_b {
            tape.set_bf16_copy(y, b);
        }
        return Ok(y);
    }
    let mut out = tape.alloc(&shape);
    swiglu_fwd_cpu(
        out.f32s_mut("swiglu")?,
        tape.value(gate).f32s("swiglu")?,
        tape.value(up).f32s("swiglu")?,
    );
    Ok(tape.push_op(out, &[gate, up], Box::new(SwigluBackward)))
}

struct SwigluBackward;

impl Backward for SwigluBackward {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    /// Every kernel and GEMM of this backward writes each element of the gradients it is given.
    fn overwrites_dinputs(&self) -> bool {
        true
    }
    fn backward(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        let (dgate, dup) = d.split_at_mut(1);
        #[cfg(feature = "cuda")]
        if dout.dtype() == crate::tensor::DType::BF16 {
            let op = "swiglu_bwd";
            return swiglu_bwd_bf16_cuda(
                dgate[0].as_mut().map(|t| t.gpu_bf16_mut(op)).transpose()?,
                dup[0].as_mut().map(|t| t.gpu_bf16_mut(op)).transpose()?,
                dout.gpu_bf16(op)?,
                inputs[0].gpu_bf16(op)?,
                inputs[1].gpu_bf16(op)?,
            );
        }
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            let op = "swiglu_bwd";
            return swiglu_bwd_cuda(
                dgate[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dup[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dout.gpu(op)?,
                inputs[0].gpu(op)?,
                inputs[1].gpu(op)?,
            );
        }
        swiglu_bwd_cpu(
            dgate[0]
                .as_mut()
                .map(|t| t.f32s_mut("swiglu_bwd"))
                .transpose()?,
            dup[0]
                .as_mut()
                .map(|t| t.f32s_mut("swiglu_bwd"))
                .transpose()?,
            dout.f32s("swiglu_bwd")?,
            inputs[0].f32s("swiglu_bwd")?,
            inputs[1].f32s("swiglu_bwd")?,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{mul::mul, sum::sum};
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    // f32 vs f64: a few ulp from exp, the division and two products; gate std 4 reaches both tails.
    const FWD_ATOL: f64 = 1e-6;
    const FWD_RTOL: f64 = 2e-6;
    const BWD_ATOL: f64 = 1e-6;
    const BWD_RTOL: f64 = 1e-5;

    #[test]
    fn swiglu_cpu_matches_ref_forward_and_backward() {
        let mut rng = Rng::new(31);
        // CHUNK + 5 spans two rayon chunks and ends in a 5-element scalar tail.
        for n in [1, 7, 13, 33, 1536, CHUNK + 5] {
            let mut gate = rng.normal_vec(n, 4.0);
            gate[0] = -150.0;
            let up = rng.normal_vec(n, 1.0);
            let dout = rng.normal_vec(n, 1.0);
            let (gate64, up64, dy64) = (to_f64(&gate), to_f64(&up), to_f64(&dout));
            let mut y = vec![0.0; n];
            swiglu_fwd_cpu(&mut y, &gate, &up);
            let mut want = vec![0.0; n];
            swiglu_fwd_ref(&mut want, &gate64, &up64);
            assert_close(&format!("swiglu fwd n={n}"), &y, &want, FWD_ATOL, FWD_RTOL);

            let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
            swiglu_bwd_cpu(Some(&mut dg), Some(&mut du), &dout, &gate, &up);
            let (mut wg, mut wu) = (vec![0.0; n], vec![0.0; n]);
            swiglu_bwd_ref(Some(&mut wg), Some(&mut wu), &dy64, &gate64, &up64);
            assert_close(&format!("swiglu dgate n={n}"), &dg, &wg, BWD_ATOL, BWD_RTOL);
            assert_close(&format!("swiglu dup n={n}"), &du, &wu, BWD_ATOL, BWD_RTOL);

            // One gradient alone must equal the same gradient from the fused pass.
            let mut dg_only = vec![0.0; n];
            swiglu_bwd_cpu(Some(&mut dg_only), None, &dout, &gate, &up);
            assert_eq!(dg_only, dg, "dgate alone n={n}");
            let mut du_only = vec![0.0; n];
            swiglu_bwd_cpu(None, Some(&mut du_only), &dout, &gate, &up);
            assert_eq!(du_only, du, "dup alone n={n}");
        }
    }

    #[test]
    fn swiglu_bwd_ref_matches_finite_differences() {
        let mut rng = Rng::new(32);
        let n = 37;
        let gate = to_f64(&rng.normal_vec(n, 3.0));
        let up = to_f64(&rng.normal_vec(n, 1.0));
        let r = to_f64(&rng.normal_vec(n, 1.0));
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_bwd_ref(Some(&mut dg), Some(&mut du), &r, &gate, &up);
        let loss = |g: &[f64], u: &[f64]| {
            let mut y = vec![0.0; n];
            swiglu_fwd_ref(&mut y, g, u);
            dot64(&y, &r)
        };
        let fd_g = finite_diff(&gate, 1e-5, |g| loss(g, &up));
        let fd_u = finite_diff(&up, 1e-5, |u| loss(&gate, u));
        // Central differences: truncation O(h^2) ~ 1e-10, rounding ~ 1e-11; linear in up, so exact there.
        assert_close_f64("swiglu dgate vs fd", &dg, &fd_g, 1e-8, 1e-7);
        assert_close_f64("swiglu dup vs fd", &du, &fd_u, 1e-8, 1e-7);
    }

    #[test]
    fn swiglu_on_tape_matches_cpu_kernels() {
        let mut rng = Rng::new(33);
        let shape = [2, 3, 19];
        let n = 114;
        let (gate, up, r) = (
            rng.normal_vec(n, 3.0),
            rng.normal_vec(n, 1.0),
            rng.normal_vec(n, 1.0),
        );
        let mut tape = Tape::new();
        let vg = tape.leaf(Tensor::from_vec(&shape, gate.clone()).unwrap(), true);
        let vu = tape.leaf(Tensor::from_vec(&shape, up.clone()).unwrap(), true);
        let y = swiglu(&mut tape, vg, vu).unwrap();
        let mut want = vec![0.0; n];
        swiglu_fwd_cpu(&mut want, &gate, &up);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
        let vr = tape.input(Tensor::from_vec(&shape, r.clone()).unwrap());
        let p = mul(&mut tape, y, vr).unwrap();
        let loss = sum(&mut tape, p).unwrap();
        tape.backward(loss).unwrap();
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_bwd_cpu(Some(&mut dg), Some(&mut du), &r, &gate, &up);
        assert_eq!(tape.grad(vg).unwrap().f32s("t").unwrap(), &dg[..]);
        assert_eq!(tape.grad(vu).unwrap().f32s("t").unwrap(), &du[..]);
    }

    #[test]
    fn swiglu_rejects_mismatched_shapes() {
        let mut tape = Tape::new();
        let g = tape.input(Tensor::zeros(&[2, 6]));
        let u = tape.input(Tensor::zeros(&[2, 5]));
        let err = swiglu(&mut tape, g, u).unwrap_err().to_string();
        assert!(
            err.contains("swiglu") && err.contains("[2, 6]") && err.contains("[2, 5]"),
            "{err}"
        );
    }
}
