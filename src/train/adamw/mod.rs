//! AdamW with decoupled weight decay, step for step as torch.optim.AdamW (its single-tensor path), which both
//! Block-AP (`torch.optim.AdamW`, wd 0) and E2E-QP (bitsandbytes paged AdamW 32-bit, same update) use:
//!   p ← p · (1 − lr·wd)                                    decoupled: the decay never enters m or v
//!   m ← m + (1 − β1)·(g − m)                               torch's `lerp_`, = β1·m + (1 − β1)·g
//!   v ← β2·v + (1 − β2)·g²
//!   p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//! t is the parameter's own step count (torch's per-parameter `state['step']`): a parameter without a gradient
//! is skipped and its count does not move. The scalars (bias corrections, lr·wd) are computed in f64 and the
//! elementwise update in f32, as torch does with Python floats and fp32 tensors. m and v are f32, allocated on a
//! parameter's first update.
//!
//! A parameter on a GPU (the `cuda` feature) is updated there (`cuda/adamw.cu`, one launch per parameter) with
//! its m and v in device memory; `sync_state_to_host` copies them into `state()` for a checkpoint, and
//! `load_state` puts saved moments back on the device at the next step. With `set_pinned_moments(true)` the
//! moments live in page-locked host memory instead and each parameter's pair visits the GPU only for its update
//! (loaded into two scratch buffers, updated by the same kernel, stored back): the same f32 arithmetic, bit for
//! bit, for 8 bytes per parameter less GPU memory and 16 bytes per parameter of PCIe traffic per step.
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::f32x8;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod fake_quant;
#[cfg(test)]
mod tests;

#[cfg(feature = "cuda")]
use cuda::Moments;
#[cfg(feature = "cuda")]
pub use cuda::{adamw_update_cuda, nonfinite_cuda, DeviceMoments, CUDA};
#[cfg(feature = "cuda")]
pub use fake_quant::adamw_fake_quant_cuda;

/// Parameters sharing a learning rate and weight decay (Block-AP: one group for scales/zeros, one for weights).
#[derive(Clone, Debug)]
pub struct ParamGroup {
    pub params: Vec<Var>,
    pub lr: f32,
    pub weight_decay: f32,
}

/// One parameter's optimizer state; `m` and `v` are empty until its first update.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamState {
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Everything a checkpoint needs to resume: `params` in group order, then parameter order within a group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamWState {
    /// Number of `step` calls that completed.
    pub steps: u64,
    pub params: Vec<ParamState>,
}

pub struct AdamW {
    groups: Vec<ParamGroup>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    state: AdamWState,
    /// Moments of parameters that live on a GPU, indexed like `state.params` (None until the first device step,
    /// and again after `load_state`, so that loaded host moments are uploaded).
    #[cfg(feature = "cuda")]
    device: Vec<Option<Moments>>,
    /// Check device gradients for non-finite values before each update (one wait for the GPU per step).
    #[cfg(feature = "cuda")]
    check_device_grads: bool,
    /// New device moments go to page-locked host memory (`set_pinned_moments`).
    #[cfg(feature = "cuda")]
    pinned_moments: bool,
    /// Weights updated with their scales and zeros by the fused kernel (`fuse_fake_quant`).
    #[cfg(feature = "cuda")]
    fused: Vec<fake_quant::FusedWeight>,
}

/// The f32 constants of one parameter's update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWCoefs {
    pub decay: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub step_size: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

impl AdamWCoefs {
    /// Coefficients for the parameter's step `t` (1-based) at learning rate `lr`.
    pub fn new(lr: f64, weight_decay: f64, beta1: f64, beta2: f64, eps: f64, t: u64) -> AdamWCoefs {
        let t = t as i32;
        AdamWCoefs {
            decay: (1.0 - lr * weight_decay) as f32,
            beta2: beta2 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            step_size: (lr / (1.0 - beta1.powi(t))) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            eps: eps as f32,
        }
    }
}

/// The textbook update in f64 (the reference): one step `t` (1-based) on p, m, v in place.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update_ref(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    t: u64,
) {
    let (bc1, bc2) = (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32));
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * weight_decay;
        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
        v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
        p[i] -= lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
    }
}

const LANES: usize = 8;
/// Elements per rayon task: large enough to amortise scheduling, small enough to spread a 4096-wide row.
const CHUNK: usize = 16 * 1024;

