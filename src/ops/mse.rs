//! mse: loss = mean((pred - target)²) over all elements, a scalar. Block-AP's loss, with pred the quantized
//! block's output and target the full-precision block's output (formats.md 1.2).
//!
//! Backward: dpred = 2 (pred - target) · dout / n, dtarget = -dpred; each written only where that input needs
//! a gradient (activation grads `=`, the tape does the `+=`, so mse(x, x) correctly gets zero).
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{opt_arg, Arg, GpuBuf, KernelSource};
use crate::ops::check_same;
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::f32x8;

/// Elements per f64 partial sum. Fixed, so the sum is the same whatever the thread count.
const CHUNK: usize = 4096;
/// Within a chunk, f32x8 lanes add BLOCK / 8 = 8 squares each before the block spills into the f64 sum,
/// which keeps f32 rounding to a few ulps of one block.
const BLOCK: usize = 64;

fn lanes(s: &[f32]) -> f32x8 {
    f32x8::new(s.try_into().expect("8 lanes"))
}

pub fn mse_fwd_ref(pred: &[f64], target: &[f64]) -> f64 {
    let s: f64 = pred
        .iter()
        .zip(target)
        .map(|(p, t)| (p - t) * (p - t))
        .sum();
    s / pred.len() as f64
}

pub fn mse_bwd_ref(
    dpred: Option<&mut [f64]>,
    dtarget: Option<&mut [f64]>,
    pred: &[f64],
    target: &[f64],
    dout: f64,
) {
    let g = 2.0 * dout / pred.len() as f64;
    if let Some(dp) = dpred {
        for ((d, p), t) in dp.iter_mut().zip(pred).zip(target) {
            *d = g * (p - t);
        }
    }
    if let Some(dt) = dtarget {
        for ((d, p), t) in dt.iter_mut().zip(pred).zip(target) {
            *d = -g * (p - t);
        }
    }
}

/// Sum of squared differences of one chunk: f32x8 per block of 64, blocks added in f64.
fn sum_sq_diff(pred: &[f32], target: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for (p, t) in pred.chunks(BLOCK).zip(target.chunks(BLOCK)) {
        let n8 = p.len() / 8 * 8;
        let mut acc = f32x8::ZERO;
        for (p, t) in p[..n8].chunks_exact(8).zip(t[..n8].chunks_exact(8)) {
            let d = lanes(p) - lanes(t);
            acc = d.mul_add(d, acc);
        }
        let mut s = acc.reduce_add() as f64;
        for (p, t) in p[n8..].iter().zip(&t[n8..]) {
            let d = (p - t) as f64;
            s += d * d;
        }
        total += s;
    }
    total
}

/// mean((pred - target)²), accumulated in f64 over fixed chunks (deterministic). `pred` must not be empty.
pub fn mse_fwd_cpu(pred: &[f32], target: &[f32]) -> f64 {
    let partial: Vec<f64> = pred
        .par_chunks(CHUNK)
        .zip(target.par_chunks(CHUNK))
        .map(|(p, t)| sum_sq_diff(p, t))
        .collect();
    partial.iter().sum::<f64>() / pred.len() as f64
}

pub fn mse_bwd_cpu(
    dpred: Option<&mut [f32]>,
    dtarget: Option<&mut [f32]>,
    pred: &[f32],
    target: &[f32],
    dout: f32,
) {
    let g = (2.0 * dout as f64 / pred.len() as f64) as f32;
    // d = g (p - t) with sign `sign`, eight lanes at a time.
    let write = |d: &mut [f32], sign: f32| {
        let gv = f32x8::splat(sign * g);
        d.par_chunks_mut(CHUNK)
            .zip(pred.par_chunks(CHUNK).zip(target.par_chunks(CHUNK)))
            .for_each(|(d, (p, t))| {
                let n8 = d.len() / 8 * 8;
                for ((d, p), t) in d[..n8]
                    .chunks_exact_mut(8)
                    .zip(p[..n8].chunks_exact(8))
                    .zip(t[..n8].chunks_exact(8))
                {
                    d.copy_from_slice(((lanes(p) - lanes(t)) * gv).as_array_ref());
                }
                for ((d, p), t) in d[n8..].iter_mut().zip(&p[n8..]).zip(&t[n8..]) {
                    *d = (p - t) * (sign * g);
                }
            });
    };
    if let Some(dp) = dpred {
        write(dp, 1.0);
    }
    if let Some(dt) = dtarget {
        write(dt, -1.0);
    }
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "mse",
    code: include_str!("../../cuda/mse.cu"),
};

/// Blocks of the forward's first pass, each leaving one f64 partial sum (at most one block of the second pass).
#[cfg(feature = "cuda")]
const CUDA_PARTIALS: usize = 1024;

