//! SentencePiece BPE as `sentencepiece`'s `bpe_model.cc` and llama.cpp's `llm_tokenizer_spm` run it: the
//! text's spaces become `▁` (with one `▁` in front, the dummy prefix), each character starts as a symbol, and
//! the adjacent pair whose concatenation is the highest-scoring mergeable token merges first (leftmost first
//! among equal scores), until no pair is a token. A symbol that is not a token becomes its bytes' `<0xNN>`
//! tokens (byte fallback), or the unknown token.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// `▁` U+2581, SentencePiece's stand-in for a space.
pub const SPACE_SYMBOL: char = '\u{2581}';

/// How SentencePiece normalizes text before merging (its `NormalizerSpec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpmOptions {
    /// Put a `▁` in front of the text (`add_dummy_prefix`; GGUF `tokenizer.ggml.add_space_prefix`).
    pub add_dummy_prefix: bool,
    /// Drop leading and trailing spaces and squeeze runs of spaces to one (`remove_extra_whitespaces`).
    /// Llama's tokenizer.model has it off; llama2.c's tok512.model has it on. GGUF has no key for it and
    /// llama.cpp never does it.
    pub remove_extra_whitespaces: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct SpmModel {
    pub scores: Vec<f32>,
    /// Tokens a merge may form: normal, user-defined and unused ones (sentencepiece's `pieces_`).
    pub mergeable: HashMap<String, u32>,
    /// `byte_ids[b]`: the `<0xNN>` token of byte `b`.
    pub byte_ids: [Option<u32>; 256],
    pub unk: Option<u32>,
    pub options: SpmOptions,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    /// Byte range in the normalized text.
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Ord for Bigram {
    // BinaryHeap pops the greatest: highest score first, then lowest left position.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl SpmModel {
    /// The normalized text: spaces as `▁`, the dummy prefix when `dummy_prefix` and the options ask for it.
    pub fn normalize(&self, text: &str, dummy_prefix: bool) -> String {
        let squeeze = self.options.remove_extra_whitespaces;
        let body = if squeeze {
            text.trim_start_matches(' ')
        } else {
            text
        };
        let mut out = String::with_capacity(body.len() + 3);
        if body.is_empty() {
            return out;
        }
        if self.options.add_dummy_prefix && dummy_prefix {
            out.push(SPACE_SYMBOL);
        }
        let mut prev_space = false;
        for c in body.chars() {
            if c == ' ' {
                if !(squeeze && prev_space) {
                    out.push(SPACE_SYMBOL);
                }
                prev_space = true;
            } else {
                out.push(c);
                prev_space = false;
            }
        }
        if squeeze {
            // sentencepiece trims trailing `▁` after escaping, literal ones in the text included.
            while out.ends_with(SPACE_SYMBOL) {
                out.pop();
            }
        }
        out
    }

    /// Appends the ids of already normalized text.
    pub fn encode_normalized(&self, text: &str, vocab: &HashMap<String, u32>, out: &mut Vec<u32>) {
        let n = text.chars().count();
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            })
            .collect();
        let mut queue = BinaryHeap::new();
        for left in 1..n {
            queue.extend(self.bigram(text, &symbols, left - 1, left));
        }
        while let Some(top) = queue.pop() {
            let (l, r) = (symbols[top.left], symbols[top.right]);
            // A stale entry: one side has merged since it was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != top.len {
                continue;
            }
            symbols[top.left].len += r.len;
            symbols[top.left].next = r.next;
            symbols[top.right].len = 0;
            if let Some(after) = r.next {
                symbols[after].prev = Some(top.left);
                queue.extend(self.bigram(text, &symbols, top.left, after));
            }
            if let Some(before) = l.prev {
                queue.extend(self.bigram(text, &symbols, before, top.left));
            }
        }
        let mut i = (n > 0).then_some(0);
        while let Some(at) = i {
            let s = symbols[at];
            let piece = &text[s.start..s.start + s.len];
            if let Some(&id) = vocab.get(piece) {
                out.push(id);
            } else {
                for b in piece.bytes() {
                    out.extend(self.byte_ids[b as usize].or(self.unk));
                }
            }
            i = s.next;
        }
    }

    fn bigram(&self, text: &str, symbols: &[Symbol], left: usize, right: usize) -> Option<Bigram> {
        let (l, r) = (symbols[left], symbols[right]);
        let piece = &text[l.start..r.start + r.len];
        self.mergeable.get(piece).map(|&id| Bigram {
            score: self.scores[id as usize],
            left,
            right,
            len: piece.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens: 0 <unk>, 1..=256 byte tokens, then "▁", "a", "b", "ab", "▁a", "▁ab" with the given scores.
    fn model(scores: [f32; 6], options: SpmOptions) -> (SpmModel, HashMap<String, u32>) {
        let mut tokens = vec!["<unk>".to_string()];
        tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        tokens.extend(["▁", "a", "b", "ab", "▁a", "▁ab"].map(String::from));
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mergeable = vocab
            .iter()
            .filter(|(_, &id)| id > 256)
            .map(|(t, &id)| (t.clone(), id))
            .collect();
        let mut all_scores = vec![0.0; 257];
        all_scores.extend(scores);
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = Some(b as u32 + 1);
        }
        let m = SpmModel {
            scores: all_scores,
            mergeable,
            byte_ids,
            unk: Some(0),
            options,
        };
        (m, vocab)
    }

    const PLAIN: SpmOptions = SpmOptions {
        add_dummy_prefix: true,
        remove_extra_whitespaces: false,
    };

    fn encode(m: &SpmModel, vocab: &HashMap<String, u32>, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        m.encode_normalized(&m.normalize(text, true), vocab, &mut out);
        out
    }

    #[test]
    fn normalize_prefix_and_squeeze() {
        let (m, _) = model([0.0; 6], PLAIN);
        assert_eq!(m.normalize(" a  b ", true), "▁▁a▁▁b▁");
        assert_eq!(m.normalize("a", false), "a");
        assert_eq!(m.normalize("", true), "");
        let squeeze = SpmOptions {
            remove_extra_whitespaces: true,
            ..PLAIN
        };
        let (m, _) = model([0.0; 6], squeeze);
        assert_eq!(m.normalize("  a   b  ", true), "▁a▁b");
        assert_eq!(m.normalize("   ", true), "");
    }

    #[test]
    fn highest_score_merges_first() {
        // "▁ab": "▁a" (score -1) beats "ab" (score -2), then "▁a"+"b" = "▁ab".
        let (m, v) = model([-9.0, -9.0, -9.0, -2.0, -1.0, -3.0], PLAIN);
        assert_eq!(encode(&m, &v, "ab"), [v["▁ab"]]);
        // With "ab" first, "▁"+"ab" = "▁ab" still forms.
        let (m, v) = model([-9.0, -9.0, -9.0, -1.0, -2.0, -3.0], PLAIN);
        assert_eq!(encode(&m, &v, "ab"), [v["▁ab"]]);
        assert_eq!(encode(&m, &v, "ba"), [v["▁"], v["b"], v["a"]]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let (m, v) = model([0.0; 6], PLAIN);
        // "é" is C3 A9: byte tokens are id byte+1.
        assert_eq!(encode(&m, &v, "é"), [v["▁"], 0xc3 + 1, 0xa9 + 1]);
    }
}
