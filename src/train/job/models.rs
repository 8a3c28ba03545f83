//! The quantized models a train job builds from the FP model's embedding, norm and head.
use crate::error::Result;
use crate::model::quantized::{QuantizedBlock, QuantizedModel};
use crate::model::LlamaModel;
use crate::quant::fake_quant::{init_minmax, QuantConfig};
use crate::tensor::Tensor;

/// A quantized model with the resident tensors of `fp` and the given blocks.
pub(super) fn quantized_model(
    fp: &LlamaModel,
    blocks: Vec<QuantizedBlock>,
) -> Result<QuantizedModel> {
    let src = fp.source();
    Ok(QuantizedModel {
        cfg: src.config().clone(),
        embedding: src.embedding()?,
        final_norm: src.final_norm()?,
        lm_head: src.lm_head()?,
        blocks,
        path: src.path().to_path_buf(),
    })
}

/// Every linear at its min-max initialisation, no training: the RTN baseline.
pub fn rtn_model(fp: &LlamaModel, quant: QuantConfig) -> Result<QuantizedModel> {
    let src = fp.source();
    let mut blocks = Vec::with_capacity(src.config().n_layers);
    for i in 0..src.config().n_layers {
        let w = src.block(i)?;
        let mut scales: Vec<Tensor> = Vec::new();
        let mut zeros: Vec<Tensor> = Vec::new();
        for l in &w.linears {
            let (s, z) = init_minmax(l, quant)?;
            scales.push(s);
            zeros.push(z);
        }
        blocks.push(QuantizedBlock::freeze(
            &w,
            &scales.try_into().expect("7"),
            &zeros.try_into().expect("7"),
            quant,
        )?);
    }
    quantized_model(fp, blocks)
}
