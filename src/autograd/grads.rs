//! The tape's gradient-slot helpers: fresh buffers, `+=` accumulation and pass-through of dout.
use super::{BufferPool, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A gradient's bf16 twin (`Tape::wants_bf16_twin`); nothing without the GPU.
#[cfg(feature = "cuda")]
pub(super) type Bf16Twin = crate::gpu::Bf16Buf;
#[cfg(not(feature = "cuda"))]
pub(super) type Bf16Twin = ();

/// A gradient buffer shaped like `t`, where `t` lives (the host pool or t's GPU): zeroed, or on a GPU left
/// uninitialised when `uninit` (the op overwrites it). A bf16 value's gradient is bf16 unless `f32_dout` (its
/// producer reads an f32 dout: `Backward::reads_f32_dout`).
pub(super) fn grad_buffer(
    t: &Tensor,
    (uninit, f32_dout): (bool, bool),
    pool: &mut BufferPool,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    match t.storage() {
        crate::tensor::Storage::Cuda(b) => {
            let buf = match uninit {
                true => b.ctx().alloc(t.numel())?,
                false => b.ctx().zeros(t.numel())?,
            };
            return Tensor::from_gpu(t.shape(), buf);
        }
        crate::tensor::Storage::CudaBf16(b) if f32_dout => {
            let buf = match uninit {
                true => b.ctx().alloc(t.numel())?,
                false => b.ctx().zeros(t.numel())?,
            };
            return Tensor::from_gpu(t.shape(), buf);
        }
        // A bf16 value's gradient is bf16 too (as in torch.autocast).
        crate::tensor::Storage::CudaBf16(b) => {
            let mut buf = b.ctx().alloc_bf16(t.numel())?;
            if !uninit {
                buf.zero()?;
            }
            return Tensor::from_gpu_bf16(t.shape(), buf);
        }
        _ => {}
    }
    let _ = (uninit, f32_dout);
    Tensor::from_vec(t.shape(), pool.take_zeroed(t.numel()))
}

/// dout of a `passes_dout_through` node to each input in `needy` (in order; an input may repeat), reshaped to
/// the input's shape: added into a slot that holds a gradient, moved into the last empty one, copied into the
/// others. The inputs in `bf16` (empty slots of inputs read once, `Tape::takes_bf16_dout`) get bf16(dout)
/// instead, before the others take theirs, so the f32 dout is moved rather than copied when one other is left;
/// `twin`, dout's bf16 twin when its producer wrote one (`Tape::wants_bf16_twin`), is handed over instead of a cast.
pub(super) fn pass_through(
    grads: &mut [Option<Tensor>],
    values: &[Tensor],
    (needy, bf16): (&[Var], &[Var]),
    (dout, twin): (Tensor, Option<Bf16Twin>),
    pool: &mut BufferPool,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    let mut twin = twin;
    #[cfg(not(feature = "cuda"))]
    let _ = twin;
    #[cfg(feature = "cuda")]
    for v in bf16 {
        if grads[v.0].is_some() {
            return Err(Error::Autograd(format!(
                "entry {} takes a bf16 gradient but holds one already",
                v.0
            )));
        }
        let d = match twin.take() {
            Some(d) => d,
            None => crate::ops::linear::cast_bf16_cuda(dout.gpu("backward")?)?,
        };
        grads[v.0] = Some(Tensor::from_gpu_bf16(values[v.0].shape(), d)?);
    }
    let rest: Vec<Var>;
    let needy = match bf16.is_empty() {
        true => needy,
        false => {
            rest = needy
                .iter()
                .copied()
                .filter(|v| !bf16.contains(v))
                .collect();
            &rest
        }
    };
    for (j, v) in needy.iter().enumerate() {
        let shape = values[v.0].shape();
        if values[v.0].numel() != dout.numel() {
            return Err(Error::Autograd(format!(
                "a pass-through gradient of shape {:?} for an input of shape {shape:?}",
                dout.shape()
            )));
        }
        match &mut grads[v.0] {
            Some(g) => add_in_place(g, &dout)?,
            None if j + 1 == needy.len() => {
                grads[v.0] = Some(dout.reshape(shape)?);
                return Ok(());
            }
            None => grads[v.0] = Some(copy_of(&dout, pool)?.reshape(shape)?),
        }
    }
    if let Some(buf) = dout.into_f32_vec() {
        pool.give(buf);
    }
    Ok(())
}

/// A copy of `t` where it lives (a pooled host buffer or a device copy).
fn copy_of(t: &Tensor, pool: &mut BufferPool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    match t.storage() {
        crate::tensor::Storage::Cuda(b) => return Tensor::from_gpu(t.shape(), b.try_clone()?),
        crate::tensor::Storage::CudaBf16(b) => {
            return Tensor::from_gpu_bf16(t.shape(), (**b).clone())
        }
        _ => {}
    }
    let mut buf = pool.take_zeroed(t.numel());
    buf.copy_from_slice(t.f32s("backward")?);
    Tensor::from_vec(t.shape(), buf)
}

/// g += d, where both live.
fn add_in_place(g: &mut Tensor, d: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    if g.dtype() == crate::tensor::DType::BF16 || d.dtype() == crate::tensor::DType::BF16 {
        return Err(Error::Autograd(
            "a bf16 value used by two ops gets two gradients: adding bf16 gradients is not supported"
                .into(),
        ));
    }
    #[cfg(feature = "cuda")]
    if crate::gpu::device_of("backward", &[g, d])?.is_some() {
        return crate::ops::add::add_assign_cuda(g.gpu_mut("backward")?, d.gpu("backward")?);
    }
    crate::ops::simd::add_assign(g.f32s_mut("backward")?, d.f32s("backward")?);
    Ok(())
}

pub(super) fn accumulate(
    slot: &mut Option<Tensor>,
    d: Tensor,
    pool: &mut BufferPool,
) -> Result<()> {
    match slot {
        None => *slot = Some(d),
        Some(g) => {
            add_in_place(g, &d)?;
            if let Some(buf) = d.into_f32_vec() {
                pool.give(buf);
            }
        }
    }
    Ok(())
}
