//! Where Block-AP runs: the host, or a GPU (the `cuda` feature). On a GPU a block's weights, scales, zeros and
//! optimizer state live in device memory for the block's training; calibration batches are uploaded from the
//! `BlockInputStore` step by step and the trained block is downloaded for the checkpoint.
use crate::error::{Error, Result};
use crate::model::llama::BlockWeights;
use crate::tensor::Tensor;

#[derive(Clone, Debug, Default)]
pub enum Device {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::gpu::GpuContext>),
}

impl Device {
    /// `cpu`, `cuda` (device 0) or `cuda:N`. Errors when the engine was built without the `cuda` feature or the
    /// GPU cannot be opened.
    pub fn parse(s: &str) -> Result<Device> {
        let ordinal = match s {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => 0,
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => n,
                _ => {
                    return Err(Error::invalid(
                        "device",
                        format!("`{s}`: expected cpu, cuda or cuda:N"),
                    ))
                }
            },
        };
        Self::cuda(ordinal)
    }

    #[cfg(feature = "cuda")]
    fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(crate::gpu::GpuContext::new(ordinal)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(ordinal: usize) -> Result<Device> {
        Err(Error::invalid(
            "device",
            format!("cuda:{ordinal}: this engine was built without the `cuda` feature"),
        ))
    }

    /// `cpu` or `cuda:N (name)`.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(ctx) => format!("cuda:{} ({})", ctx.ordinal(), ctx.name()),
        }
    }

    /// `t` on this device (moved when it is already there).
    pub fn put(&self, t: Tensor) -> Result<Tensor> {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(ctx) => t.to_device(ctx),
            _ => Ok(t),
        }
    }

    /// A copy of `t` on this device.
    pub fn copy(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(ctx) => t.to_device(ctx),
            _ => Ok(t.clone()),
        }
    }

    /// A copy of a block's weights on this device.
    pub fn copy_block(&self, w: &BlockWeights) -> Result<BlockWeights> {
        let mut linears = Vec::with_capacity(7);
        for l in &w.linears {
            linears.push(self.copy(l)?);
        }
        Ok(BlockWeights {
            attn_norm: self.copy(&w.attn_norm)?,
            ffn_norm: self.copy(&w.ffn_norm)?,
            linears: linears.try_into().expect("seven linears"),
        })
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }
}

/// A host copy of a block's weights (downloaded from a GPU where they live there).
pub fn block_to_host(w: &BlockWeights) -> Result<BlockWeights> {
    let mut linears = Vec::with_capacity(7);
    for l in &w.linears {
        linears.push(l.to_host()?);
    }
    Ok(BlockWeights {
        attn_norm: w.attn_norm.to_host()?,
        ffn_norm: w.ffn_norm.to_host()?,
        linears: linears.try_into().expect("seven linears"),
    })
}
