//! Pre-tokenizers of the byte-level BPE tokenizers: the regexes that cut text into words before BPE,
//! written out as hand scanners (the regexes use a `(?!\S)` look-ahead that the `regex` crate lacks).
//!
//! Each scanner reproduces Oniguruma's leftmost-first alternation as HF `tokenizers` runs it:
//! at each position the first alternative that matches wins, and every character is matched by some
//! alternative, so the words tile the text. Character classes follow Oniguruma's Unicode meaning:
//! `\p{L}` = general categories Lu Ll Lt Lm Lo, `\p{N}` = Nd Nl No, `\s` = U+0009..U+000D, U+0085 and
//! Zs Zl Zp (that is Unicode White_Space, which is what `char::is_whitespace` tests). `char::is_alphabetic`
//! is not `\p{L}` (it also takes marks and Nl), hence the general-category table.
use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// How a byte-level BPE tokenizer cuts text into words (GGUF `tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// SmolLM / StarCoder: every `\p{N}` character alone first, then the GPT-2 regex on the rest
    /// (HF `Sequence([Digits(individual_digits=True), ByteLevel])`, llama.cpp `smollm`).
    Smollm,
    /// Llama 3 (llama.cpp `llama-bpe`): `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    Llama3,
}

/// The Llama 3 split regex as HF tokenizer.json files spell it.
pub(crate) const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    /// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name, `None` for names not supported here.
    pub fn from_gguf_name(name: &str) -> Option<PreTokenizer> {
        match name {
            "gpt2" => Some(PreTokenizer::Gpt2),
            "smollm" => Some(PreTokenizer::Smollm),
            "llama-bpe" | "llama3" | "llama-v3" => Some(PreTokenizer::Llama3),
            _ => None,
        }
    }

    /// Cuts `text` into words; pushes their byte ranges, in order, onto `words` (which is cleared first).
    pub fn split(self, text: &str, words: &mut Vec<(usize, usize)>) {
        words.clear();
        let chars: Vec<Ch> = text
            .char_indices()
            .map(|(pos, c)| Ch {
                pos,
                c,
                class: classify(c),
            })
            .collect();
        let byte_end = |i: usize| chars.get(i).map_or(text.len(), |ch| ch.pos);
        let scan = match self {
            PreTokenizer::Gpt2 | PreTokenizer::Smollm => gpt2_next,
            PreTokenizer::Llama3 => llama3_next,
        };
        if self != PreTokenizer::Smollm {
            return scan_words(&chars, 0, chars.len(), scan, byte_end, words);
        }
        // Digits first: each \p{N} is a word of its own; the GPT-2 regex runs inside the stretches between
        // them, so its look-ahead never sees past a digit.
        let mut start = 0;
        for i in 0..=chars.len() {
            if i == chars.len() || chars[i].class == Class::Number {
                scan_words(&chars, start, i, scan, byte_end, words);
                if i < chars.len() {
                    words.push((byte_end(i), byte_end(i + 1)));
                }
                start = i + 1;
            }
        }
    }
}

/// Pushes the byte ranges of the words `scan` finds in `chars[from..to]`.
fn scan_words(
    chars: &[Ch],
    from: usize,
    to: usize,
    scan: fn(&[Ch], usize) -> usize,
    byte_end: impl Fn(usize) -> usize,
    words: &mut Vec<(usize, usize)>,
) {
    let s = &chars[from..to];
    let mut i = 0;
    while i < s.len() {
        let end = scan(s, i);
        words.push((byte_end(from + i), byte_end(from + end)));
        i = end;
    }
}

/// The classes the regexes distinguish. Every character is in exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Letter,
    Number,
    Space,
    Other,
}

pub(crate) fn classify(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            '\t' | '\n' | '\x0b' | '\x0c' | '\r' | ' ' => Class::Space,
            _ => Class::Other,
        };
    }
    if c.is_whitespace() {
        return Class::Space;
    }
    match get_general_category(c) {
        Gc::UppercaseLetter
        | Gc::LowercaseLetter
        | Gc::TitlecaseLetter
        | Gc::ModifierLetter
        | Gc::OtherLetter => Class::Letter,
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber => Class::Number,
        _ => Class::Other,
    }
}

#[derive(Debug, Clone, Copy)]
struct Ch {
    pos: usize,
    c: char,
    class: Class,
}

/// End of the run of `class` characters starting at `i`.
fn run(s: &[Ch], i: usize, class: Class) -> usize {
    s[i..]
        .iter()
        .position(|ch| ch.class != class)
        .map_or(s.len(), |n| i + n)
}

/// Length of the contraction (`'s 't 're 've 'm 'll 'd`) at `i`, if there is one.
/// `fold` matches the letters case-insensitively, with Unicode simple case folding as Oniguruma does
/// (`ſ` U+017F folds to `s`).
fn contraction(s: &[Ch], i: usize, fold: bool) -> Option<usize> {
    let at = |k: usize| s.get(i + k).map(|ch| ch.c);
    let is = |k: usize, want: char| match at(k) {
        Some(c) if fold => c.to_ascii_lowercase() == want || (want == 's' && c == '\u{17f}'),
        Some(c) => c == want,
        None => false,
    };
    if at(0) != Some('\'') {
        return None;
    }
    if is(1, 's') || is(1, 't') || is(1, 'm') || is(1, 'd') {
        Some(2)
    } else if (is(1, 'r') && is(2, 'e')) || (is(1, 'v') && is(2, 'e')) || (is(1, 'l') && is(2, 'l'))
    {
        Some(3)
    } else {
        None
    }
}

