//! AdamW's fused step for fake-quantized weights in the GPU's bf16 mode (`fake_quant_adamw_f32` in
//! `cuda/fake_quant.cu`). Block-AP's step otherwise runs three memory-bound kernels over every weight after the dŵ GEMM:
//! fake-quant's backward (dŵ, w → dw, and the groups' ds, dz), AdamW (w, m, v, dw → w, m, v; scales and zeros the
//! same) and, in the next forward, fake-quant's forward (w → ŵ_b). The fused kernel does all three in one pass
//! (28 bytes per weight instead of 48) with the same arithmetic in the same order, so the trained values are
//! bit-identical. dŵ arrives in bf16 (the dŵ GEMM's output), kept by the tape apart from its gradient slots, and
//! the tape keeps the new ŵ_b between steps (`Tape::defer_fake_quant`).
//! The CPU twin is the composition it replaces: `fake_quant_bwd_cpu`, `adamw_update_cpu` on w, scales and zeros,
//! then `fake_quant_fwd_cpu` rounded to bf16 (tests/cuda_block_ap.rs compares them).
use super::cuda::{moments_of, Moments};
use super::{AdamW, AdamWCoefs};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::gpu::{Arg, Bf16Buf, GpuBuf};
use crate::quant::fake_quant::QuantConfig;
use crate::tensor::Tensor;

const OP: &str = "AdamW::fuse_fake_quant";

/// A weight the fused step updates, with its quantizer parameters.
#[derive(Clone, Copy, Debug)]
pub(super) struct FusedWeight {
    w: Var,
    scales: Var,
    zeros: Var,
    /// (group, index in `state.params`) of w, scales and zeros, fixed once the optimizer is built.
    at: [(usize, usize); 3],
    g: usize,
    qmax: f32,
}

impl FusedWeight {
    pub(super) fn vars(&self) -> [Var; 3] {
        [self.w, self.scales, self.zeros]
    }
}

/// One fused step over weight `w` [n, k] (groups of g) with the bf16 gradient of its fake-quantized value `dwq`, the
/// scales and zeros [n, k/g], all moments, and coefficients `cw` (weight) and `cq` (scales and zeros); writes the
/// next forward's ŵ to `wq` in bf16.
#[allow(clippy::too_many_arguments)]
pub fn adamw_fake_quant_cuda(
    w: &mut GpuBuf,
    wm: (&mut GpuBuf, &mut GpuBuf),
    dwq: &Bf16Buf,
    scales: &mut GpuBuf,
    sm: (&mut GpuBuf, &mut GpuBuf),
    zeros: &mut GpuBuf,
    zm: (&mut GpuBuf, &mut GpuBuf),
    wq: &mut Bf16Buf,
    (g, qmax): (usize, f32),
    cw: &AdamWCoefs,
    cq: &AdamWCoefs,
) -> Result<()> {
    let n_groups = scales.len();
    let lens = [w.len(), wm.0.len(), wm.1.len(), dwq.len(), wq.len()];
    let group_lens = [sm.0.len(), sm.1.len(), zeros.len(), zm.0.len(), zm.1.len()];
    if g == 0
        || lens.iter().any(|&l| l != n_groups * g)
        || group_lens.iter().any(|&l| l != n_groups)
    {
        return Err(Error::shape(
            "adamw_fake_quant",
            format!("{n_groups} groups of {g}: buffers of {lens:?} weights and {group_lens:?} group values"),
        ));
    }
    let ctx = w.ctx().clone();
    let args: Vec<Arg> = [
        w.arg(),
        wm.0.arg(),
        wm.1.arg(),
        dwq.arg(),
        scales.arg(),
        sm.0.arg(),
        sm.1.arg(),
        zeros.arg(),
        zm.0.arg(),
        zm.1.arg(),
        wq.arg(),
        Arg::I64(n_groups as i64),
        Arg::I64(g as i64),
        Arg::F32(qmax),
    ]
    .into_iter()
    .chain(cw.kernel_args())
    .chain(cq.kernel_args())
    .collect();
    let threads = crate::quant::fake_quant::group_threads(n_groups, g);
    // g = 64, the recipe's, has a software-pipelined kernel of its own (cuda/fake_quant.cu).
    let kernel = match g {
        64 => "fake_quant_adamw_g64_f32",
        _ => "fake_quant_adamw_f32",
    };
    ctx.launch_1d(&crate::quant::fake_quant::CUDA, kernel, threads, &args)
}

/// The device moments of a parameter about to take a fused step.
fn device_moments<'a>(
    slot: &'a mut Option<Moments>,
    p: &GpuBuf,
    st: &super::ParamState,
) -> Result<(&'a mut GpuBuf, &'a mut GpuBuf)> {
    match moments_of(slot, false, p.ctx(), p.len(), st)? {
        Moments::Device(d) => Ok((&mut d.m, &mut d.v)),
        Moments::Pinned { .. } => Err(Error::invalid(
            OP,
            "the fused step needs its moments in GPU memory, not pinned host memory",
        )),
    }
}

