//! Encoding and decoding, and the accessors.
use std::collections::HashMap;

use super::spm::SPACE_SYMBOL;
use super::{byte_to_unicode, Metaspace, Model, SpecialIds, TokenKind, Tokenizer, OP};
use crate::error::{Error, Result};

impl Tokenizer {
    /// The ids of `text` read as plain text (special-token text is tokenized like any other text).
    /// Adds no BOS or EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_segments(text, false)
    }

    /// The ids of `text` with control, unknown and user-defined tokens matched by their text (for chat
    /// markup such as `<|im_start|>user\n...<|im_end|>`). Adds no BOS or EOS.
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        self.encode_segments(text, true)
    }

    /// The text of `ids`. Control and user-defined tokens appear as their text; SentencePiece models drop
    /// the one leading space their dummy prefix put there. Bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let unicode_to_byte: HashMap<char, u8> = match self.model {
            Model::ByteLevel { .. } => (0..=255u8)
                .map(|b| (byte_to_unicode()[b as usize], b))
                .collect(),
            _ => HashMap::new(),
        };
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4];
        for &id in ids {
            let text = self.tokens.get(id as usize).ok_or_else(|| {
                let msg = format!(
                    "decode: id {id} outside a vocabulary of {}",
                    self.tokens.len()
                );
                Error::invalid(OP, msg)
            })?;
            match (self.kinds[id as usize], &self.model) {
                (TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined, _) => {
                    bytes.extend_from_slice(text.as_bytes())
                }
                (TokenKind::Byte, _) => match parse_byte_token(text) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(text.as_bytes()),
                },
                (_, Model::ByteLevel { .. }) => {
                    for c in text.chars() {
                        match unicode_to_byte.get(&c) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
                        }
                    }
                }
                _ => bytes.extend_from_slice(text.replace(SPACE_SYMBOL, " ").as_bytes()),
            }
        }
        let prepends = match &self.model {
            Model::ByteLevel { .. } => false,
            Model::Spm(m) => m.options.add_dummy_prefix,
            Model::MetaspaceBpe { rule, .. } => match rule {
                Metaspace::Legacy => true,
                Metaspace::PreTokenizer { prepend, .. } => *prepend,
            },
        };
        let start = usize::from(prepends && bytes.first() == Some(&b' '));
        Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The spelling of token `id` as the vocabulary stores it (GPT-2 byte-to-unicode form for byte-level BPE,
    /// `▁` for spaces in SentencePiece).
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_id(&self, spelling: &str) -> Option<u32> {
        self.vocab.get(spelling).copied()
    }

    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    pub fn special_ids(&self) -> SpecialIds {
        self.ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.ids.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.ids.eos
    }

    /// Whether the model expects a BOS in front of its input (GGUF `tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.ids.add_bos
    }

    /// Cuts `text` at the special tokens it may match and tokenizes the text between them.
    fn encode_segments(&self, text: &str, control: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut words = Vec::new();
        let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
        let bytes = text.as_bytes();
        let (mut start, mut pos) = (0, 0);
        while pos < bytes.len() {
            let special = self.specials_by_byte[bytes[pos] as usize]
                .iter()
                .copied()
                .find(|&id| {
                    (control || self.kinds[id as usize] == TokenKind::UserDefined)
                        && bytes[pos..].starts_with(self.tokens[id as usize].as_bytes())
                });
            match special {
                Some(id) => {
                    self.encode_text(&text[start..pos], start, &mut words, &mut cache, &mut out);
                    out.push(id);
                    pos += self.tokens[id as usize].len();
                    start = pos;
                }
                None => pos += 1,
            }
        }
        self.encode_text(&text[start..], start, &mut words, &mut cache, &mut out);
        out
    }

    /// Tokenizes one stretch of text without special tokens; `offset` is where it starts in the input.
    fn encode_text<'t>(
        &self,
        text: &'t str,
        offset: usize,
        words: &mut Vec<(usize, usize)>,
        cache: &mut HashMap<&'t str, Vec<u32>>,
        out: &mut Vec<u32>,
    ) {
        if text.is_empty() {
            return;
        }
        match &self.model {
            Model::ByteLevel { bpe, pre } => {
                let table = byte_to_unicode();
                let spelled = |w: &str| w.bytes().map(|b| table[b as usize]).collect::<String>();
                pre.split(text, words);
                for &(a, b) in words.iter() {
                    let word = &text[a..b];
                    if let Some(ids) = cache.get(word) {
                        out.extend_from_slice(ids);
                        continue;
                    }
                    let mut ids = Vec::new();
                    bpe.encode_word(word, &self.vocab, spelled, &mut ids);
                    out.extend_from_slice(&ids);
                    cache.insert(word, ids);
                }
            }
            Model::MetaspaceBpe { bpe, rule } => {
                let replaced = text.replace(' ', "\u{2581}");
                let prepend = match *rule {
                    Metaspace::Legacy => true,
                    Metaspace::PreTokenizer {
                        prepend,
                        first_only,
                        ..
                    } => {
                        prepend
                            && (!first_only || offset == 0)
                            && !replaced.starts_with(SPACE_SYMBOL)
                    }
                };
                let normalized = if prepend {
                    format!("{SPACE_SYMBOL}{replaced}")
                } else {
                    replaced
                };
                let split = matches!(rule, Metaspace::PreTokenizer { split: true, .. });
                let same = |w: &str| w.to_string();
                if split {
                    // Each `▁` starts a new word (HF's MergedWithNext).
                    let mut cuts: Vec<usize> = normalized
                        .match_indices(SPACE_SYMBOL)
                        .map(|(i, _)| i)
                        .collect();
                    cuts.retain(|&i| i > 0);
                    cuts.push(normalized.len());
                    let mut a = 0;
                    for b in cuts {
                        bpe.encode_word(&normalized[a..b], &self.vocab, same, out);
                        a = b;
                    }
                } else {
                    bpe.encode_word(&normalized, &self.vocab, same, out);
                }
            }
            Model::Spm(spm) => {
                // Every stretch gets the dummy prefix: the first one, and the ones after a special token
                // (llama.cpp's `is_prev_special`).
                let normalized = spm.normalize(text, true);
                spm.encode_normalized(&normalized, &self.vocab, out);
            }
        }
    }
}