/// `\s+(?!\S)|\s+` at a whitespace character `i`: the run, less its last character when a
/// non-space follows and the run is longer than one.
fn whitespace_end(s: &[Ch], i: usize) -> usize {
    let k = run(s, i, Class::Space);
    if k < s.len() && k - i >= 2 {
        k - 1
    } else {
        k
    }
}

/// End of the GPT-2 regex match at `i`.
fn gpt2_next(s: &[Ch], i: usize) -> usize {
    if let Some(n) = contraction(s, i, false) {
        return i + n;
    }
    // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`: the optional space is U+0020 only.
    if s[i].c == ' ' && i + 1 < s.len() && s[i + 1].class != Class::Space {
        return run(s, i + 1, s[i + 1].class);
    }
    if s[i].class != Class::Space {
        return run(s, i, s[i].class);
    }
    whitespace_end(s, i)
}

/// End of the Llama 3 regex match at `i`.
fn llama3_next(s: &[Ch], i: usize) -> usize {
    if let Some(n) = contraction(s, i, true) {
        return i + n;
    }
    let c = s[i];
    let next_class = s.get(i + 1).map(|ch| ch.class);
    // `[^\r\n\p{L}\p{N}]?\p{L}+`
    let prefix_ok = !matches!(c.class, Class::Letter | Class::Number) && c.c != '\r' && c.c != '\n';
    if prefix_ok && next_class == Some(Class::Letter) {
        return run(s, i + 1, Class::Letter);
    }
    match c.class {
        Class::Letter => return run(s, i, Class::Letter),
        // `\p{N}{1,3}`
        Class::Number => return run(s, i, Class::Number).min(i + 3),
        _ => {}
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let other_start = if c.c == ' ' && next_class == Some(Class::Other) {
        Some(i + 1)
    } else if c.class == Class::Other {
        Some(i)
    } else {
        None
    };
    if let Some(start) = other_start {
        let mut end = run(s, start, Class::Other);
        while end < s.len() && matches!(s[end].c, '\r' | '\n') {
            end += 1;
        }
        return end;
    }
    // `\s*[\r\n]+`: backtracking leaves the match ending just after the run's last CR or LF.
    let k = run(s, i, Class::Space);
    if let Some(p) = s[i..k].iter().rposition(|ch| matches!(ch.c, '\r' | '\n')) {
        return i + p + 1;
    }
    whitespace_end(s, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        let mut ranges = Vec::new();
        pre.split(text, &mut ranges);
        ranges.iter().map(|&(a, b)| &text[a..b]).collect()
    }

    #[test]
    fn classes_follow_general_categories_not_alphabetic() {
        // U+0345 (combining ypogegrammeni) is Alphabetic but Mn; U+2160 (Roman numeral one) is Alphabetic
        // but Nl; U+24B6 (circled A) is Alphabetic but So.
        assert!('\u{345}'.is_alphabetic() && classify('\u{345}') == Class::Other);
        assert!('\u{2160}'.is_alphabetic() && classify('\u{2160}') == Class::Number);
        assert!('\u{24b6}'.is_alphabetic() && classify('\u{24b6}') == Class::Other);
        assert_eq!(classify('ß'), Class::Letter);
        assert_eq!(classify('ʰ'), Class::Letter); // Lm
        assert_eq!(classify('²'), Class::Number); // No
        assert_eq!(classify('\u{a0}'), Class::Space);
        assert_eq!(classify('\u{85}'), Class::Space);
        assert_eq!(classify('\u{1c}'), Class::Other); // Python's isspace says yes, \s says no
        assert_eq!(classify('\u{200b}'), Class::Other); // zero width space is Cf
    }

    #[test]
    fn gpt2_words() {
        let got = words(PreTokenizer::Gpt2, "Hello world's  end 1999!!\n\n  x");
        assert_eq!(
            got,
            ["Hello", " world", "'s", " ", " end", " 1999", "!!", "\n\n ", " x"]
        );
        assert_eq!(words(PreTokenizer::Gpt2, "a   "), ["a", "   "]);
        assert_eq!(words(PreTokenizer::Gpt2, "'S 'll"), ["'", "S", " '", "ll"]);
    }

    #[test]
    fn smollm_splits_every_digit_and_scans_between() {
        let got = words(PreTokenizer::Smollm, "in 1999  3.14 x²");
        assert_eq!(
            got,
            ["in", " ", "1", "9", "9", "9", "  ", "3", ".", "1", "4", " x", "²"]
        );
    }

    #[test]
    fn llama3_words() {
        let got = words(PreTokenizer::Llama3, "I'M 12345\tword  \n\n x!!\n\n");
        assert_eq!(
            got,
            ["I", "'M", " ", "123", "45", "\tword", "  \n\n", " x", "!!\n\n"]
        );
        assert_eq!(words(PreTokenizer::Llama3, "'ſ"), ["'ſ"]);
        assert_eq!(
            words(PreTokenizer::Llama3, "a\r\n  b"),
            ["a", "\r\n", " ", " b"]
        );
    }

    #[test]
    fn words_tile_the_text() {
        let text = "  a\u{a0}b\u{3000}\u{85}\n1²³ 'd ☃☃ e\u{301}\t\t";
        for pre in [
            PreTokenizer::Gpt2,
            PreTokenizer::Smollm,
            PreTokenizer::Llama3,
        ] {
            assert_eq!(words(pre, text).concat(), text, "{pre:?}");
            assert!(words(pre, "").is_empty());
        }
    }
}
