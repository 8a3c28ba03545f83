//! A tokenizer as HF `tokenizer.json` + `tokenizer_config.json`, so that a checkpoint or an export made from a
//! GGUF model carries a tokenizer every HF runtime (and [`Tokenizer::from_tokenizer_json`]) reads:
//! * byte-level BPE: the vocabulary and merges as they are, with the pre-tokenizer HF spells for it
//!   (`ByteLevel`; `Digits(individual_digits)` + `ByteLevel` for SmolLM; the Llama 3 `Split` + `ByteLevel`);
//! * SentencePiece BPE: converted as transformers' `LlamaConverter` does it (legacy `Prepend("▁")` +
//!   `Replace(" ", "▁")` normalizer, byte fallback). Its merges are every split `l + r` of a mergeable token
//!   whose two parts are symbols (single characters or mergeable tokens), ranked by the token's score,
//!   highest first. SentencePiece breaks ties between equal scores by position (leftmost first) where ranked
//!   BPE breaks them by rank, so the two can differ on vocabularies with tied scores; the tests compare the
//!   ids on WikiText-2.
//!
//! Control, unknown and user-defined tokens also go to `added_tokens` (special = control or unknown), so
//! both HF and our loader match them as our encoder does. Refused: two tokens with the same spelling (a JSON
//! vocabulary holds one), SentencePiece's `remove_extra_whitespaces` (no HF normalizer does it), and a
//! tokenizer that was itself read from a tokenizer.json (copy that file instead).
use std::path::Path;

use serde_json::{json, Map, Value};

use super::pretok::LLAMA3_PATTERN;
use super::{Model, PreTokenizer, TokenKind, Tokenizer, OP, SPACE_SYMBOL};
use crate::error::{Error, Result};
use crate::io::checkpoint::write_atomic;
use crate::io::gguf::{GgufFile, MetaValue};

impl Tokenizer {
    /// The HF `tokenizer.json` of this tokenizer (module docs).
    pub fn to_tokenizer_json(&self) -> Result<Value> {
        let refuse = |msg: String| Err(Error::invalid(OP, format!("tokenizer.json: {msg}")));
        for (i, t) in self.tokens.iter().enumerate() {
            if self.vocab[t] as usize != i {
                return refuse(format!(
                    "tokens {i} and {} are both \"{t}\"; a tokenizer.json vocabulary cannot hold both",
                    self.vocab[t]
                ));
            }
        }
        let space = SPACE_SYMBOL.to_string();
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let unk = self.ids.unk.map(|id| self.tokens[id as usize].clone());
        let (normalizer, pre_tokenizer, decoder, mut model) = match &self.model {
            Model::ByteLevel { bpe, pre } => {
                let pre_tokenizer = match pre {
                    PreTokenizer::Gpt2 => byte_level(true),
                    PreTokenizer::Smollm => json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                    PreTokenizer::Llama3 => json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
                         "invert": false},
                        byte_level(false)]}),
                };
                let mut ranked: Vec<(u32, u32, u32)> = bpe
                    .merges
                    .iter()
                    .map(|(&(l, r), &(rank, _))| (rank, l, r))
                    .collect();
                ranked.sort_unstable();
                let merges = ranked.into_iter().map(|(_, l, r)| (l, r)).collect();
                // No unk_token: a byte-level BPE without one drops bytes it cannot spell, as ours does.
                let mut model = self.bpe_json(merges, None, false);
                if bpe.ignore_merges {
                    model["ignore_merges"] = json!(true);
                }
                let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
                (Value::Null, pre_tokenizer, decoder, model)
            }
            Model::Spm(spm) => {
                if spm.options.remove_extra_whitespaces {
                    return refuse(
                        "SentencePiece's remove_extra_whitespaces has no HF normalizer".into(),
                    );
                }
                let replace =
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": space});
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": space}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                let normalizer = if spm.options.add_dummy_prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                    json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": space}, replace]})
                } else {
                    replace
                };
                let model = self.bpe_json(self.spm_merges(&spm.scores), unk, true);
                let decoder = json!({"type": "Sequence", "decoders": decoders});
                (normalizer, Value::Null, decoder, model)
            }
            Model::MetaspaceBpe { .. } => {
                return refuse(
                    "this tokenizer was read from a tokenizer.json; copy that file".into(),
                )
            }
        };
        model["vocab"] = Value::Object(
            self.tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), json!(i)))
                .collect::<Map<_, _>>(),
        );
        let added: Vec<Value> = (0..self.tokens.len())
            .filter_map(|i| {
                let special = match self.kinds[i] {
                    TokenKind::Control | TokenKind::Unknown => true,
                    TokenKind::UserDefined => false,
                    _ => return None,
                };
                Some(json!({"id": i, "content": self.tokens[i], "single_word": false, "lstrip": false,
                            "rstrip": false, "normalized": false, "special": special}))
            })
            .collect();
        let post_processor = match (self.ids.add_bos, self.ids.bos) {
            (true, Some(bos)) => {
                let b = &self.tokens[bos as usize];
                let s =
                    |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
                let bos_piece = json!({"SpecialToken": {"id": b, "type_id": 0}});
                json!({"type": "TemplateProcessing",
                       "single": [bos_piece, s("A", 0)],
                       "pair": [bos_piece, s("A", 0), {"SpecialToken": {"id": b, "type_id": 1}}, s("B", 1)],
                       "special_tokens": {b.as_str(): {"id": b, "ids": [bos], "tokens": [b]}}})
            }
            _ => Value::Null,
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
            "model": model,
        }))
    }

    /// The HF `tokenizer_config.json`: BOS, EOS and UNK by text, whether a BOS goes in front, and the chat
    /// template when the model has one.
    pub fn to_tokenizer_config(&self, chat_template: Option<&str>) -> Value {
        let text = |id: Option<u32>| id.map(|i| self.tokens[i as usize].clone());
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": text(self.ids.bos),
            "eos_token": text(self.ids.eos),
            "unk_token": text(self.ids.unk),
            "add_bos_token": self.ids.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(t) = chat_template {
            config["chat_template"] = json!(t);
        }
        config
    }

    /// A BPE model object (vocabulary filled in by the caller). Merges are `"a b"` strings, which every
    /// tokenizers version reads, unless a token holds a space; then `["a", "b"]` pairs (tokenizers ≥ 0.20).
    fn bpe_json(&self, merges: Vec<(u32, u32)>, unk: Option<String>, byte_fallback: bool) -> Value {
        let spaced = merges.iter().any(|&(l, r)| {
            self.tokens[l as usize].contains(' ') || self.tokens[r as usize].contains(' ')
        });
        let merges: Vec<Value> = merges
            .into_iter()
            .map(|(l, r)| {
                let (l, r) = (&self.tokens[l as usize], &self.tokens[r as usize]);
                if spaced {
                    json!([l, r])
                } else {
                    json!(format!("{l} {r}"))
                }
            })
            .collect();
        json!({
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": byte_fallback, "byte_fallback": byte_fallback,
            "vocab": {}, "merges": merges,
        })
    }

    /// SentencePiece's merges as ranked pairs (module docs): by the merged token's score, highest first, then
    /// by its id, then by the ids of the two parts (transformers' `SentencePieceExtractor` order).
    fn spm_merges(&self, scores: &[f32]) -> Vec<(u32, u32)> {
        let mergeable = |id: u32| {
            matches!(
                self.kinds[id as usize],
                TokenKind::Normal | TokenKind::UserDefined | TokenKind::Unused
            )
        };
        // A symbol is a single character or a token a merge can form.
        let symbol = |piece: &str| {
            let id = self.vocab.get(piece).copied()?;
            (mergeable(id) || piece.chars().count() == 1).then_some(id)
        };
        let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            if !mergeable(id as u32) {
                continue;
            }
            for (cut, _) in token.char_indices().skip(1) {
                if let (Some(l), Some(r)) = (symbol(&token[..cut]), symbol(&token[cut..])) {
                    merges.push((scores[id], id as u32, l, r));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then((a.2, a.3).cmp(&(b.2, b.3)))
        });
        merges.into_iter().map(|(_, _, l, r)| (l, r)).collect()
    }
}

