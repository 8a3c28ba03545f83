//! The Llama decoder block, built from ops on the tape, with optional fake quantization of its seven linears.
//!
//! Block (HF `LlamaDecoderLayer`):
//!   h = rmsnorm(x) ; q,k,v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ ; q,k = rope(q), rope(k) ; a = attention(q, k, v)
//!   x1 = x + a·Woᵀ ; h2 = rmsnorm(x1) ; out = x1 + (silu(h2·Wgᵀ) ∘ h2·Wuᵀ)·Wdᵀ
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::ops::rope::RopeLayout;
use crate::ops::{add, attention, linear, reshape, rmsnorm, rope, swiglu};
use crate::quant::fake_quant::{
    fake_quant_linear, fake_quant_linear_bf16_out, init_minmax, QuantConfig,
};
use crate::tensor::{rng::Rng, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_layers: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_layout: RopeLayout,
    pub tie_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attn_bias: bool,
}

impl LlamaConfig {
    /// SmolLM2-135M: 30 blocks of hidden 576, FFN 1536, 9 query / 3 key-value heads of 64.
    pub fn smollm2_135m() -> Self {
        LlamaConfig {
            hidden: 576,
            intermediate: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            n_layers: 30,
            vocab: 49152,
            rms_eps: 1e-5,
            rope_base: 100_000.0,
            rope_layout: RopeLayout::HalfSplit,
            tie_embeddings: true,
            attn_bias: false,
        }
    }

    /// Checks the head arithmetic the ops rely on.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("LlamaConfig", msg));
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "n_heads {} must be a positive multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be positive and even (rope rotates pairs)",
                self.head_dim
            ));
        }
        if self.hidden == 0 || self.intermediate == 0 {
            return bad(format!(
                "hidden {} and intermediate {} must be positive",
                self.hidden, self.intermediate
            ));
        }
        Ok(())
    }

    /// (name, out features, in features) of the seven linears, in checkpoint order.
    pub fn linear_shapes(&self) -> [(&'static str, usize, usize); 7] {
        let (c, f) = (self.hidden, self.intermediate);
        let (qd, kvd) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        [
            ("q_proj", qd, c),
            ("k_proj", kvd, c),
            ("v_proj", kvd, c),
            ("o_proj", c, qd),
            ("gate_proj", f, c),
            ("up_proj", f, c),
            ("down_proj", c, f),
        ]
    }
}

/// Host weights of one block. `linears` follows `LlamaConfig::linear_shapes` order.
#[derive(Clone, Debug)]
pub struct BlockWeights {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub linears: [Tensor; 7],
}

impl BlockWeights {
    /// Random weights with the scale of a trained model (std 0.02, norms near 1), for tests and benchmarks.
    pub fn random(cfg: &LlamaConfig, rng: &mut Rng) -> BlockWeights {
        let norm = |rng: &mut Rng| {
            Tensor::from_vec(&[cfg.hidden], rng.uniform_vec(cfg.hidden, 0.8, 1.2))
                .expect("hidden-sized vector")
        };
        let attn_norm = norm(rng);
        let ffn_norm = norm(rng);
        let linears = cfg
            .linear_shapes()
            .map(|(_, n, k)| Tensor::randn(&[n, k], 0.02, rng));
        BlockWeights {
            attn_norm,
            ffn_norm,
            linears,
        }
    }
}

/// One linear on the tape: its weight, and its trainable scales and zeros when fake-quantized.
#[derive(Clone, Copy, Debug)]
pub struct LinearVars {
    pub weight: Var,
    pub quant: Option<(Var, Var)>,
}

/// A block's parameters registered on a tape.
#[derive(Clone, Debug)]
pub struct BlockVars {
    pub attn_norm: Var,
    pub ffn_norm: Var,
    pub linears: [LinearVars; 7],
    pub quant: Option<QuantConfig>,
}

impl BlockVars {
    /// Registers the block's weights as trainable parameters; with `quant`, also min-max initialised scales and
    /// zeros for every linear. Order: norms, then per linear (weight, scales, zeros).
    pub fn register(
        tape: &mut Tape,
        w: &BlockWeights,
        quant: Option<QuantConfig>,
    ) -> Result<BlockVars> {
        let attn_norm = tape.param(w.attn_norm.clone())?;
        let ffn_norm = tape.param(w.ffn_norm.clone())?;
        let mut linears = Vec::with_capacity(7);
        for lw in &w.linears {
            let weight = tape.param(lw.clone())?;
            let q = match quant {
                Some(cfg) => {
                    let (s, z) = init_minmax(lw, cfg)?;
                    Some((tape.param(s)?, tape.param(z)?))
                }
                None => None,
            };
            linears.push(LinearVars { weight, quant: q });
        }
        let linears: [LinearVars; 7] = linears.try_into().expect("seven linears");
        Ok(BlockVars {
            attn_norm,
            ffn_norm,
            linears,
            quant,
        })
    }

