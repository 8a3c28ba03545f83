//! Token ids against the reference tokenizers (HF `tokenizers`, `sentencepiece`): the expected ids are in
//! tests/fixtures/tokenizer/, made by make_fixtures.py there (its first lines give the command).
//! Tests on the SmolLM2 GGUF look for it at $EQAT_SMOLLM2_GGUF, then in the local cache, and print
//! "skipped: ..." when it is absent; stories260K comes from shared/data.
use std::path::{Path, PathBuf};

use eqat::io::tokenizer::Tokenizer;
use serde_json::Value;

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