impl AdamW {
    /// Updates `w` [n, k] and its `scales` and `zeros` [n, k/g] with the fused kernel from now on, and makes `tape`
    /// keep dŵ as w's gradient (module docs). w must be in one group and scales and zeros together in another or
    /// the same, all on a GPU in the bf16 mode, with moments in GPU memory.
    pub fn fuse_fake_quant(
        &mut self,
        tape: &mut Tape,
        w: Var,
        scales: Var,
        zeros: Var,
        cfg: QuantConfig,
    ) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(OP, msg));
        let vars = [w, scales, zeros];
        let [Some(aw), Some(a_s), Some(az)] = vars.map(|v| self.position(v)) else {
            return bad(format!("entries {vars:?} must all be optimized parameters"));
        };
        let (gs, gz) = (a_s.0, az.0);
        if gs != gz {
            return bad(format!(
                "scales (group {gs}) and zeros (group {gz}) must share a group"
            ));
        }
        if self
            .fused
            .iter()
            .any(|f| f.vars().iter().any(|v| vars.contains(v)))
        {
            return bad(format!("entries {vars:?} overlap a weight fused already"));
        }
        if self.pinned_moments {
            return bad(
                "the fused step needs moments in GPU memory (set_pinned_moments is on)".into(),
            );
        }
        let values: Vec<&Tensor> = vars.iter().map(|&v| tape.value(v)).collect();
        match crate::gpu::device_of(OP, &values)? {
            Some(ctx) if ctx.matmul_bf16() => {}
            _ => {
                return bad(
                    "the fused step runs on a GPU in the bf16 mode (set_matmul_bf16)".into(),
                )
            }
        }
        let (sw, ss, sz) = (values[0].shape(), values[1].shape(), values[2].shape());
        let (n, k, g) = cfg.dims(sw)?;
        if ss != [n, k / g] || sz != [n, k / g] {
            return bad(format!(
                "w {sw:?} with scales {ss:?} and zeros {sz:?}: need [{n}, {}]",
                k / g
            ));
        }
        tape.defer_fake_quant(w, scales, zeros)?;
        self.fused.push(FusedWeight {
            w,
            scales,
            zeros,
            at: [aw, a_s, az],
            g,
            qmax: cfg.qmax(),
        });
        Ok(())
    }

    /// This step's fused updates (`slots` as `Tape::params_and_grads_mut` gives them, `dwqs` the fused weights'
    /// dŵ in their order). Returns each updated weight's new ŵ_b, for the tape. A weight without a gradient this
    /// step does not move, nor do its step counts.
    pub(super) fn step_fused(
        &mut self,
        slots: &mut [(&mut Tensor, Option<&Tensor>)],
        dwqs: Vec<Option<Bf16Buf>>,
        lr_factor: f32,
    ) -> Result<Vec<(Var, Bf16Buf)>> {
        let mut copies = Vec::with_capacity(self.fused.len());
        for (i, dwq) in dwqs.into_iter().enumerate() {
            let f = self.fused[i];
            let [(gw, kw), (gq, ks), (_, kz)] = f.at;
            let idx = f.vars().map(Var::index);
            let [(w, _), (s, _), (z, _)] = slots.get_disjoint_mut(idx).map_err(|e| {
                Error::invalid(
                    OP,
                    format!("entries {idx:?} are not distinct tape parameters: {e}"),
                )
            })?;
            let Some(dwq) = dwq else { continue };
            let [stw, sts, stz] = self
                .state
                .params
                .get_disjoint_mut([kw, ks, kz])
                .expect("distinct positions of distinct parameters");
            stw.step += 1;
            sts.step += 1;
            stz.step += 1;
            if sts.step != stz.step {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "scales at step {} and zeros at step {} (loaded state?)",
                        sts.step, stz.step
                    ),
                ));
            }
            let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
            let coefs = |gi: usize, t: u64| {
                let group = &self.groups[gi];
                let lr = group.lr as f64 * lr_factor as f64;
                AdamWCoefs::new(lr, group.weight_decay as f64, b1, b2, eps, t)
            };
            let (cw, cq) = (coefs(gw, stw.step), coefs(gq, sts.step));
            let [mw, ms, mz] = self
                .device
                .get_disjoint_mut([kw, ks, kz])
                .expect("distinct positions of distinct parameters");
            let (w, s, z) = (w.gpu_mut(OP)?, s.gpu_mut(OP)?, z.gpu_mut(OP)?);
            let (wm, sm, zm) = (
                device_moments(mw, w, stw)?,
                device_moments(ms, s, sts)?,
                device_moments(mz, z, stz)?,
            );
            let mut wq = w.ctx().alloc_bf16(w.len())?;
            adamw_fake_quant_cuda(w, wm, &dwq, s, sm, z, zm, &mut wq, (f.g, f.qmax), &cw, &cq)?;
            copies.push((f.w, wq));
        }
        Ok(copies)
    }
}
