//! The incremental decoder: one new token per sequence per step through every block, attending over a KV cache.
//!
//! Step at position p for a batch of N sequences (x [N, C] the new tokens' embeddings), per block:
//!   h = rmsnorm(x) ; q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ ; q, k = rope(q, k at p) ; cache[p] = k, v
//!   x += attend(q, cache[0..=p])·Woᵀ ; h2 = rmsnorm(x) ; x += (silu(h2·Wgᵀ) ∘ h2·Wuᵀ)·Wdᵀ
//! then logits = rmsnorm(x)·headᵀ [N, V]: the same maths as `LlamaModel::logits` at position p, whose rows
//! are the reference (tests).
use super::OP;
use crate::error::{Error, Result};
use crate::model::forward::LlamaModel;
use crate::model::llama::BlockWeights;
use crate::ops::embedding::embedding_fwd_cpu;
use crate::ops::gemm::{sgemm_packed, PackedB};
use crate::ops::rmsnorm::rmsnorm_fwd_cpu;
use crate::ops::rope::{rope_fwd_cpu, RopeTable};
use crate::ops::simd;
use crate::ops::swiglu::swiglu_fwd_cpu;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Keys (after RoPE) and values of every block for a batch of N sequences, each [N, capacity, G, D]; positions
/// 0..len are filled.
pub struct KvCache {
    n: usize,
    capacity: usize,
    len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    /// Positions decoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A model with every block dequantized to f32 and resident, every projection packed for the GEMM once
/// ([`PackedB`], the same size: module doc, 425 MB for SmolLM2-135M's blocks, plus 113 MB for its output
/// projection, a packed copy of the tied embedding).
///
/// Why packed: with few rows (N sequences) sgemm spends most of its time packing B, the weight, on every
/// call (46% of the time at N = 64 on SmolLM2, still 34% from weights transposed to [in, out]); packed once,
/// a step only streams the weights through the microkernel.
pub struct Decoder<'m> {
    model: &'m LlamaModel,
    blocks: Vec<ResidentBlock>,
    head: PackedB,
}

/// One block's weights: the norms, and the seven linears ([out, in]) packed, in `linear_shapes` order.
struct ResidentBlock {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    linears: [PackedB; 7],
}

/// w [out, in] packed as the B of x · wᵀ.
fn packed(w: &Tensor) -> Result<PackedB> {
    let (out, cols) = (w.shape()[0], w.shape()[1]);
    Ok(PackedB::new(true, out, cols, w.f32s(OP)?))
}

impl ResidentBlock {
    fn new(w: BlockWeights) -> Result<ResidentBlock> {
        let [q, k, v, o, g, u, d] = &w.linears;
        let linears = [
            packed(q)?,
            packed(k)?,
            packed(v)?,
            packed(o)?,
            packed(g)?,
            packed(u)?,
            packed(d)?,
        ];
        Ok(ResidentBlock {
            attn_norm: w.attn_norm,
            ffn_norm: w.ffn_norm,
            linears,
        })
    }
}

/// out [n, out] = x [n, in] · wᵀ + beta · out, w packed.
fn linear_rows(out: &mut [f32], x: &[f32], w: &PackedB, n: usize, beta: f32) {
    sgemm_packed(false, n, 1.0, x, w, beta, out);
}

fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    let mut rstd = vec![0.0; x.len() / w.len()];
    rmsnorm_fwd_cpu(&mut out, &mut rstd, x, w, eps);
    out
}