    /// The current (trained) host weights read back from the tape.
    pub fn weights(&self, tape: &Tape) -> BlockWeights {
        BlockWeights {
            attn_norm: tape.value(self.attn_norm).clone(),
            ffn_norm: tape.value(self.ffn_norm).clone(),
            linears: self.linears.map(|l| tape.value(l.weight).clone()),
        }
    }
}

/// The block on x [B, T, C] -> [B, T, C]. Positions start at 0 for every sequence.
pub fn block_forward(tape: &mut Tape, cfg: &LlamaConfig, vars: &BlockVars, x: Var) -> Result<Var> {
    // In the GPU's bf16 mode these outputs are bf16, as torch.autocast keeps them: q, k, v (which only rope and
    // the tensor-core attention read, where it has kernels for the head dim) and gate, up (only SwiGLU reads them).
    #[cfg(feature = "cuda")]
    let qkv_bf16 = crate::ops::attention::has_bf16_kernels(cfg.head_dim);
    #[cfg(not(feature = "cuda"))]
    let qkv_bf16 = false;
    // q, k and v all fake-quantized linears in the bf16 mode (bf16 or f32 outputs: fake_quant_linear's bf16 path
    // either way) on a block input that needs no gradient (Block-AP): the attention norm folds into them
    // (ops::rmsnorm::fold) and dx of q, k, v is never computed.
    #[cfg(feature = "cuda")]
    let bf16_mode = tape
        .value(x)
        .gpu("block_forward")
        .is_ok_and(|b| b.ctx().matmul_bf16());
    #[cfg(not(feature = "cuda"))]
    let bf16_mode = false;
    let fold_attn_norm = bf16_mode
        && vars.quant.is_some()
        && vars.linears[..3].iter().all(|l| l.quant.is_some())
        && !tape.needs_grad(&[x])
        && tape.needs_grad(&[vars.attn_norm]);
    block_forward_with(
        tape,
        cfg,
        (vars.attn_norm, fold_attn_norm),
        vars.ffn_norm,
        x,
        &mut |tape, i, input| {
            let l = vars.linears[i];
            match (l.quant, vars.quant) {
                (Some((s, z)), Some(cfg)) if matches!(i, 4 | 5) || (qkv_bf16 && i < 3) => {
                    fake_quant_linear_bf16_out(tape, input, l.weight, s, z, cfg)
                }
                (Some((s, z)), Some(cfg)) => fake_quant_linear(tape, input, l.weight, s, z, cfg),
                _ => linear::linear(tape, input, l.weight, None),
            }
        },
    )
}

/// The block body with its seven linears supplied by `apply_linear(tape, i, input)`, i in
/// `LlamaConfig::linear_shapes` order: fake-quantized weights in Block-AP, packed real-quant linears in E2E-QP.
pub fn block_forward_with(
    tape: &mut Tape,
    cfg: &LlamaConfig,
    (attn_norm, fold_attn_norm): (Var, bool),
    ffn_norm: Var,
    x: Var,
    apply_linear: &mut dyn FnMut(&mut Tape, usize, Var) -> Result<Var>,
) -> Result<Var> {
    let shape = tape.value(x).shape().to_vec();
    if shape.len() != 3 || shape[2] != cfg.hidden {
        return Err(Error::shape(
            "block_forward",
            format!("input {shape:?}, expected [B, T, {}]", cfg.hidden),
        ));
    }
    let (b, t) = (shape[0], shape[1]);
    let (h, g, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);

    #[cfg(feature = "cuda")]
    let hn = match fold_attn_norm {
        true => rmsnorm::rmsnorm_folded(tape, x, attn_norm, cfg.rms_eps)?,
        false => rmsnorm::rmsnorm(tape, x, attn_norm, cfg.rms_eps)?,
    };
    #[cfg(not(feature = "cuda"))]
    let hn = {
        let _ = fold_attn_norm;
        rmsnorm::rmsnorm(tape, x, attn_norm, cfg.rms_eps)?
    };
    let q = apply_linear(tape, 0, hn)?;
    let k = apply_linear(tape, 1, hn)?;
    let v = apply_linear(tape, 2, hn)?;
    let q = reshape::reshape(tape, q, &[b, t, h, d])?;
    let k = reshape::reshape(tape, k, &[b, t, g, d])?;
    let v = reshape::reshape(tape, v, &[b, t, g, d])?;
    let q = rope::rope(tape, q, 0, cfg.rope_base, cfg.rope_layout)?;
    let k = rope::rope(tape, k, 0, cfg.rope_base, cfg.rope_layout)?;
    let a = attention::attention(tape, q, k, v)?;
    let a = reshape::reshape(tape, a, &[b, t, h * d])?;
    let o = apply_linear(tape, 3, a)?;
    let (x1, hn2) = rmsnorm::add_rmsnorm(tape, x, o, ffn_norm, cfg.rms_eps)?;
    let gate = apply_linear(tape, 4, hn2)?;
    let up = apply_linear(tape, 5, hn2)?;
    let s = swiglu::swiglu(tape, gate, up)?;
    let down = apply_linear(tape, 6, s)?;
    add::add(tape, x1, down)
}
