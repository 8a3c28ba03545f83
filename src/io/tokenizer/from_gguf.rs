//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (shared/formats.md 6.4), read the
//! way llama.cpp's `llama_vocab::load` reads it.
use super::{PreTokenizer, SpecialIds, SpmOptions, TokenKind, Tokenizer};
use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;

impl Tokenizer {
    /// `tokenizer.ggml.model = "gpt2"`: byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names
    /// (`gpt2`, `smollm`, `llama-bpe`) and the `merges`; `"llama"`: SentencePiece BPE over the `scores`.
    /// `add_bos` is `tokenizer.ggml.add_bos_token`, else llama.cpp's default (yes for SentencePiece and
    /// Llama 3, no otherwise); the dummy prefix is `tokenizer.ggml.add_space_prefix`, else on.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let bad = |key: &str, msg: String| Error::format(file.path(), key, msg);
        let opt_u32 = |key: &str| file.metadata(key).map(|_| file.get_u32(key)).transpose();
        let opt_bool = |key: &str| file.metadata(key).map(|_| file.get_bool(key)).transpose();

        let tokens = file.get_str_array("tokenizer.ggml.tokens")?.to_vec();
        let kinds = match file.metadata("tokenizer.ggml.token_type") {
            None => vec![TokenKind::Normal; tokens.len()],
            Some(_) => file
                .get_i32_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|&t| {
                    TokenKind::from_gguf(t).ok_or_else(|| {
                        bad(
                            "tokenizer.ggml.token_type",
                            format!("token type {t} is not 1..=6"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let mut ids = SpecialIds {
            bos: opt_u32("tokenizer.ggml.bos_token_id")?,
            eos: opt_u32("tokenizer.ggml.eos_token_id")?,
            unk: opt_u32("tokenizer.ggml.unknown_token_id")?,
            add_bos: false,
        };
        let add_bos = opt_bool("tokenizer.ggml.add_bos_token")?;
        match file.get_str("tokenizer.ggml.model")? {
            "gpt2" => {
                let name = file.get_str("tokenizer.ggml.pre")?;
                let pre = PreTokenizer::from_gguf_name(name).ok_or_else(|| {
                    let msg = format!("\"{name}\" is not supported (gpt2, smollm, llama-bpe)");
                    bad("tokenizer.ggml.pre", msg)
                })?;
                ids.add_bos = add_bos.unwrap_or(pre == PreTokenizer::Llama3);
                let merges = file.get_str_array("tokenizer.ggml.merges")?;
                let pairs = merges
                    .iter()
                    .enumerate()
                    .map(|(rank, m)| {
                        m.split_once(' ').ok_or_else(|| {
                            bad(
                                "tokenizer.ggml.merges",
                                format!("merge {rank} \"{m}\" is not \"a b\""),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tokenizer::bpe(tokens, kinds, pairs, pre, ids)
            }
            "llama" => {
                let scores = file.get_f32_array("tokenizer.ggml.scores")?.to_vec();
                ids.add_bos = add_bos.unwrap_or(true);
                let options = SpmOptions {
                    add_dummy_prefix: opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true),
                    remove_extra_whitespaces: false,
                };
                Tokenizer::spm(tokens, scores, kinds, options, ids)
            }
            other => {
                let msg = format!("\"{other}\" is not supported (gpt2, llama)");
                Err(bad("tokenizer.ggml.model", msg))
            }
        }
    }
}
