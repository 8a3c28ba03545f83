//! The launches of `cuda/adamw.cu`: one update launch per parameter, and one finiteness check per gradient into a
//! shared flag buffer that is downloaded once per step.
use super::{AdamWCoefs, ParamGroup, ParamState};
use crate::error::Result;
use crate::gpu::{Arg, Bf16Buf, GpuBuf, GpuContext, KernelSource, PinnedF32};
use std::sync::Arc;

pub const CUDA: KernelSource = KernelSource {
    op: "adamw",
    code: include_str!("../../../cuda/adamw.cu"),
};

/// A device parameter's first and second moments.
pub struct DeviceMoments {
    pub m: GpuBuf,
    pub v: GpuBuf,
}

/// Where one GPU parameter's moments live.
pub(super) enum Moments {
    Device(DeviceMoments),
    /// Page-locked host memory (`AdamW::set_pinned_moments`).
    Pinned {
        m: PinnedF32,
        v: PinnedF32,
    },
}

impl Moments {
    /// (m, v) copied to the host.
    pub(super) fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Moments::Device(d) => Ok((d.m.to_vec()?, d.v.to_vec()?)),
            Moments::Pinned { m, v } => Ok((m.to_vec(m.len())?, v.to_vec(v.len())?)),
        }
    }
}

/// One step of parameter `p` (state `st`, moments in `slot`) with gradient `g` at learning rate `lr` of `group`:
/// counts the parameter's step, computes its coefficients and runs [`update`].
pub(super) fn step(
    slot: &mut Option<Moments>,
    pinned: bool,
    p: &mut GpuBuf,
    g: &GpuBuf,
    st: &mut ParamState,
    (lr, group): (f64, &ParamGroup),
    (beta1, beta2, eps): (f64, f64, f64),
) -> Result<()> {
    st.step += 1;
    let wd = group.weight_decay as f64;
    let c = AdamWCoefs::new(lr, wd, beta1, beta2, eps, st.step);
    update(slot, pinned, p, g, st, &c)
}

/// One update of parameter `p` with gradient `g`, with the moments of [`moments_of`].
fn update(
    slot: &mut Option<Moments>,
    pinned: bool,
    p: &mut GpuBuf,
    g: &GpuBuf,
    st: &ParamState,
    c: &AdamWCoefs,
) -> Result<()> {
    let ctx = p.ctx().clone();
    match moments_of(slot, pinned, &ctx, p.len(), st)? {
        Moments::Device(d) => adamw_update_cuda(p, g, &mut d.m, &mut d.v, c),
        Moments::Pinned { m, v } => {
            let n = p.len();
            let (mut md, mut vd) = (ctx.alloc(n)?, ctx.alloc(n)?);
            m.load(&mut md)?;
            v.load(&mut vd)?;
            adamw_update_cuda(p, g, &mut md, &mut vd, c)?;
            m.store(&md)?;
            v.store(&vd)
        }
    }
}

/// The moments in `slot` of a parameter of `n` values, made on first use (from `st`'s host moments after
/// `load_state`, else zero; pinned or on the device as `pinned` says).
pub(super) fn moments_of<'a>(
    slot: &'a mut Option<Moments>,
    pinned: bool,
    ctx: &Arc<GpuContext>,
    n: usize,
    st: &ParamState,
) -> Result<&'a mut Moments> {
    Ok(match slot {
        Some(d) => d,
        None if pinned => {
            let (mut m, mut v) = (ctx.alloc_pinned_f32(n)?, ctx.alloc_pinned_f32(n)?);
            if st.m.is_empty() {
                let zeros = ctx.zeros(n)?;
                m.store(&zeros)?;
                v.store(&zeros)?;
            } else {
                m.write(&st.m)?;
                v.write(&st.v)?;
            }
            slot.insert(Moments::Pinned { m, v })
        }
        None => {
            // Moments loaded by `load_state` go up once; a fresh parameter starts at zero.
            let (m, v) = match st.m.is_empty() {
                true => (ctx.zeros(n)?, ctx.zeros(n)?),
                false => (ctx.upload(&st.m)?, ctx.upload(&st.v)?),
            };
            slot.insert(Moments::Device(DeviceMoments { m, v }))
        }
    })
}

/// The update of `adamw_update_cpu` on device buffers, in the same operation order.
pub fn adamw_update_cuda(
    p: &mut GpuBuf,
    g: &GpuBuf,
    m: &mut GpuBuf,
    v: &mut GpuBuf,
    c: &AdamWCoefs,
) -> Result<()> {
    let n = p.len();
    p.ctx().launch_1d(
        &CUDA,
        "adamw_update_f32",
        n,
        &[p.arg(), g.arg(), m.arg(), v.arg(), Arg::I64(n as i64)]
            .into_iter()
            .chain(c.kernel_args())
            .collect::<Vec<_>>(),
    )
}

impl AdamWCoefs {
    /// The coefficients as the kernels' trailing f32 parameters, in `struct AdamWCoefs`'s order (the prelude).
    pub(super) fn kernel_args(&self) -> [Arg; 7] {
        [
            Arg::F32(self.decay),
            Arg::F32(self.beta2),
            Arg::F32(self.one_minus_beta1),
            Arg::F32(self.one_minus_beta2),
            Arg::F32(self.step_size),
            Arg::F32(self.bias_correction2_sqrt),
            Arg::F32(self.eps),
        ]
    }
}

/// For each gradient (the f32 ones, then the bf16 ones), whether it holds a NaN or an infinity: all checks
/// queued, then one download.
pub fn nonfinite_cuda(grads: &[&GpuBuf], bf16_grads: &[&Bf16Buf]) -> Result<Vec<bool>> {
    let ctx = match (grads.first(), bf16_grads.first()) {
        (Some(g), _) => g.ctx().clone(),
        (None, Some(g)) => g.ctx().clone(),
        (None, None) => return Ok(Vec::new()),
    };
    let flags = ctx.zeros(grads.len() + bf16_grads.len())?;
    let checks = grads.iter().map(|g| ("adamw_check_f32", g.arg(), g.len()));
    let bf16_checks = bf16_grads
        .iter()
        .map(|g| ("adamw_check_bf16", g.arg(), g.len()));
    for (k, (kernel, g, n)) in checks.chain(bf16_checks).enumerate() {
        ctx.launch_1d(
            &CUDA,
            kernel,
            n,
            &[flags.arg(), Arg::I32(k as i32), g, Arg::I64(n as i64)],
        )?;
    }
    Ok(flags.to_vec()?.iter().map(|&f| f != 0.0).collect())
}
