//! Rank-ordered BPE as HF `tokenizers` runs it (`models::bpe::Word::merge_all`): the adjacent pair with the
//! lowest merge rank merges first, leftmost first among equal ranks, through a binary heap over a linked list
//! of symbols, so a word of n symbols costs O(n log n).
//!
//! Two ways to make a word's first symbols:
//! * byte level (GPT-2, SmolLM2, Llama 3): the word's UTF-8 bytes, each the token of its GPT-2
//!   byte-to-unicode character. A byte whose character is not in the vocabulary is dropped, as HF does with
//!   no unknown token (SmolLM2 lacks e.g. the characters of bytes 0x04 and 0x06).
//! * characters with byte fallback (the HF form of SentencePiece Llama tokenizers): each character's token,
//!   or the `<0xNN>` tokens of its bytes when it has none, or the unknown token.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves, the other 68 bytes map
/// in order to U+0100, U+0101, ... (so a space is `Ġ` U+0120 and a newline `Ċ` U+010A).
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        let code = if printable {
            b as u32
        } else {
            next_extra += 1;
            next_extra - 1
        };
        *slot = char::from_u32(code).expect("U+0000..U+0143 are all chars");
    }
    table
}

/// How a word becomes its first symbols.
#[derive(Debug, Clone)]
pub(crate) enum Symbols {
    /// `byte_ids[b]`: the token of byte `b`'s GPT-2 character.
    ByteLevel { byte_ids: [Option<u32>; 256] },
    /// Single-character tokens, then `<0xNN>` byte tokens (when the model has byte fallback), then `unk`.
    Chars {
        char_ids: HashMap<char, u32>,
        byte_ids: Option<[Option<u32>; 256]>,
        unk: Option<u32>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct BpeModel {
    /// (left id, right id) -> (rank, merged id).
    pub merges: HashMap<(u32, u32), (u32, u32)>,
    pub symbols: Symbols,
    /// HF `ignore_merges` (Llama 3): a word that is itself a token is that token, merges or not.
    pub ignore_merges: bool,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    /// 0 once merged into its left neighbour.
    len: usize,
}

#[derive(PartialEq, Eq)]
struct Merge {
    pos: usize,
    rank: u32,
    new_id: u32,
}

impl Ord for Merge {
    // BinaryHeap pops the greatest: lowest rank first, then lowest position.
    fn cmp(&self, other: &Self) -> Ordering {
        other.rank.cmp(&self.rank).then(other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl BpeModel {
    /// Appends the ids of one word (`word` is the word's text as the vocabulary spells it for
    /// `ignore_merges`, built lazily by `spelled`).
    pub fn encode_word(
        &self,
        word: &str,
        vocab: &HashMap<String, u32>,
        spelled: impl Fn(&str) -> String,
        out: &mut Vec<u32>,
    ) {
        if self.ignore_merges {
            if let Some(&id) = vocab.get(&spelled(word)) {
                out.push(id);
                return;
            }
        }
        let mut symbols = self.initial_symbols(word);
        self.merge_all(&mut symbols);
        out.extend(symbols.iter().filter(|s| s.len > 0).map(|s| s.id));
    }

    fn initial_symbols(&self, word: &str) -> Vec<Symbol> {
        let mut ids: Vec<u32> = Vec::with_capacity(word.len());
        match &self.symbols {
            Symbols::ByteLevel { byte_ids } => {
                ids.extend(word.bytes().filter_map(|b| byte_ids[b as usize]));
            }
            Symbols::Chars {
                char_ids,
                byte_ids,
                unk,
            } => {
                let mut buf = [0u8; 4];
                for c in word.chars() {
                    if let Some(&id) = char_ids.get(&c) {
                        ids.push(id);
                        continue;
                    }
                    let bytes = c.encode_utf8(&mut buf).as_bytes();
                    let fallback: Option<Vec<u32>> =
                        byte_ids.and_then(|t| bytes.iter().map(|&b| t[b as usize]).collect());
                    match (fallback, unk) {
                        (Some(bs), _) => ids.extend(bs),
                        // HF fuse_unk: a run of unknown characters is one unknown token.
                        (None, Some(u)) if ids.last() != Some(u) => ids.push(*u),
                        _ => {}
                    }
                }
            }
        }
        let n = ids.len();
        ids.iter()
            .enumerate()
            .map(|(i, &id)| Symbol {
                id,
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
                len: 1,
            })
            .collect()
    }

    fn merge_all(&self, symbols: &mut [Symbol]) {
        let mut queue: BinaryHeap<Merge> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| self.merge_at(pos, w[0].id, w[1].id))
            .collect();
        while let Some(top) = queue.pop() {
            let left = symbols[top.pos];
            let Some(right_pos) = left.next else { continue };
            if left.len == 0 {
                continue;
            }
            let right = symbols[right_pos];
            // A stale entry: the pair at `pos` changed since it was queued.
            match self.merges.get(&(left.id, right.id)) {
                Some(&(_, new_id)) if new_id == top.new_id => {}
                _ => continue,
            }
            symbols[top.pos] = Symbol {
                id: top.new_id,
                prev: left.prev,
                next: right.next,
                len: left.len + right.len,
            };
            symbols[right_pos].len = 0;
            if let Some(after) = right.next {
                symbols[after].prev = Some(top.pos);
                queue.extend(self.merge_at(top.pos, top.new_id, symbols[after].id));
            }
            if let Some(before) = left.prev {
                queue.extend(self.merge_at(before, symbols[before].id, top.new_id));
            }
        }
    }

    fn merge_at(&self, pos: usize, left: u32, right: u32) -> Option<Merge> {
        self.merges
            .get(&(left, right))
            .map(|&(rank, new_id)| Merge { pos, rank, new_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_to_unicode_is_gpt2s_table() {
        let t = byte_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xad], 'Ń'); // soft hyphen is the 68th byte moved
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    /// Vocabulary "a" "b" "c" "ab" "bc" "abc" "aa" with merges in the order given.
    fn model(merges: &[(&str, &str)]) -> (BpeModel, HashMap<String, u32>) {
        let vocab: HashMap<String, u32> = ["a", "b", "c", "ab", "bc", "abc", "aa"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let char_ids = ['a', 'b', 'c']
            .iter()
            .map(|&c| (c, vocab[&c.to_string()]))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(rank, (l, r))| {
                let key = (vocab[*l], vocab[*r]);
                (key, (rank as u32, vocab[&format!("{l}{r}")]))
            })
            .collect();
        let symbols = Symbols::Chars {
            char_ids,
            byte_ids: None,
            unk: None,
        };
        let m = BpeModel {
            merges,
            symbols,
            ignore_merges: false,
        };
        (m, vocab)
    }

    fn encode(m: &BpeModel, vocab: &HashMap<String, u32>, word: &str) -> Vec<u32> {
        let mut out = Vec::new();
        m.encode_word(word, vocab, |w| w.to_string(), &mut out);
        out
    }

    #[test]
    fn lowest_rank_merges_first() {
        let (m, v) = model(&[("b", "c"), ("a", "b"), ("a", "bc")]);
        assert_eq!(encode(&m, &v, "abc"), [v["abc"]]); // b c first, then a bc
        let (m, v) = model(&[("a", "b"), ("b", "c")]);
        assert_eq!(encode(&m, &v, "abc"), [v["ab"], v["c"]]); // no "ab c" merge
    }

    #[test]
    fn equal_ranks_merge_leftmost_first() {
        let (m, v) = model(&[("a", "a")]);
        assert_eq!(encode(&m, &v, "aaa"), [v["aa"], v["a"]]);
        assert_eq!(encode(&m, &v, "aaaa"), [v["aa"], v["aa"]]);
    }

    #[test]
    fn unknown_characters_are_dropped_without_unk() {
        let (m, v) = model(&[("a", "b")]);
        // HF drops the unknown "x", after which "a" and "b" are neighbours and merge.
        assert_eq!(encode(&m, &v, "axb"), [v["ab"]]);
        assert!(encode(&m, &v, "").is_empty());
    }

    #[test]
    fn ignore_merges_takes_whole_word_tokens() {
        let (mut m, v) = model(&[("a", "b")]);
        assert_eq!(encode(&m, &v, "bc"), [v["b"], v["c"]]);
        m.ignore_merges = true;
        assert_eq!(encode(&m, &v, "bc"), [v["bc"]]);
    }
}
