//! Inference through a run of (dequantized) blocks, for MREM's per-batch inputs and outputs.
use crate::autograd::Tape;
use crate::error::Result;
use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
use crate::tensor::Tensor;
use crate::train::device::Device;

/// `x` [B, T, C] through `blocks` (already on `device`) in order on `device`, without gradients; `x` itself
/// (moved to `device`) when `blocks` is empty.
pub(super) fn forward_blocks(
    cfg: &LlamaConfig,
    blocks: &[BlockWeights],
    x: Tensor,
    device: &Device,
) -> Result<Tensor> {
    let mut x = device.put(x)?;
    for w in blocks {
        let mut tape = Tape::new();
        let vars = BlockVars::register(&mut tape, w, None)?;
        x = tape.no_grad(|tape| -> Result<Tensor> {
            let input = tape.input(x);
            let y = block_forward(tape, cfg, &vars, input)?;
            Ok(tape.value(y).clone())
        })?;
    }
    Ok(x)
}