fn lanes(s: &[f32]) -> f32x8 {
    f32x8::from(<[f32; LANES]>::try_from(s).expect("8 lanes"))
}

fn update_one(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, c: &AdamWCoefs) {
    *p *= c.decay;
    *m += c.one_minus_beta1 * (g - *m);
    *v = *v * c.beta2 + c.one_minus_beta2 * g * g;
    *p += -c.step_size * (*m / (v.sqrt() / c.bias_correction2_sqrt + c.eps));
}

/// The f32 update, in torch's operation order, 8 lanes at a time over parallel chunks.
pub fn adamw_update_cpu(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamWCoefs) {
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            let n8 = p.len() / LANES * LANES;
            let s = |x: f32| f32x8::splat(x);
            for i in (0..n8).step_by(LANES) {
                let r = i..i + LANES;
                let gv = lanes(&g[r.clone()]);
                let mut mv = lanes(&m[r.clone()]);
                mv += s(c.one_minus_beta1) * (gv - mv);
                let vv = lanes(&v[r.clone()]) * s(c.beta2) + s(c.one_minus_beta2) * gv * gv;
                let denom = vv.sqrt() / s(c.bias_correction2_sqrt) + s(c.eps);
                let pv = lanes(&p[r.clone()]) * s(c.decay) + s(-c.step_size) * (mv / denom);
                p[r.clone()].copy_from_slice(pv.as_array_ref());
                m[r.clone()].copy_from_slice(mv.as_array_ref());
                v[r].copy_from_slice(vv.as_array_ref());
            }
            for i in n8..p.len() {
                update_one(&mut p[i], g[i], &mut m[i], &mut v[i], c);
            }
        });
}

