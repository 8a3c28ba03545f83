//! A GGUF tokenizer written as HF tokenizer.json + tokenizer_config.json and read back with our loader encodes
//! WikiText-2 exactly as the GGUF tokenizer does: stories260K's SentencePiece (from shared/data) and SmolLM2's
//! byte-level BPE (when EQAT_SMOLLM2_GGUF is set). Tests print "skipped: ..." when the files are absent.
mod shared_data;
use eqat::eval::data::read_eval_text;
use eqat::eval::eval_ids;
use eqat::io::gguf::GgufFile;
use eqat::io::tokenizer::{save_tokenizer_files, Tokenizer};
use shared_data::shared_data;
use std::path::{Path, PathBuf};

/// The first `n` bytes of `text`, cut back to a character boundary.
fn head(text: &str, n: usize) -> &str {
    let mut end = n.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Writes the GGUF's tokenizer to a fresh folder, reads it back, and compares ids, special ids and decoding.
fn round_trip(gguf: &Path, label: &str, chat: Option<&str>) {
    let Some(wiki) = shared_data("wikitext-2-raw/wiki.test.raw") else {
        return;
    };
    let ours = Tokenizer::from_gguf(&GgufFile::open(gguf).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("eqat-tok-export-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let written = save_tokenizer_files(gguf, &ours, &dir).unwrap();
    assert_eq!(written, ["tokenizer.json", "tokenizer_config.json"]);
    let back = Tokenizer::from_tokenizer_json(dir.join("tokenizer.json")).unwrap();
    assert_eq!(back.vocab_size(), ours.vocab_size(), "{label}");
    assert_eq!(
        (back.bos_id(), back.eos_id(), back.add_bos()),
        (ours.bos_id(), ours.eos_id(), ours.add_bos()),
        "{label}: special ids"
    );
    let text = read_eval_text(&wiki).unwrap();
    let text = head(&text, 200_000);
    let (a, b) = (eval_ids(&ours, text), eval_ids(&back, text));
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(
        a == b,
        "{label}: {} vs {} ids, first difference at {first_diff:?}",
        a.len(),
        b.len()
    );
    println!("{label}: {} WikiText-2 tokens identical", a.len());
    assert_eq!(back.decode(&a).unwrap(), ours.decode(&a).unwrap());
    if let Some(markup) = chat {
        assert_eq!(
            back.encode_with_special(markup),
            ours.encode_with_special(markup)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stories260k_sentencepiece_survives_tokenizer_json() {
    if let Some(gguf) = shared_data("tinyllamas/stories260K/stories260K.gguf") {
        round_trip(&gguf, "stories260K", None);
    }
}

#[test]
fn smollm2_bpe_survives_tokenizer_json() {
    let Some(gguf) = std::env::var_os("EQAT_SMOLLM2_GGUF").map(PathBuf::from) else {
        println!("skipped: EQAT_SMOLLM2_GGUF not set");
        return;
    };
    round_trip(
        &gguf,
        "SmolLM2",
        Some("<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n"),
    );
}