/// The byte of a `<0xNN>` token.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::super::PreTokenizer;
    use super::*;

    /// Byte-level vocabulary: 0 `<a>` (control), 1 `<a>b` (control), 2 `<u>` (user-defined), then the 256
    /// byte characters, then "ab" from the one merge "a b".
    fn tokenizer() -> Tokenizer {
        let mut tokens: Vec<String> = ["<a>", "<a>b", "<u>"].map(String::from).to_vec();
        tokens.extend(byte_to_unicode().iter().map(|c| c.to_string()));
        tokens.push("ab".into());
        let mut kinds = vec![
            TokenKind::Control,
            TokenKind::Control,
            TokenKind::UserDefined,
        ];
        kinds.resize(tokens.len(), TokenKind::Normal);
        let ids = SpecialIds {
            bos: Some(0),
            ..SpecialIds::default()
        };
        Tokenizer::bpe(tokens, kinds, [("a", "b")], PreTokenizer::Gpt2, ids).unwrap()
    }

    fn byte(tok: &Tokenizer, b: u8) -> u32 {
        tok.token_id(&byte_to_unicode()[b as usize].to_string())
            .unwrap()
    }

    #[test]
    fn specials_match_leftmost_longest_only_when_asked() {
        let tok = tokenizer();
        let ab = tok.token_id("ab").unwrap();
        let (x, y) = (byte(&tok, b'x'), byte(&tok, b'y'));
        assert_eq!(tok.encode_with_special("x<a>by<a>"), [x, 1, y, 0]);
        // Plain text: "<a>" is text; the user-defined "<u>" still matches.
        let (lt, gt, a) = (byte(&tok, b'<'), byte(&tok, b'>'), byte(&tok, b'a'));
        assert_eq!(tok.encode("<a>ab<u>"), [lt, a, gt, ab, 2]);
        assert_eq!(tok.encode_with_special(""), Vec::<u32>::new());
    }

    #[test]
    fn decode_inverts_encode_and_rejects_unknown_ids() {
        let tok = tokenizer();
        let text = "x<a>b y\n\u{e9}\u{1f980}<u>";
        assert_eq!(tok.decode(&tok.encode_with_special(text)).unwrap(), text);
        assert_eq!(tok.decode(&tok.encode(text)).unwrap(), text);
        let err = tok.decode(&[5, 100_000]).unwrap_err().to_string();
        assert!(err.contains("tokenizer") && err.contains("100000"), "{err}");
    }

    #[test]
    fn bad_parts_are_errors_naming_what_is_wrong() {
        let tokens: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let kinds = vec![TokenKind::Normal; 2];
        let ids = SpecialIds::default();
        let err = |r: Result<Tokenizer>| r.unwrap_err().to_string();
        let e = err(Tokenizer::bpe(
            tokens.clone(),
            kinds.clone(),
            [("a", "b")],
            PreTokenizer::Gpt2,
            ids,
        ));
        assert!(e.contains("\"ab\" is not in the vocabulary"), "{e}");
        let e = err(Tokenizer::bpe(
            tokens.clone(),
            vec![TokenKind::Normal],
            [],
            PreTokenizer::Gpt2,
            ids,
        ));
        assert!(e.contains("1 token kinds for 2 tokens"), "{e}");
        let bad_bos = SpecialIds {
            bos: Some(7),
            ..ids
        };
        let e = err(Tokenizer::bpe(
            tokens.clone(),
            kinds.clone(),
            [],
            PreTokenizer::Gpt2,
            bad_bos,
        ));
        assert!(e.contains("bos id 7 outside a vocabulary of 2"), "{e}");
        let options = super::super::SpmOptions {
            add_dummy_prefix: true,
            remove_extra_whitespaces: false,
        };
        let e = err(Tokenizer::spm(tokens, vec![0.0], kinds, options, ids));
        assert!(e.contains("1 scores for 2 tokens"), "{e}");
    }

    #[test]
    fn parse_byte_token_reads_only_byte_tokens() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x0>"), None);
        assert_eq!(parse_byte_token("<s>"), None);
    }
}
