//! Where Block-AP runs: the host, or a GPU (the `cuda` feature). On a GPU a block's weights, scales, zeros and
//! optimizer state live in device memory for the block's training; calibration batches come from the streams in
//! GPU memory (`device_store`), or are uploaded from the host `BlockInputStore` step by step when the streams do not
//! fit there; step losses are read back a batch of steps at a time ([`LossQueue`]), and the trained block is
//! downloaded for the checkpoint.
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

    /// Turns the bf16 GEMM mode of a GPU (`GpuContext::set_matmul_bf16`: bf16 operands, f32 accumulation) on
    /// or off; the CPU computes in f32 only, so `on` is an error there.
    pub fn set_matmul_bf16(&self, on: bool) -> Result<()> {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(ctx) => {
                ctx.set_matmul_bf16(on);
                Ok(())
            }
            _ if on => Err(Error::invalid(
                "device",
                "bf16 GEMMs run on a GPU: use --dtype bf16 with --device cuda",
            )),
            _ => Ok(()),
        }
    }

    /// Whether the GPU is in the bf16 GEMM mode (always false on the CPU).
    pub fn matmul_bf16(&self) -> bool {
        match self {
            Device::Cpu => false,
            #[cfg(feature = "cuda")]
            Device::Cuda(ctx) => ctx.matmul_bf16(),
        }
    }

    /// The GPU's ordinal; None for the CPU.
    pub fn ordinal(&self) -> Option<usize> {
        match self {
            Device::Cpu => None,
            #[cfg(feature = "cuda")]
            Device::Cuda(ctx) => Some(ctx.ordinal()),
        }
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

/// Steps whose losses a [`LossQueue`] holds on the device before reading them back together.
pub const LOSS_READBACK_STEPS: usize = 64;

/// The step losses of a block training on a GPU, left on the device and read back [`LOSS_READBACK_STEPS`] at a
/// time (and at each epoch's end) with one wait for the device: read every step, the wait would leave the GPU
/// idle while the host queues the next step.
#[derive(Default)]
pub struct LossQueue(Vec<(usize, Tensor)>);

impl LossQueue {
    pub fn new() -> LossQueue {
        LossQueue::default()
    }

    /// Queues the loss of step `step` (a scalar, where it was computed).
    pub fn push(&mut self, step: usize, loss: Tensor) {
        self.0.push((step, loss));
    }

    pub fn is_full(&self) -> bool {
        self.0.len() >= LOSS_READBACK_STEPS
    }

    /// (step, loss) of every queued step, oldest first; the queue is left empty.
    pub fn read_back(&mut self) -> Result<Vec<(usize, f32)>> {
        self.0
            .drain(..)
            .map(|(step, t)| Ok((step, t.to_host()?.f32s("LossQueue")?[0])))
            .collect()
    }
}