/// loss[0] = mean((pred - target)²), summed in f64 in a fixed order (deterministic). `pred` must not be empty.
#[cfg(feature = "cuda")]
pub fn mse_fwd_cuda(loss: &mut GpuBuf, pred: &GpuBuf, target: &GpuBuf) -> Result<()> {
    mse_fwd_cuda_into(loss, (None, None), pred, target)
}

/// `mse_fwd_cuda`, also writing `mse_bwd_cuda`'s dpred for dout = 1 into `dpred_root` when given, and its bf16
/// rounding into `dpred_root_b` when given.
#[cfg(feature = "cuda")]
fn mse_fwd_cuda_into(
    loss: &mut GpuBuf,
    (dpred_root, dpred_root_b): (Option<&mut GpuBuf>, Option<&mut crate::gpu::Bf16Buf>),
    pred: &GpuBuf,
    target: &GpuBuf,
) -> Result<()> {
    let n = pred.len();
    let ctx = pred.ctx().clone();
    let blocks = n.div_ceil(crate::gpu::BLOCK as usize).min(CUDA_PARTIALS);
    // f64 partials, two f32 slots each (device allocations are 256-byte aligned).
    let partial = ctx.alloc(2 * blocks)?;
    let n64 = Arg::I64(n as i64);
    let block = (crate::gpu::BLOCK, 1, 1);
    ctx.launch(
        &CUDA,
        "mse_fwd_f32",
        (blocks as u32, 1, 1),
        block,
        0,
        &[
            partial.arg(),
            opt_arg(&dpred_root),
            dpred_root_b.map_or(Arg::NULL, |b| b.arg()),
            pred.arg(),
            target.arg(),
            n64,
        ],
    )?;
    ctx.launch(
        &CUDA,
        "mse_fwd_sum_f32",
        (1, 1, 1),
        (CUDA_PARTIALS as u32, 1, 1),
        0,
        &[loss.arg(), partial.arg(), Arg::I32(blocks as i32), n64],
    )
}

/// dpred = 2 (pred - target) dout / n and dtarget = its negative, dout read from the device scalar.
#[cfg(feature = "cuda")]
pub fn mse_bwd_cuda(
    dpred: Option<&mut GpuBuf>,
    dtarget: Option<&mut GpuBuf>,
    pred: &GpuBuf,
    target: &GpuBuf,
    dout: &GpuBuf,
) -> Result<()> {
    let n = pred.len();
    pred.ctx().launch_1d(
        &CUDA,
        "mse_bwd_f32",
        n,
        &[
            opt_arg(&dpred),
            opt_arg(&dtarget),
            pred.arg(),
            target.arg(),
            dout.arg(),
            Arg::I64(n as i64),
        ],
    )
}

pub fn mse(tape: &mut Tape, pred: Var, target: Var) -> Result<Var> {
    mse_with(tape, pred, target, false)
}

/// `mse` as the loss `backward` starts from: on the GPU, when only `pred` needs a gradient, the forward also
/// writes that gradient (dout = 1), and the backward hands it over (`Backward::root_grads`) instead of reading
/// pred and target again. Used as anything but the loss, the value is the same and the gradient is computed as
/// `mse`'s, the early one unused.
pub fn mse_loss(tape: &mut Tape, pred: Var, target: Var) -> Result<Var> {
    mse_with(tape, pred, target, true)
}

