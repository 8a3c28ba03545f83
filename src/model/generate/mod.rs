//! Data-free calibration text (`engine train --calib self`): the full-precision model samples its own
//! sequences, so a user with no dataset can still quantize (the data-free approach of LLM-QAT, Liu et al.
//! 2023: the model's own samples replace the calibration set).
//!
//! Sampling: plain temperature sampling (temperature 0 is greedy), every sequence exactly `len` tokens long,
//! EOS included and decoded past (calibration windows have a fixed length). LLM-QAT's hybrid (greedy for the
//! first 3-5 tokens, then sampling) and top-k/top-p truncation are not used. The first token is the
//! tokenizer's BOS when the tokenizer puts one in front of text (the model always saw it first: llama2.c's
//! stories, Llama 2), else one drawn uniformly from the whole vocabulary, as LLM-QAT does; see
//! [`StartTokens::for_tokenizer`].
//!
//! Determinism: sequence i draws from its own [`Rng`], seeded by the i-th number of `Rng::new(seed)`, so a
//! sequence depends on (seed, i) only, not on how the sequences are batched (checked by the test
//! `sampling_is_deterministic_for_a_seed`; the GEMM gives every row the same arithmetic whatever the rows).
//!
//! Decoding is incremental with a KV cache ([`Decoder`]): the N sequences of a batch advance one token per
//! step together, so every linear is one GEMM [N, C]·Wᵀ. Memory: the decoder dequantizes every block to f32
//! once up front and keeps it resident, packed for the GEMM (SmolLM2-135M: 30 blocks × 3.54 M = 106 M
//! weights, 425 MB, plus a packed copy of the 113 MB output projection beside the model's embedding), and a
//! batch's cache holds 2 · n_layers · N · len · G · D f32 (SmolLM2 at N = [`SAMPLE_BATCH`] = 64 and
//! len = 256: 755 MB; 128 sequences of 256 tokens peaked at 1.5 GB resident).
mod decoder;
#[cfg(test)]
mod tests;

pub use decoder::{Decoder, KvCache};

use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::model::forward::LlamaModel;
use crate::tensor::rng::Rng;
use rayon::prelude::*;

const OP: &str = "generate";

/// Sequences decoded together: at 64 rows SmolLM2 decodes at 50-60 GFLOP per CPU-second (the microkernel's
/// one-core peak is 117; at 8 rows a step is bound by streaming the 540 MB of weights), and the cache stays
/// below 1 GB at 256 tokens (module doc).
pub const SAMPLE_BATCH: usize = 64;

/// How each sampled sequence begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartTokens {
    /// Every sequence starts with this token (the tokenizer's BOS).
    Token(u32),
    /// Each sequence starts with a token drawn uniformly from the vocabulary (LLM-QAT).
    Random,
}

impl StartTokens {
    /// BOS when the tokenizer puts one in front of text, else a random token. A tokenizer that has a BOS but
    /// does not add it (SmolLM2's `<|im_start|>`) gets random starts: the model never saw that token open
    /// plain text, and starting every sequence with it would make chat transcripts.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> StartTokens {
        match tokenizer.bos_id() {
            Some(bos) if tokenizer.add_bos() => StartTokens::Token(bos),
            _ => StartTokens::Random,
        }
    }
}

/// `n` sequences of `len` tokens sampled from `model` at `temperature` (0 = greedy), [`SAMPLE_BATCH`] at a
/// time. The same seed gives the same sequences.
pub fn sample_sequences(
    model: &LlamaModel,
    n: usize,
    len: usize,
    temperature: f32,
    seed: u64,
    start: StartTokens,
) -> Result<Vec<Vec<u32>>> {
    Decoder::new(model)?.sample(n, len, temperature, seed, start, SAMPLE_BATCH)
}

impl Decoder<'_> {
    /// [`sample_sequences`] with a decoder already built and `batch` sequences at a time.
    pub fn sample(
        &self,
        n: usize,
        len: usize,
        temperature: f32,
        seed: u64,
        start: StartTokens,
        batch: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let vocab = self.model().config().vocab;
        if len == 0 || batch == 0 {
            let msg = format!("sequence length {len} and batch {batch} must be positive");
            return Err(Error::invalid(OP, msg));
        }
        if !(temperature >= 0.0 && temperature.is_finite()) {
            let msg = format!("temperature {temperature} must be finite and >= 0");
            return Err(Error::invalid(OP, msg));
        }
        if let StartTokens::Token(id) = start {
            if id as usize >= vocab {
                let msg = format!("start token {id} is outside the vocabulary of {vocab}");
                return Err(Error::invalid(OP, msg));
            }
        }
        let mut seeds = Rng::new(seed);
        let seeds: Vec<u64> = (0..n).map(|_| seeds.next_u64()).collect();
        let mut out = Vec::with_capacity(n);
        for chunk in seeds.chunks(batch) {
            out.extend(self.sample_batch(chunk, len, temperature, start)?);
        }
        Ok(out)
    }

    /// One batch: sequence i uses `Rng::new(seeds[i])`, first for its start token, then for each next token.
    fn sample_batch(
        &self,
        seeds: &[u64],
        len: usize,
        temperature: f32,
        start: StartTokens,
    ) -> Result<Vec<Vec<u32>>> {
        let vocab = self.model().config().vocab;
        let mut rngs: Vec<Rng> = seeds.iter().map(|&s| Rng::new(s)).collect();
        let mut seqs: Vec<Vec<u32>> = rngs
            .iter_mut()
            .map(|rng| {
                let first = match start {
                    StartTokens::Token(id) => id,
                    StartTokens::Random => rng.below(vocab) as u32,
                };
                let mut seq = Vec::with_capacity(len);
                seq.push(first);
                seq
            })
            .collect();
        let mut cache = self.cache(seeds.len(), len);
        for _ in 1..len {
            let last: Vec<u32> = seqs.iter().map(|s| s[s.len() - 1]).collect();
            let logits = self.step(&mut cache, &last)?;
            let next: Vec<Result<u32>> = logits
                .par_chunks(vocab)
                .zip(rngs.par_iter_mut())
                .map(|(l, rng)| sample_token(l, temperature, rng))
                .collect();
            for (seq, id) in seqs.iter_mut().zip(next) {
                seq.push(id?);
            }
        }
        Ok(seqs)
    }
}

/// A token drawn from softmax(logits / temperature) with one uniform draw of `rng` (inverse CDF in f64);
/// temperature 0 takes the first largest logit and draws nothing. Errors on NaN or +inf logits.
pub fn sample_token(logits: &[f32], temperature: f32, rng: &mut Rng) -> Result<u32> {
    if logits.is_empty() {
        return Err(Error::invalid(OP, "no logits to sample from"));
    }
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::INFINITY {
            return Err(Error::invalid(OP, format!("logit {i} is {l}")));
        }
        if l > logits[best] {
            best = i;
        }
    }
    if temperature == 0.0 {
        return Ok(best as u32);
    }
    let (max, inv_t) = (logits[best] as f64, 1.0 / temperature as f64);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) * inv_t).exp())
        .collect();
    let mut u = rng.uniform() * weights.iter().sum::<f64>();
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return Ok(i as u32);
        }
        u -= w;
    }
    // Rounding of the running difference can leave u just past the last weight: take the last token
    // that has any probability.
    let last = weights.iter().rposition(|&w| w > 0.0).unwrap_or(best);
    Ok(last as u32)
}
