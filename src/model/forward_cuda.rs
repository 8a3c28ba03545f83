//! The whole Llama model on a GPU, no-grad, for perplexity: the CPU forward of `forward.rs` with the hidden
//! states, each block's weights, the final norm and the output projection in device memory.
//!
//! The same ops in the same order as on the CPU, so in f32 (the context's bf16 GEMM mode off) the NLL agrees
//! with the CPU's to f32 rounding. Embedding rows are gathered on the host (a copy of [B, T, C] goes up) and
//! blocks are dequantized there one at a time, as on the CPU; the output projection stays resident on the GPU.
//! Logits are computed one window at a time ([T, V]: 0.4 GiB at T 2048 and SmolLM2's V 49152).
use crate::autograd::Tape;
use crate::error::Result;
use crate::eval::NllModel;
use crate::gpu::GpuContext;
use crate::model::forward::{run_block, LlamaModel};
use crate::ops::cross_entropy::cross_entropy;
use crate::ops::embedding::embedding_fwd_cpu;
use crate::ops::linear::linear;
use crate::ops::rmsnorm::rmsnorm;
use crate::tensor::Tensor;
use crate::train::device::Device;
use crate::train::device_store::take_rows_cuda;
use std::sync::Arc;

const OP: &str = "CudaModel";

/// Target of the last position of a window, which predicts nothing; token ids are never negative.
const NO_TARGET: i32 = -1;

/// A model scored on a GPU: its resident tensors uploaded once, blocks streamed per batch.
pub struct CudaModel<'a> {
    model: &'a LlamaModel,
    device: Device,
    final_norm: Tensor,
    head: Tensor,
}

impl<'a> CudaModel<'a> {
    pub fn new(model: &'a LlamaModel, ctx: &Arc<GpuContext>) -> Result<CudaModel<'a>> {
        Ok(CudaModel {
            model,
            device: Device::Cuda(ctx.clone()),
            final_norm: model.final_norm().to_device(ctx)?,
            head: model.head().to_device(ctx)?,
        })
    }

    /// The hidden states [B, T, C] after the last block, on the GPU.
    fn blocks(&self, windows: &[Vec<u32>], t: usize) -> Result<Tensor> {
        let cfg = self.model.config();
        let (b, c) = (windows.len(), cfg.hidden);
        let mut x = vec![0.0; b * t * c];
        embedding_fwd_cpu(
            &mut x,
            self.model.embedding().f32s(OP)?,
            &windows.concat(),
            c,
        );
        let mut x = self.device.put(Tensor::from_vec(&[b, t, c], x)?)?;
        let source = self.model.source();
        for i in 0..cfg.n_layers {
            let weights = self.device.copy_block(&source.block(i)?)?;
            let bias = match source.qkv_bias(i)? {
                Some([q, k, v]) => Some([
                    self.device.put(q)?,
                    self.device.put(k)?,
                    self.device.put(v)?,
                ]),
                None => None,
            };
            x = run_block(cfg, &weights, bias.as_ref(), x)?;
        }
        Ok(x)
    }
}

impl NllModel for CudaModel<'_> {
    /// As `LlamaModel::nll`: Σ NLL over every window's T − 1 predictions (each window's mean computed in f64 on
    /// the device, scaled back to a sum here), and the count.
    fn nll(&self, windows: &[Vec<u32>]) -> Result<(f64, usize)> {
        let t = self.model.check_windows(windows)?;
        let cfg = self.model.config();
        let h = self.blocks(windows, t)?;
        let mut tape = Tape::new();
        let norm = tape.param(self.final_norm.clone())?;
        let head = tape.param(self.head.clone())?;
        let (mut sum, mut count) = (0.0, 0);
        for (w, ids) in windows.iter().enumerate() {
            if t < 2 {
                break;
            }
            let mut targets: Vec<i32> = ids[1..].iter().map(|&id| id as i32).collect();
            targets.push(NO_TARGET);
            tape.reset();
            let mean = tape.no_grad(|tape| -> Result<f32> {
                let x = tape.input(take_rows_cuda(&h, w, 1)?.reshape(&[t, cfg.hidden])?);
                let x = rmsnorm(tape, x, norm, cfg.rms_eps)?;
                let logits = linear(tape, x, head, None)?;
                let loss = cross_entropy(tape, logits, &targets, NO_TARGET)?;
                Ok(tape.value(loss).to_host()?.f32s(OP)?[0])
            })?;
            sum += mean as f64 * (t - 1) as f64;
            count += t - 1;
        }
        Ok((sum, count))
    }
}