fn mse_with(tape: &mut Tape, pred: Var, target: Var, as_loss: bool) -> Result<Var> {
    let (sp, st) = (tape.value(pred).shape(), tape.value(target).shape());
    check_same("mse", sp, st)?;
    if sp.iter().product::<usize>() == 0 {
        return Err(Error::shape(
            "mse",
            format!("empty tensors {sp:?}: the mean is undefined"),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("mse", &[tape.value(pred), tape.value(target)])? {
        let mut loss = ctx.alloc(1)?;
        let early = as_loss && tape.needs_grad(&[pred]) && !tape.needs_grad(&[target]);
        let mut dpred = early
            .then(|| ctx.alloc(tape.value(pred).numel()))
            .transpose()?;
        let mut twin = (early && tape.wants_bf16_twin(pred))
            .then(|| ctx.alloc_bf16(tape.value(pred).numel()))
            .transpose()?;
        mse_fwd_cuda_into(
            &mut loss,
            (dpred.as_mut(), twin.as_mut()),
            tape.value(pred).gpu("mse")?,
            tape.value(target).gpu("mse")?,
        )?;
        let loss = Tensor::from_gpu(&[], loss)?;
        let root = dpred
            .map(|d| Tensor::from_gpu(tape.value(pred).shape(), d))
            .transpose()?;
        let backward = MseBackward {
            root: std::sync::Mutex::new(root),
            twin: std::sync::Mutex::new(twin),
        };
        return Ok(tape.push_op(loss, &[pred, target], Box::new(backward)));
    }
    // (The host path has no early gradient: its backward is cheap next to the block's.)
    let _ = as_loss;
    let loss = mse_fwd_cpu(
        tape.value(pred).f32s("mse")?,
        tape.value(target).f32s("mse")?,
    );
    let out = tape.alloc_scalar(loss as f32);
    let backward = MseBackward {
        root: std::sync::Mutex::new(None),
        #[cfg(feature = "cuda")]
        twin: std::sync::Mutex::new(None),
    };
    Ok(tape.push_op(out, &[pred, target], Box::new(backward)))
}

struct MseBackward {
    /// dpred for dout = 1, written by `mse_loss`'s forward; taken by `root_grads`.
    root: std::sync::Mutex<Option<Tensor>>,
    /// Its bf16 twin, where the tape asked for one; handed on once `root_grads` has handed dpred over.
    #[cfg(feature = "cuda")]
    twin: std::sync::Mutex<Option<crate::gpu::Bf16Buf>>,
}

impl Backward for MseBackward {
    fn name(&self) -> &'static str {
        "mse"
    }
    fn root_grads(&self, d: &mut [Option<Tensor>]) -> Result<bool> {
        let mut root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        if d[1].is_some() || root.is_none() {
            return Ok(false);
        }
        d[0] = root.take();
        Ok(true)
    }
    #[cfg(feature = "cuda")]
    fn take_bf16_twin(&self, i: usize) -> Option<crate::gpu::Bf16Buf> {
        // Only the twin of the gradient `root_grads` handed over (a backward run as usual writes no twin).
        let handed_over = self
            .root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        match (i, handed_over) {
            (0, true) => self.twin.lock().unwrap_or_else(|e| e.into_inner()).take(),
            _ => None,
        }
    }
    /// Every kernel and GEMM of this backward writes each element of the gradients it is given.
    fn overwrites_dinputs(&self) -> bool {
        true
    }
    fn backward(
        &self,
        x: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            let op = "mse_bwd";
            let (dp, dt) = d.split_at_mut(1);
            return mse_bwd_cuda(
                dp[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dt[0].as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                x[0].gpu(op)?,
                x[1].gpu(op)?,
                dout.gpu(op)?,
            );
        }
        let (pred, target) = (x[0].f32s("mse_bwd")?, x[1].f32s("mse_bwd")?);
        let dout = dout.f32s("mse_bwd")?[0];
        let (dp, dt) = d.split_at_mut(1);
        let dp = match &mut dp[0] {
            Some(t) => Some(t.f32s_mut("mse_bwd")?),
            None => None,
        };
        let dt = match &mut dt[0] {
            Some(t) => Some(t.f32s_mut("mse_bwd")?),
            None => None,
        };
        mse_bwd_cpu(dp, dt, pred, target, dout);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    /// Forward, relative, compared in f64: f32 differences and squares summed 8 per lane per block of 64 before
    /// f64 accumulation: a few ulps (~1e-7) of the sum.
    const FWD_TOL: f64 = 1e-6;
    /// Backward: one f32 subtraction and one multiply per element.
    const BWD_TOL: f64 = 1e-6;

    #[test]
    fn mse_cpu_matches_ref_forward_and_backward() {
        let mut rng = Rng::new(51);
        // 9_001 spans three chunks with a ragged last block; 1, 7 and 13 are shorter than one f32x8 block.
        for n in [1, 7, 13, 64, 9_001] {
            let p = rng.normal_vec(n, 1.0);
            let t = rng.normal_vec(n, 1.0);
            let (p64, t64) = (to_f64(&p), to_f64(&t));
            let got = mse_fwd_cpu(&p, &t);
            assert_close_f64("mse fwd", &[got], &[mse_fwd_ref(&p64, &t64)], 0.0, FWD_TOL);

            let dout = 0.37;
            let (mut dp, mut dt) = (vec![0.0; n], vec![0.0; n]);
            mse_bwd_cpu(Some(&mut dp), Some(&mut dt), &p, &t, dout as f32);
            let (mut dp_ref, mut dt_ref) = (vec![0.0; n], vec![0.0; n]);
            mse_bwd_ref(Some(&mut dp_ref), Some(&mut dt_ref), &p64, &t64, dout);
            assert_close("mse dpred", &dp, &dp_ref, BWD_TOL, BWD_TOL);
            assert_close("mse dtarget", &dt, &dt_ref, BWD_TOL, BWD_TOL);
        }
    }

    #[test]
    fn mse_ref_backward_matches_finite_differences() {
        let mut rng = Rng::new(52);
        for n in [1, 7, 13] {
            let p = to_f64(&rng.normal_vec(n, 1.0));
            let t = to_f64(&rng.normal_vec(n, 1.0));
            let dout = -1.3;
            let (mut dp, mut dt) = (vec![0.0; n], vec![0.0; n]);
            mse_bwd_ref(Some(&mut dp), Some(&mut dt), &p, &t, dout);
            let fd_p = finite_diff(&p, 1e-5, |p| dout * mse_fwd_ref(p, &t));
            let fd_t = finite_diff(&t, 1e-5, |t| dout * mse_fwd_ref(&p, t));
            // Quadratic: central differences are exact up to rounding (~1e-11 at h = 1e-5).
            assert_close_f64("mse dpred ref vs fd", &dp, &fd_p, 1e-8, 1e-8);
            assert_close_f64("mse dtarget ref vs fd", &dt, &fd_t, 1e-8, 1e-8);
        }
    }

    #[test]
    fn mse_sum_does_not_depend_on_the_thread_count() {
        let mut rng = Rng::new(53);
        let p = rng.normal_vec(100_003, 1.0);
        let t = rng.normal_vec(100_003, 1.0);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let a = one.install(|| mse_fwd_cpu(&p, &t));
        let b = three.install(|| mse_fwd_cpu(&p, &t));
        assert_eq!(a.to_bits(), b.to_bits());
    }

    #[test]
    fn mse_on_the_tape_grads_whichever_input_needs_one() {
        let mut rng = Rng::new(54);
        let shape = [2, 3, 11];
        let p = rng.normal_vec(66, 1.0);
        let t = rng.normal_vec(66, 1.0);
        let (p64, t64) = (to_f64(&p), to_f64(&t));
        let c = 0.37f32;
        for (p_grad, t_grad) in [(true, false), (false, true), (true, true)] {
            let mut tape = Tape::new();
            let vp = tape.leaf(Tensor::from_vec(&shape, p.clone()).unwrap(), p_grad);
            let vt = tape.leaf(Tensor::from_vec(&shape, t.clone()).unwrap(), t_grad);
            let loss = mse(&mut tape, vp, vt).unwrap();
            let got = tape.value(loss).f32s("t").unwrap()[0];
            assert_eq!(got, mse_fwd_cpu(&p, &t) as f32);
            // Scale the loss so that dout != 1 reaches the backward.
            let scaled = crate::ops::scale::scale(&mut tape, loss, c).unwrap();
            tape.backward(scaled).unwrap();
            let (mut dp_ref, mut dt_ref) = (vec![0.0; 66], vec![0.0; 66]);
            mse_bwd_ref(Some(&mut dp_ref), Some(&mut dt_ref), &p64, &t64, c as f64);
            assert_eq!(tape.grad(vp).is_some(), p_grad);
            assert_eq!(tape.grad(vt).is_some(), t_grad);
            if let Some(g) = tape.grad(vp) {
                assert_close(
                    "mse tape dpred",
                    g.f32s("t").unwrap(),
                    &dp_ref,
                    BWD_TOL,
                    BWD_TOL,
                );
            }
            if let Some(g) = tape.grad(vt) {
                assert_close(
                    "mse tape dtarget",
                    g.f32s("t").unwrap(),
                    &dt_ref,
                    BWD_TOL,
                    BWD_TOL,
                );
            }
        }
        // The same var on both sides: the two contributions cancel.
        let mut tape = Tape::new();
        let vp = tape.leaf(Tensor::from_vec(&shape, p.clone()).unwrap(), true);
        let loss = mse(&mut tape, vp, vp).unwrap();
        assert_eq!(tape.value(loss).f32s("t").unwrap()[0], 0.0);
        tape.backward(loss).unwrap();
        assert!(tape
            .grad(vp)
            .unwrap()
            .f32s("t")
            .unwrap()
            .iter()
            .all(|&g| g == 0.0));
    }

    #[test]
    fn mse_rejects_mismatched_or_empty_shapes() {
        let mut tape = Tape::new();
        let a = tape.input(Tensor::zeros(&[2, 3]));
        let b = tape.input(Tensor::zeros(&[3, 2]));
        let err = mse(&mut tape, a, b).unwrap_err().to_string();
        assert!(
            err.contains("mse") && err.contains("[2, 3]") && err.contains("[3, 2]"),
            "{err}"
        );
        let e = tape.input(Tensor::zeros(&[0, 4]));
        let err = mse(&mut tape, e, e).unwrap_err().to_string();
        assert!(err.contains("mse") && err.contains("[0, 4]"), "{err}");
    }
}
