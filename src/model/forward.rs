//! The whole Llama model on the CPU, no-grad: embedding, the blocks, the final RMSNorm and the output
//! projection, for logits and for the next-token NLL that perplexity needs.
//!
//! Memory: the embedding, the final norm and the output projection (the embedding itself when tied) stay
//! resident; block weights are dequantized one block at a time. A batch of sequences runs layer-major (block 0
//! on every sequence, then block 1 ...), so one block's f32 weights are live at a time, and the hidden states
//! [B, T, C] are the only activations kept between blocks. Logits are computed `LOGIT_ROWS` rows at a time and
//! reduced to NLL at once, never as a [B·T, V] buffer (4 GiB at B·T = 16384 and SmolLM2's V = 49152).
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::model::llama::{block_forward_with, BlockVars, BlockWeights, LlamaConfig};
use crate::model::source::WeightSource;
use crate::ops::cross_entropy::cross_entropy_nll_sum;
use crate::ops::embedding::embedding_fwd_cpu;
use crate::ops::gemm::sgemm;
use crate::ops::linear::linear;
use crate::ops::rmsnorm::rmsnorm_fwd_cpu;
use crate::tensor::Tensor;
use crate::train::pipeline::BlockSource;

const OP: &str = "LlamaModel";

/// Rows of logits alive at once: 256 × 49152 f32 is 48 MiB.
const LOGIT_ROWS: usize = 256;

/// Target of the rows that predict nothing; token ids are never negative.
const NO_TARGET: i32 = -1;

/// A Llama model whose blocks come from a [`WeightSource`] on demand.
pub struct LlamaModel {
    source: Box<dyn WeightSource>,
    embedding: Tensor,
    final_norm: Tensor,
    lm_head: Option<Tensor>,
}

