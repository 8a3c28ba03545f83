//! Text to token ids and back, equal to the reference tokenizers id for id:
//! * byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`: SmolLM2, GPT-2, Llama 3), as HF `tokenizers` with
//!   the model's pre-tokenizer (see [`PreTokenizer`]);
//! * SentencePiece BPE (GGUF `"llama"`: Llama 1/2, tinyllamas), as `sentencepiece` / llama.cpp
//!   (`llm_tokenizer_spm`): scores decide the merges, unknown characters fall back to `<0xNN>` byte tokens;
//! * HF tokenizer.json files of both kinds ([`Tokenizer::from_tokenizer_json`]).
//!
//! [`Tokenizer::encode`] reads text as text: the text `<|im_start|>` is not the control token, exactly as
//! llama.cpp with `parse_special = false` (user-defined tokens, which have no control role, still match).
//! [`Tokenizer::encode_with_special`] matches control, unknown and user-defined tokens by their text first
//! (leftmost, longest first) and tokenizes the text between them; use it for chat markup.
//!
//! **Perplexity path:** `encode(text)`, with `bos_id()` in front when `add_bos()` says so. SmolLM2's GGUF says
//! `tokenizer.ggml.add_bos_token = false`, so its ids are the plain text's; SentencePiece GGUFs without the
//! key get a BOS (llama.cpp's default). No EOS is ever added.
mod bpe;
mod encode;
mod from_gguf;
mod json;
mod pretok;
mod spm;
mod to_json;

use std::collections::HashMap;

use crate::error::{Error, Result};
pub use bpe::byte_to_unicode;
use bpe::{BpeModel, Symbols};
pub use pretok::PreTokenizer;
use spm::SpmModel;
pub use spm::{SpmOptions, SPACE_SYMBOL};
pub use to_json::{copy_tokenizer_files, save_tokenizer_files, HF_TOKENIZER_FILES};

const OP: &str = "tokenizer";

/// What a token is (GGUF `tokenizer.ggml.token_type`: 1 normal ... 6 byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    /// BOS, EOS, `<|im_start|>`...: matched in text only by `encode_with_special`.
    Control,
    /// Added by the user; matched in text by both `encode` and `encode_with_special`.
    UserDefined,
    Unused,
    /// `<0xNN>`, a SentencePiece byte-fallback token.
    Byte,
}

impl TokenKind {
    /// The kind of a GGUF token type code.
    pub fn from_gguf(code: i32) -> Option<TokenKind> {
        Some(match code {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => return None,
        })
    }
}

/// The ids a model puts around text, and whether it wants a BOS in front.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
}

/// How the HF form of a SentencePiece tokenizer turns spaces into `▁` before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metaspace {
    /// The legacy `Prepend("▁")` + `Replace(" ", "▁")` normalizer: `▁` in front of every piece of text.
    Legacy,
    /// The `Metaspace` pre-tokenizer: `▁` in front unless the text already starts with one, only for the text
    /// at offset 0 when `first_only`, never when `!prepend`; `split` cuts before every `▁`.
    PreTokenizer {
        prepend: bool,
        first_only: bool,
        split: bool,
    },
}

#[derive(Debug, Clone)]
enum Model {
    ByteLevel { bpe: BpeModel, pre: PreTokenizer },
    MetaspaceBpe { bpe: BpeModel, rule: Metaspace },
    Spm(SpmModel),
}

/// A tokenizer: vocabulary, merge rules and the ids of its special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    vocab: HashMap<String, u32>,
    model: Model,
    ids: SpecialIds,
    /// Per first byte, the control/unknown/user-defined tokens starting with it, longest first.
    specials_by_byte: Vec<Vec<u32>>,
}

