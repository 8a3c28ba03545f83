//! A block after Block-AP: trained norms and seven packed linears (integer weights, zero points, scales).
use crate::error::Result;
use crate::model::llama::BlockWeights;
use crate::quant::fake_quant::QuantConfig;
use crate::quant::real_quant::QuantizedLinear;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct QuantizedBlock {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    /// In `LlamaConfig::linear_shapes` order.
    pub linears: [QuantizedLinear; 7],
}

impl QuantizedBlock {
    /// Freezes Block-AP's result: integer weights W_int = clamp(round(W/s) + z, 0, qmax) with the clamped scales
    /// and rounded zeros of the fake-quant forward.
    pub fn freeze(
        weights: &BlockWeights,
        scales: &[Tensor; 7],
        zeros: &[Tensor; 7],
        cfg: QuantConfig,
    ) -> Result<Self> {
        let mut linears = Vec::with_capacity(7);
        for i in 0..7 {
            linears.push(QuantizedLinear::from_fake_quant(
                &weights.linears[i],
                &scales[i],
                &zeros[i],
                cfg,
            )?);
        }
        Ok(QuantizedBlock {
            attn_norm: weights.attn_norm.clone(),
            ffn_norm: weights.ffn_norm.clone(),
            linears: linears.try_into().expect("seven linears"),
        })
    }

    /// The block with each linear dequantized: bit for bit the fake-quant forward's weights.
    pub fn dequantized(&self) -> Result<BlockWeights> {
        let mut linears = Vec::with_capacity(7);
        for l in &self.linears {
            linears.push(l.dequantize()?);
        }
        Ok(BlockWeights {
            attn_norm: self.attn_norm.clone(),
            ffn_norm: self.ffn_norm.clone(),
            linears: linears.try_into().expect("seven linears"),
        })
    }
}
