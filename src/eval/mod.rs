//! Perplexity by the GPTQ / EfficientQAT protocol (EfficientQAT `datautils_block.py` `test_ppl`):
//!
//! 1. the evaluation text is tokenized once, as one string ([`data`] says how files become that string); a
//!    tokenizer that adds BOS (`Tokenizer::add_bos`, e.g. Llama 2) gets one BOS in front of the whole text, as
//!    HF `tokenizer(text)` does; SmolLM2 adds none;
//! 2. the ids are cut into n = len / ctx windows of ctx tokens that do not overlap (the tail is dropped);
//!    `--max-windows` keeps the first N;
//! 3. each window runs on its own from position 0, and position p predicts token p + 1, so a window gives
//!    ctx − 1 predictions (EfficientQAT: `shift_logits = logits[:, :-1]`, `labels = window[:, 1:]`);
//! 4. ppl = exp(mean NLL). EfficientQAT computes exp(Σ_w mean_w · ctx / (n · ctx)), the mean over windows of
//!    the per-window mean NLL; every window has the same ctx − 1 predictions, so that is exactly
//!    exp(Σ NLL / (n · (ctx − 1))), which is what we compute (summed in f64).
pub mod data;
pub mod default_model;

use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::model::LlamaModel;
use crate::train::device::Device;

/// How to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalOptions {
    /// Tokens per window (the sequence length; 2048 in the papers' tables).
    pub ctx: usize,
    /// Evaluate only the first N windows.
    pub max_windows: Option<usize>,
    /// Windows that run together, layer-major (each block's weights are dequantized once per batch).
    pub batch: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            ctx: 2048,
            max_windows: None,
            batch: 8,
        }
    }
}

/// Where an evaluation stands: after each batch, and at the end.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// Windows evaluated so far, of `windows_total`.
    pub windows: usize,
    pub windows_total: usize,
    /// Tokens of the whole text (before windowing).
    pub text_tokens: usize,
    /// Σ NLL (nats) over the predicted tokens so far, and their count.
    pub nll_sum: f64,
    pub predicted: usize,
}

impl Perplexity {
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.predicted as f64
    }
    pub fn ppl(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// The ids the protocol evaluates: `text` tokenized once, after one BOS when the tokenizer adds BOS.
pub fn eval_ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    if tokenizer.add_bos() {
        ids.extend(tokenizer.bos_id());
    }
    ids.extend(tokenizer.encode(text));
    ids
}

/// The non-overlapping windows of `ctx` tokens of `ids` (at most `max_windows`).
pub fn eval_windows(ids: &[u32], ctx: usize, max_windows: Option<usize>) -> Result<Vec<Vec<u32>>> {
    if ctx < 2 {
        let msg = format!("--ctx {ctx}: a window needs at least 2 tokens to predict one");
        return Err(Error::invalid("eval", msg));
    }
    let n = (ids.len() / ctx).min(max_windows.unwrap_or(usize::MAX));
    if n == 0 {
        let msg = format!(
            "the text has {} tokens, fewer than one window of --ctx {ctx} (or --max-windows is 0)",
            ids.len()
        );
        return Err(Error::invalid("eval", msg));
    }
    Ok(ids.chunks_exact(ctx).take(n).map(<[u32]>::to_vec).collect())
}

/// Perplexity of `model` on `text` by the protocol above; `progress` sees the running totals after each batch.
pub fn perplexity(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    text: &str,
    opts: EvalOptions,
    progress: impl FnMut(&Perplexity),
) -> Result<Perplexity> {
    let ids = eval_ids(tokenizer, text);
    let windows = eval_windows(&ids, opts.ctx, opts.max_windows)?;
    perplexity_of_windows(model, &windows, ids.len(), opts.batch, progress)
}

/// What perplexity needs of a model: the summed next-token NLL of a batch of windows and the number of
/// predictions (`LlamaModel::nll` on the CPU, `model::forward_cuda::CudaModel` on a GPU).
pub trait NllModel {
    fn nll(&self, windows: &[Vec<u32>]) -> Result<(f64, usize)>;
}

impl NllModel for LlamaModel {
    fn nll(&self, windows: &[Vec<u32>]) -> Result<(f64, usize)> {
        LlamaModel::nll(self, windows)
    }
}

impl<T: NllModel + ?Sized> NllModel for &T {
    fn nll(&self, windows: &[Vec<u32>]) -> Result<(f64, usize)> {
        (**self).nll(windows)
    }
}

/// `model` scored where `device` says: itself on the CPU; on a GPU, with its resident tensors uploaded.
pub fn scorer<'a>(model: &'a LlamaModel, device: &Device) -> Result<Box<dyn NllModel + 'a>> {
    match device {
        Device::Cpu => Ok(Box::new(model)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ctx) => Ok(Box::new(crate::model::forward_cuda::CudaModel::new(
            model, ctx,
        )?)),
    }
}

/// Perplexity over prepared windows, `batch` windows at a time; `text_tokens` is reported back as is.
pub fn perplexity_of_windows(
    model: &dyn NllModel,
    windows: &[Vec<u32>],
    text_tokens: usize,
    batch: usize,
    mut progress: impl FnMut(&Perplexity),
) -> Result<Perplexity> {
    if batch == 0 {
        return Err(Error::invalid("eval", "--batch must be at least 1"));
    }
    let mut state = Perplexity {
        windows: 0,
        windows_total: windows.len(),
        text_tokens,
        nll_sum: 0.0,
        predicted: 0,
    };
    for group in windows.chunks(batch) {
        let (sum, count) = model.nll(group)?;
        state.nll_sum += sum;
        state.predicted += count;
        state.windows += group.len();
        progress(&state);
    }
    Ok(state)
}