impl Tokenizer {
    /// A byte-level BPE tokenizer from its parts: `tokens` in GPT-2 byte-to-unicode spelling, indexed by id;
    /// `merges` in rank order, each the two tokens that merge. Llama 3 gets HF's and llama.cpp's
    /// `ignore_merges` (a word that is a token is that token).
    pub fn bpe<'a>(
        tokens: Vec<String>,
        kinds: Vec<TokenKind>,
        merges: impl IntoIterator<Item = (&'a str, &'a str)>,
        pre: PreTokenizer,
        ids: SpecialIds,
    ) -> Result<Tokenizer> {
        let ignore_merges = pre == PreTokenizer::Llama3;
        Self::byte_level_bpe(tokens, kinds, merges, pre, ignore_merges, ids)
    }

    pub(crate) fn byte_level_bpe<'a>(
        tokens: Vec<String>,
        kinds: Vec<TokenKind>,
        merges: impl IntoIterator<Item = (&'a str, &'a str)>,
        pre: PreTokenizer,
        ignore_merges: bool,
        ids: SpecialIds,
    ) -> Result<Tokenizer> {
        let vocab = Self::vocab(&tokens, &kinds, ids)?;
        let table = byte_to_unicode();
        let byte_ids = std::array::from_fn(|b| vocab.get(&table[b].to_string()).copied());
        let bpe = BpeModel {
            merges: merge_table(&vocab, merges)?,
            symbols: Symbols::ByteLevel { byte_ids },
            ignore_merges,
        };
        let model = Model::ByteLevel { bpe, pre };
        Ok(Self::assemble(tokens, kinds, vocab, model, ids))
    }

    /// A SentencePiece BPE tokenizer from its parts: `tokens` with `▁` for spaces and `<0xNN>` byte tokens,
    /// their `scores` (higher merges first) and `kinds`, all indexed by id.
    pub fn spm(
        tokens: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<TokenKind>,
        options: SpmOptions,
        ids: SpecialIds,
    ) -> Result<Tokenizer> {
        if scores.len() != tokens.len() {
            let msg = format!("{} scores for {} tokens", scores.len(), tokens.len());
            return Err(Error::invalid(OP, msg));
        }
        let vocab = Self::vocab(&tokens, &kinds, ids)?;
        let mergeable = vocab
            .iter()
            .filter(|(_, &id)| {
                let kind = kinds[id as usize];
                matches!(
                    kind,
                    TokenKind::Normal | TokenKind::UserDefined | TokenKind::Unused
                )
            })
            .map(|(t, &id)| (t.clone(), id))
            .collect();
        let model = SpmModel {
            scores,
            mergeable,
            byte_ids: byte_fallback_ids(&vocab),
            unk: ids.unk,
            options,
        };
        Ok(Self::assemble(tokens, kinds, vocab, Model::Spm(model), ids))
    }

    /// The HF BPE form of a SentencePiece tokenizer (tokenizer.json with `▁` and byte fallback).
    pub(crate) fn metaspace_bpe<'a>(
        tokens: Vec<String>,
        kinds: Vec<TokenKind>,
        merges: impl IntoIterator<Item = (&'a str, &'a str)>,
        rule: Metaspace,
        byte_fallback: bool,
        ids: SpecialIds,
    ) -> Result<Tokenizer> {
        let vocab = Self::vocab(&tokens, &kinds, ids)?;
        let char_ids = vocab
            .iter()
            .filter_map(|(t, &id)| {
                let mut cs = t.chars();
                cs.next().filter(|_| cs.next().is_none()).map(|c| (c, id))
            })
            .collect();
        let symbols = Symbols::Chars {
            char_ids,
            byte_ids: byte_fallback.then(|| byte_fallback_ids(&vocab)),
            unk: ids.unk,
        };
        let bpe = BpeModel {
            merges: merge_table(&vocab, merges)?,
            symbols,
            ignore_merges: false,
        };
        let model = Model::MetaspaceBpe { bpe, rule };
        Ok(Self::assemble(tokens, kinds, vocab, model, ids))
    }

    /// Checks the parts common to every model; the vocabulary, spelling -> id.
    fn vocab(
        tokens: &[String],
        kinds: &[TokenKind],
        ids: SpecialIds,
    ) -> Result<HashMap<String, u32>> {
        if kinds.len() != tokens.len() {
            let msg = format!("{} token kinds for {} tokens", kinds.len(), tokens.len());
            return Err(Error::invalid(OP, msg));
        }
        if tokens.len() > u32::MAX as usize {
            return Err(Error::invalid(OP, format!("{} tokens", tokens.len())));
        }
        for (name, id) in [("bos", ids.bos), ("eos", ids.eos), ("unk", ids.unk)] {
            if let Some(id) = id.filter(|&id| id as usize >= tokens.len()) {
                let msg = format!("{name} id {id} outside a vocabulary of {}", tokens.len());
                return Err(Error::invalid(OP, msg));
            }
        }
        // A repeated spelling maps to its last id, as llama.cpp's token_to_id does.
        Ok(tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect())
    }

    fn assemble(
        tokens: Vec<String>,
        kinds: Vec<TokenKind>,
        vocab: HashMap<String, u32>,
        model: Model,
        ids: SpecialIds,
    ) -> Tokenizer {
        let mut specials_by_byte: Vec<Vec<u32>> = vec![Vec::new(); 256];
        for (id, (t, kind)) in tokens.iter().zip(&kinds).enumerate() {
            let matchable = matches!(
                kind,
                TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined
            );
            if matchable && !t.is_empty() {
                specials_by_byte[t.as_bytes()[0] as usize].push(id as u32);
            }
        }
        for list in &mut specials_by_byte {
            list.sort_by_key(|&id| (std::cmp::Reverse(tokens[id as usize].len()), id));
        }
        Tokenizer {
            tokens,
            kinds,
            vocab,
            model,
            ids,
            specials_by_byte,
        }
    }
}

/// (left, right) ids -> (rank, merged id), from merges in rank order.
fn merge_table<'a>(
    vocab: &HashMap<String, u32>,
    merges: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<HashMap<(u32, u32), (u32, u32)>> {
    let mut table = HashMap::new();
    for (rank, (left, right)) in merges.into_iter().enumerate() {
        let id = |t: &str| {
            vocab.get(t).copied().ok_or_else(|| {
                let msg =
                    format!("merge {rank} \"{left} {right}\": \"{t}\" is not in the vocabulary");
                Error::invalid(OP, msg)
            })
        };
        let key = (id(left)?, id(right)?);
        let merged = id(&format!("{left}{right}"))?;
        // A repeated pair takes its last rank, as HF's merge map does.
        table.insert(key, (rank as u32, merged));
    }
    Ok(table)
}

/// `table[b]`: the id of the `<0xNN>` token of byte `b`, if the vocabulary has it.
fn byte_fallback_ids(vocab: &HashMap<String, u32>) -> [Option<u32>; 256] {
    std::array::from_fn(|b| vocab.get(&format!("<0x{b:02X}>")).copied())
}