impl LlamaModel {
    /// Loads the resident tensors (embedding, final norm, untied output projection) and checks their shapes.
    pub fn new(source: Box<dyn WeightSource>) -> Result<LlamaModel> {
        let cfg = source.config();
        cfg.validate()?;
        let (v, c) = (cfg.vocab, cfg.hidden);
        let embedding = source.embedding()?;
        let final_norm = source.final_norm()?;
        let lm_head = source.lm_head()?;
        let check = |what: &str, t: &Tensor, want: &[usize]| {
            if t.shape() == want {
                return Ok(());
            }
            let msg = format!("{what} {:?}, expected {want:?}", t.shape());
            Err(Error::format(source.path(), what, msg))
        };
        check("embedding", &embedding, &[v, c])?;
        check("final norm", &final_norm, &[c])?;
        if let Some(head) = &lm_head {
            check("output projection", head, &[v, c])?;
        }
        Ok(LlamaModel {
            source,
            embedding,
            final_norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        self.source.config()
    }

    pub fn source(&self) -> &dyn WeightSource {
        self.source.as_ref()
    }

    /// The token embedding [V, C].
    pub fn embedding(&self) -> &Tensor {
        &self.embedding
    }

    /// The weight of the final RMSNorm [C].
    pub fn final_norm(&self) -> &Tensor {
        &self.final_norm
    }

    /// The output projection [V, C]: the embedding when tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }

    /// The common length T of `windows`, after checking that there is at least one, all have T > 0 tokens
    /// and every id is in the vocabulary.
    pub(crate) fn check_windows(&self, windows: &[Vec<u32>]) -> Result<usize> {
        let t = match windows.first() {
            Some(w) if !w.is_empty() => w.len(),
            _ => return Err(Error::invalid(OP, "needs at least one non-empty sequence")),
        };
        if let Some(span) = self.source.attention_window().filter(|&s| t > s) {
            let msg = format!(
                "sequences of {t} tokens exceed the model's sliding attention window of {span}, which \
                 is not implemented (attention here is full causal); use at most {span} tokens"
            );
            return Err(Error::invalid(OP, msg));
        }
        let v = self.config().vocab;
        for (i, w) in windows.iter().enumerate() {
            if w.len() != t {
                let msg = format!("sequence {i} has {} tokens, sequence 0 has {t}", w.len());
                return Err(Error::shape(OP, msg));
            }
            if let Some(p) = w.iter().position(|&id| id as usize >= v) {
                let msg = format!(
                    "token id {} at position {p} of sequence {i} is outside the vocabulary of {v}",
                    w[p]
                );
                return Err(Error::invalid(OP, msg));
            }
        }
        Ok(t)
    }

    /// The final-normed hidden states [B·T, C] of `windows` (B sequences of T tokens each), run layer-major.
    pub fn hidden_states(&self, windows: &[Vec<u32>]) -> Result<Vec<f32>> {
        let t = self.check_windows(windows)?;
        let cfg = self.config();
        let (b, c) = (windows.len(), cfg.hidden);
        let mut x = vec![0.0; b * t * c];
        embedding_fwd_cpu(&mut x, self.embedding.f32s(OP)?, &windows.concat(), c);
        let mut x = Tensor::from_vec(&[b, t, c], x)?;
        for i in 0..cfg.n_layers {
            let weights = self.source.block(i)?;
            let bias = self.source.qkv_bias(i)?;
            x = run_block(cfg, &weights, bias.as_ref(), x)?;
        }
        let mut out = vec![0.0; b * t * c];
        let mut rstd = vec![0.0; b * t];
        rmsnorm_fwd_cpu(
            &mut out,
            &mut rstd,
            x.f32s(OP)?,
            self.final_norm.f32s(OP)?,
            cfg.rms_eps,
        );
        Ok(out)
    }

    /// logits [n, V] of final-normed rows [n, C] into `out`.
    fn project(&self, rows: &[f32], out: &mut [f32]) -> Result<()> {
        let (v, c) = (self.config().vocab, self.config().hidden);
        let n = rows.len() / c;
        sgemm(
            false,
            true,
            n,
            v,
            c,
            1.0,
            rows,
            self.head().f32s(OP)?,
            0.0,
            out,
        );
        Ok(())
    }

    /// The logits [T, V] of one sequence (every position).
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        let h = self.hidden_states(&[ids.to_vec()])?;
        let v = self.config().vocab;
        let mut out = vec![0.0; ids.len() * v];
        self.project(&h, &mut out)?;
        Tensor::from_vec(&[ids.len(), v], out)
    }

    /// Next-token NLL of every window, summed in f64, and the number of predicted tokens: position p of a
    /// window predicts token p + 1, so a window of T tokens contributes T − 1 predictions. All windows must
    /// have the same length; they run as one batch (callers bound the batch to bound memory).
    pub fn nll(&self, windows: &[Vec<u32>]) -> Result<(f64, usize)> {
        let h = self.hidden_states(windows)?;
        let (t, v, c) = (windows[0].len(), self.config().vocab, self.config().hidden);
        let mut buf = Vec::with_capacity(LOGIT_ROWS.min(t) * v);
        let (mut sum, mut count) = (0.0, 0);
        for (w, ids) in windows.iter().enumerate() {
            let rows = &h[w * t * c..][..(t - 1) * c];
            let targets: Vec<i32> = ids[1..].iter().map(|&id| id as i32).collect();
            for (x, tg) in rows.chunks(LOGIT_ROWS * c).zip(targets.chunks(LOGIT_ROWS)) {
                buf.resize(tg.len() * v, 0.0);
                self.project(x, &mut buf)?;
                let logits = Tensor::from_vec(&[tg.len(), v], std::mem::take(&mut buf))?;
                let (s, n) = cross_entropy_nll_sum(&logits, tg, NO_TARGET)?;
                sum += s;
                count += n;
                buf = logits.into_f32_vec().expect("host f32 logits");
            }
        }
        Ok((sum, count))
    }
}

/// One block on hidden states x [B, T, C], no-grad; `qkv_bias` adds to the q, k and v projections.
pub(crate) fn run_block(
    cfg: &LlamaConfig,
    weights: &BlockWeights,
    qkv_bias: Option<&[Tensor; 3]>,
    x: Tensor,
) -> Result<Tensor> {
    let mut tape = Tape::new();
    let vars = BlockVars::register(&mut tape, weights, None)?;
    let mut bias = [None; 7];
    if let Some(b) = qkv_bias {
        for (slot, t) in bias.iter_mut().zip(b) {
            *slot = Some(tape.param(t.clone())?);
        }
    }
    tape.no_grad(|tape| {
        let xv = tape.input(x);
        let y = block_forward_with(
            tape,
            cfg,
            (vars.attn_norm, false),
            vars.ffn_norm,
            xv,
            &mut |tape, i, input| linear(tape, input, vars.linears[i].weight, bias[i]),
        )?;
        Ok(std::mem::replace(tape.value_mut(y), Tensor::scalar(0.0)))
    })
}

/// Block-AP reads a real model through this: blocks on demand, embeddings from the resident table.
impl BlockSource for LlamaModel {
    fn config(&self) -> &LlamaConfig {
        self.source.config()
    }

    /// Refuses blocks with q/k/v biases: the Block-AP block has no bias to train or apply.
    fn block(&self, i: usize) -> Result<BlockWeights> {
        if self.source.qkv_bias(i)?.is_some() {
            let msg = format!(
                "{}: block {i} has q/k/v biases (Qwen2), which Block-AP does not support yet",
                self.source.path().display()
            );
            return Err(Error::invalid(OP, msg));
        }
        self.source.block(i)
    }

    fn embed(&self, ids: &[u32], n: usize, t: usize) -> Result<Tensor> {
        let windows: Vec<Vec<u32>> = ids.chunks(t.max(1)).map(<[u32]>::to_vec).collect();
        if ids.len() != n * t {
            let msg = format!("{} ids for {n} sequences of {t} tokens", ids.len());
            return Err(Error::shape(OP, msg));
        }
        self.check_windows(&windows)?;
        let c = self.config().hidden;
        let mut x = vec![0.0; n * t * c];
        embedding_fwd_cpu(&mut x, self.embedding.f32s(OP)?, ids, c);
        Tensor::from_vec(&[n, t, c], x)
    }
}