impl AdamW {
    /// Checks 0 <= β < 1, ε > 0, finite non-negative lr and weight decay, and that no parameter appears twice.
    pub fn new(groups: Vec<ParamGroup>, beta1: f64, beta2: f64, eps: f64) -> Result<AdamW> {
        let bad = |msg: String| Err(Error::invalid("AdamW", msg));
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            return bad(format!("betas ({beta1}, {beta2}) must lie in [0, 1)"));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return bad(format!("eps {eps} must be positive"));
        }
        let mut seen = std::collections::HashSet::new();
        for (gi, group) in groups.iter().enumerate() {
            for (name, x) in [("lr", group.lr), ("weight_decay", group.weight_decay)] {
                if !(x >= 0.0 && x.is_finite()) {
                    return bad(format!("group {gi}: {name} {x} must be finite and >= 0"));
                }
            }
            if let Some(v) = group.params.iter().find(|v| !seen.insert(**v)) {
                return bad(format!("group {gi}: parameter {} listed twice", v.index()));
            }
        }
        let n = groups.iter().map(|g| g.params.len()).sum();
        Ok(AdamW {
            groups,
            beta1,
            beta2,
            eps,
            state: AdamWState {
                steps: 0,
                params: vec![ParamState::default(); n],
            },
            #[cfg(feature = "cuda")]
            device: (0..n).map(|_| None).collect(),
            #[cfg(feature = "cuda")]
            check_device_grads: true,
            #[cfg(feature = "cuda")]
            pinned_moments: false,
            #[cfg(feature = "cuda")]
            fused: Vec::new(),
        })
    }

    /// Stops checking GPU gradients before each update, for a caller that checks the losses instead (Block-AP
    /// on a GPU: a non-finite gradient makes the parameters, and so the next losses, non-finite).
    #[cfg(feature = "cuda")]
    pub fn skip_device_gradient_check(&mut self) {
        self.check_device_grads = false;
    }

    /// With `on`, the moments of GPU parameters made from now on live in page-locked host memory (module docs).
    /// Call it before the first step: moments already made stay where they are.
    #[cfg(feature = "cuda")]
    pub fn set_pinned_moments(&mut self, on: bool) {
        self.pinned_moments = on;
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Number of completed `step` calls.
    pub fn steps(&self) -> u64 {
        self.state.steps
    }

    /// The resumable state. For parameters on a GPU, m and v here are only as recent as the last
    /// `sync_state_to_host`.
    pub fn state(&self) -> &AdamWState {
        &self.state
    }

    /// Copies the device moments of GPU parameters into `state()` (before saving a checkpoint).
    #[cfg(feature = "cuda")]
    pub fn sync_state_to_host(&mut self) -> Result<()> {
        for (st, dev) in self.state.params.iter_mut().zip(&self.device) {
            if let Some(d) = dev {
                (st.m, st.v) = d.to_host()?;
            }
        }
        Ok(())
    }

    /// Restores a saved state. Its parameter count must match; each m/v length is checked against its
    /// parameter at the next `step` (the tape is not known here).
    pub fn load_state(&mut self, state: AdamWState) -> Result<()> {
        if state.params.len() != self.state.params.len() {
            return Err(Error::invalid(
                "AdamW::load_state",
                format!(
                    "state holds {} parameters, the optimizer {}",
                    state.params.len(),
                    self.state.params.len()
                ),
            ));
        }
        if let Some((i, p)) = state
            .params
            .iter()
            .enumerate()
            .find(|(_, p)| p.m.len() != p.v.len() || (p.step == 0) != p.m.is_empty())
        {
            return Err(Error::invalid(
                "AdamW::load_state",
                format!(
                    "parameter {i}: step {} with m {} and v {} values",
                    p.step,
                    p.m.len(),
                    p.v.len()
                ),
            ));
        }
        self.state = state;
        #[cfg(feature = "cuda")]
        self.device.iter_mut().for_each(|d| *d = None);
        Ok(())
    }

    /// One update of every parameter that has a gradient, at lr = group.lr · lr_factor. Checks all gradients
    /// first: a non-finite one is an error and leaves every parameter and the state untouched.
    pub fn step(&mut self, tape: &mut Tape, lr_factor: f32) -> Result<()> {
        if !(lr_factor >= 0.0 && lr_factor.is_finite()) {
            return Err(Error::invalid(
                "AdamW",
                format!("lr_factor {lr_factor} must be finite and >= 0"),
            ));
        }
        let n_params = tape.n_params();
        // The fused weights' dŵ (bf16), which the tape keeps apart from its gradient slots.
        #[cfg(feature = "cuda")]
        let fused_grads: Vec<Option<crate::gpu::Bf16Buf>> = self
            .fused
            .iter()
            .map(|f| tape.take_fake_quant_grad(f.vars()[0]))
            .collect();
        let mut slots: Vec<(&mut Tensor, Option<&Tensor>)> = tape.params_and_grads_mut().collect();
        // Gradients on a GPU, checked for finiteness together after the loop: (group, entry, var, shape, grad).
        #[cfg(feature = "cuda")]
        let mut on_device: Vec<(usize, usize, usize, Vec<usize>, &Tensor)> = Vec::new();
        let mut k = 0;
        for (gi, group) in self.groups.iter().enumerate() {
            for (pi, var) in group.params.iter().enumerate() {
                let Some((p, g)) = slots.get(var.index()) else {
                    return Err(Error::invalid(
                        "AdamW",
                        format!(
                            "group {gi} entry {pi}: var {} is not one of the tape's {n_params} parameters",
                            var.index()
                        ),
                    ));
                };
                let st = &self.state.params[k];
                k += 1;
                let Some(g) = g else { continue };
                #[cfg(feature = "cuda")]
                if crate::gpu::device_of("AdamW", &[p, g])?.is_some() {
                    on_device.push((gi, pi, var.index(), p.shape().to_vec(), *g));
                }
                if !p.is_cuda() {
                    p.f32s("AdamW")?;
                }
                if !st.m.is_empty() && st.m.len() != p.numel() {
                    return Err(Error::shape(
                        "AdamW",
                        format!(
                            "group {gi} entry {pi}: state of {} values for a parameter {:?}",
                            st.m.len(),
                            p.shape()
                        ),
                    ));
                }
                if !g.is_cuda() && g.f32s("AdamW")?.par_iter().any(|x| !x.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!(
                            "AdamW gradient of group {gi} entry {pi} (var {}, {:?})",
                            var.index(),
                            p.shape()
                        ),
                    });
                }
            }
        }
        #[cfg(feature = "cuda")]
        if self.check_device_grads {
            let grads: Vec<&crate::gpu::GpuBuf> = on_device
                .iter()
                .map(|(.., g)| g.gpu("AdamW"))
                .collect::<Result<_>>()?;
            // (weight var, dŵ) of the fused weights that have one this step.
            let dwqs: Vec<(Var, &crate::gpu::Bf16Buf)> = self
                .fused
                .iter()
                .zip(&fused_grads)
                .filter_map(|(f, g)| Some((f.vars()[0], g.as_ref()?)))
                .collect();
            let dwq_bufs: Vec<&crate::gpu::Bf16Buf> = dwqs.iter().map(|&(_, g)| g).collect();
            let bad = nonfinite_cuda(&grads, &dwq_bufs)?;
            if let Some(i) = bad.iter().position(|&b| b) {
                let what = match on_device.get(i) {
                    Some((gi, pi, var, shape, _)) => {
                        format!("AdamW gradient of group {gi} entry {pi} (var {var}, {shape:?})")
                    }
                    None => {
                        let var = dwqs[i - on_device.len()].0.index();
                        format!("AdamW gradient dŵ of the fused weight (var {var})")
                    }
                };
                return Err(Error::NonFinite { what });
            }
        }
        // Fused weights, scales and zeros take their step together below.
        #[cfg(feature = "cuda")]
        let fused: std::collections::HashSet<Var> =
            self.fused.iter().flat_map(|f| f.vars()).collect();
        let mut k = 0;
        for group in &self.groups {
            let lr = group.lr as f64 * lr_factor as f64;
            for var in &group.params {
                let st = &mut self.state.params[k];
                k += 1;
                #[cfg(feature = "cuda")]
                if fused.contains(var) {
                    continue;
                }
                let (p, g) = &mut slots[var.index()];
                let Some(g) = g else { continue };
                #[cfg(feature = "cuda")]
                if p.is_cuda() {
                    let betas = (self.beta1, self.beta2, self.eps);
                    let slot = &mut self.device[k - 1];
                    let (p, g) = (p.gpu_mut("AdamW")?, g.gpu("AdamW")?);
                    cuda::step(slot, self.pinned_moments, p, g, st, (lr, group), betas)?;
                    continue;
                }
                let p = p.f32s_mut("AdamW")?;
                if st.m.is_empty() {
                    st.m = vec![0.0; p.len()];
                    st.v = vec![0.0; p.len()];
                }
                st.step += 1;
                let c = AdamWCoefs::new(
                    lr,
                    group.weight_decay as f64,
                    self.beta1,
                    self.beta2,
                    self.eps,
                    st.step,
                );
                adamw_update_cpu(p, g.f32s("AdamW")?, &mut st.m, &mut st.v, &c);
            }
        }
        #[cfg(feature = "cuda")]
        {
            let copies = self.step_fused(&mut slots, fused_grads, lr_factor)?;
            drop(slots);
            for (w, wq) in copies {
                tape.set_fake_quant_copy(w, std::sync::Arc::new(wq));
            }
        }
        self.state.steps += 1;
        Ok(())
    }

    /// [`AdamW::step`] one parameter at a time, for gradients that never sit on the tape together (E2E-QP keeps
    /// them in host memory): updates GPU parameter `var` with gradient `g` as `step` would, without its
    /// finiteness check (the caller's clip already failed on a non-finite norm). Call it for every parameter
    /// that has a gradient, then [`AdamW::end_step`].
    #[cfg(feature = "cuda")]
    pub fn step_param_cuda(
        &mut self,
        var: Var,
        p: &mut crate::gpu::GpuBuf,
        g: &crate::gpu::GpuBuf,
        lr_factor: f32,
    ) -> Result<()> {
        let Some((gi, k)) = self.position(var) else {
            return Err(Error::invalid(
                "AdamW",
                format!("var {} is not an optimized parameter", var.index()),
            ));
        };
        let group = &self.groups[gi];
        let lr = group.lr as f64 * lr_factor as f64;
        let betas = (self.beta1, self.beta2, self.eps);
        let (st, slot) = (&mut self.state.params[k], &mut self.device[k]);
        cuda::step(slot, self.pinned_moments, p, g, st, (lr, group), betas)
    }

    /// (group, index in `state.params`) of an optimized parameter.
    #[cfg(feature = "cuda")]
    fn position(&self, var: Var) -> Option<(usize, usize)> {
        let mut k = 0;
        for (gi, group) in self.groups.iter().enumerate() {
            if let Some(i) = group.params.iter().position(|&v| v == var) {
                return Some((gi, k + i));
            }
            k += group.params.len();
        }
        None
    }

    /// Counts a step made of [`AdamW::step_param_cuda`] calls.
    pub fn end_step(&mut self) {
        self.state.steps += 1;
    }
}