/// The tokenizer files of a Hugging Face model directory that travel with it (whichever exist).
pub const HF_TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Writes the tokenizer of the model at `source` into `dir`: a Hugging Face directory's own files
/// ([`HF_TOKENIZER_FILES`], tokenizer.json required), or for a GGUF file `tokenizer` (the one read from it)
/// as tokenizer.json + tokenizer_config.json with the GGUF's chat template. Returns the names written.
pub fn save_tokenizer_files(
    source: &Path,
    tokenizer: &Tokenizer,
    dir: &Path,
) -> Result<Vec<&'static str>> {
    if source.is_dir() {
        return copy_tokenizer_files(source, dir);
    }
    let file = GgufFile::open(source)?;
    let chat_template = match file.metadata("tokenizer.chat_template") {
        Some(MetaValue::Str(t)) => Some(t.as_str()),
        _ => None,
    };
    let json = serde_json::to_vec(&tokenizer.to_tokenizer_json()?)?;
    write_atomic(&dir.join("tokenizer.json"), &json)?;
    let config = serde_json::to_vec_pretty(&tokenizer.to_tokenizer_config(chat_template))?;
    write_atomic(&dir.join("tokenizer_config.json"), &config)?;
    Ok(vec!["tokenizer.json", "tokenizer_config.json"])
}

/// Copies the [`HF_TOKENIZER_FILES`] that exist in `from` to `to`; tokenizer.json must be among them.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<&'static str>> {
    let main = from.join(HF_TOKENIZER_FILES[0]);
    if !main.is_file() {
        return Err(Error::format(
            &main,
            "tokenizer",
            "missing: the model's tokenizer must travel with it",
        ));
    }
    let mut written = Vec::new();
    for name in HF_TOKENIZER_FILES {
        let path = from.join(name);
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            write_atomic(&to.join(name), &bytes)?;
            written.push(name);
        }
    }
    Ok(written)
}