impl<'m> Decoder<'m> {
    /// Dequantizes and packs every block of `model` once.
    pub fn new(model: &'m LlamaModel) -> Result<Decoder<'m>> {
        let blocks = (0..model.config().n_layers)
            .map(|i| ResidentBlock::new(model.source().block(i)?))
            .collect::<Result<Vec<_>>>()?;
        let head = packed(model.head())?;
        Ok(Decoder {
            model,
            blocks,
            head,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        self.model
    }

    /// An empty cache for `n` sequences of up to `capacity` tokens (allocated in full now).
    pub fn cache(&self, n: usize, capacity: usize) -> KvCache {
        let cfg = self.model.config();
        let size = n * capacity * cfg.n_kv_heads * cfg.head_dim;
        KvCache {
            n,
            capacity,
            len: 0,
            keys: vec![vec![0.0; size]; cfg.n_layers],
            values: vec![vec![0.0; size]; cfg.n_layers],
        }
    }

    /// Runs `tokens` (one per sequence of the cache) at position `cache.len()`, appends their keys and values,
    /// and returns the logits [N, V] of that position.
    pub fn step(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let cfg = self.model.config();
        let (c, v) = (cfg.hidden, cfg.vocab);
        if cache.n == 0 {
            return Err(Error::invalid(
                OP,
                "a cache of 0 sequences has nothing to decode",
            ));
        }
        if tokens.len() != cache.n {
            let msg = format!(
                "{} tokens for a cache of {} sequences",
                tokens.len(),
                cache.n
            );
            return Err(Error::shape(OP, msg));
        }
        let size = cache.n * cache.capacity * cfg.n_kv_heads * cfg.head_dim;
        if cache.keys.len() != cfg.n_layers || cache.keys.iter().any(|k| k.len() != size) {
            return Err(Error::invalid(OP, "the cache was made for another model"));
        }
        if cache.len == cache.capacity {
            let msg = format!("the cache is full ({} positions)", cache.capacity);
            return Err(Error::invalid(OP, msg));
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= v) {
            let msg = format!("token id {id} is outside the vocabulary of {v}");
            return Err(Error::invalid(OP, msg));
        }
        let n = cache.n;
        let mut x = vec![0.0; n * c];
        embedding_fwd_cpu(&mut x, self.model.embedding().f32s(OP)?, tokens, c);
        let rope = RopeTable::new(1, cfg.head_dim, cache.len, cfg.rope_base);
        for (i, w) in self.blocks.iter().enumerate() {
            self.block_step(w, &rope, cache, i, &mut x)?;
        }
        cache.len += 1;
        let h = rmsnorm_rows(&x, self.model.final_norm().f32s(OP)?, cfg.rms_eps);
        let mut logits = vec![0.0; n * v];
        linear_rows(&mut logits, &h, &self.head, n, 0.0);
        Ok(logits)
    }

    /// Block `i` on x [N, C] at position `cache.len`, in place.
    fn block_step(
        &self,
        w: &ResidentBlock,
        rope: &RopeTable,
        cache: &mut KvCache,
        i: usize,
        x: &mut [f32],
    ) -> Result<()> {
        let cfg = self.model.config();
        let (n, eps) = (cache.n, cfg.rms_eps);
        let (h, g, d, f) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate);
        let [wq, wk, wv, wo, wg, wu, wd] = &w.linears;

        let hn = rmsnorm_rows(x, w.attn_norm.f32s(OP)?, eps);
        let (mut q, mut k, mut v) = (
            vec![0.0; n * h * d],
            vec![0.0; n * g * d],
            vec![0.0; n * g * d],
        );
        linear_rows(&mut q, &hn, wq, n, 0.0);
        linear_rows(&mut k, &hn, wk, n, 0.0);
        linear_rows(&mut v, &hn, wv, n, 0.0);
        let (mut q_rot, mut k_rot) = (vec![0.0; q.len()], vec![0.0; k.len()]);
        rope_fwd_cpu(&mut q_rot, &q, [n, 1, h, d], rope, cfg.rope_layout);
        rope_fwd_cpu(&mut k_rot, &k, [n, 1, g, d], rope, cfg.rope_layout);

        let (pos, row) = (cache.len, g * d);
        let (keys, values) = (&mut cache.keys[i], &mut cache.values[i]);
        for s in 0..n {
            let at = (s * cache.capacity + pos) * row;
            keys[at..at + row].copy_from_slice(&k_rot[s * row..][..row]);
            values[at..at + row].copy_from_slice(&v[s * row..][..row]);
        }
        let mut att = vec![0.0; n * h * d];
        attend(
            &mut att,
            &q_rot,
            keys,
            values,
            [h, g, d],
            cache.capacity,
            pos + 1,
        );
        linear_rows(x, &att, wo, n, 1.0);

        let hn2 = rmsnorm_rows(x, w.ffn_norm.f32s(OP)?, eps);
        let (mut gate, mut up) = (vec![0.0; n * f], vec![0.0; n * f]);
        linear_rows(&mut gate, &hn2, wg, n, 0.0);
        linear_rows(&mut up, &hn2, wu, n, 0.0);
        let mut act = vec![0.0; n * f];
        swiglu_fwd_cpu(&mut act, &gate, &up);
        linear_rows(x, &act, wd, n, 1.0);
        Ok(())
    }
}

/// out [N, H, D]: each sequence's query heads q [N, H, D] attend over its cached positions 0..t
/// (keys, values [N, capacity, G, D]); query head h reads key/value head h / (H/G); scores scaled by 1/sqrt(D).
fn attend(
    out: &mut [f32],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    [h, g, d]: [usize; 3],
    capacity: usize,
    t: usize,
) {
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (s, kv) = (i / h, (i % h) / (h / g));
        let q = &q[i * d..][..d];
        let at = |j: usize| ((s * capacity + j) * g + kv) * d;
        let mut scores: Vec<f32> = (0..t)
            .map(|j| simd::dot(q, &keys[at(j)..][..d]) * scale)
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0.0;
        for x in &mut scores {
            *x = (*x - max).exp();
            sum += *x;
        }
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            simd::axpy(o, p / sum, &values[at(j)..][..d]);
        }
    });
}
