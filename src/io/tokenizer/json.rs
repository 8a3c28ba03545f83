//! HF `tokenizer.json` (and its sibling `tokenizer_config.json`, when present) for the two kinds of
//! tokenizer this crate runs: byte-level BPE (`ByteLevel`, `Digits` + `ByteLevel`, or the Llama 3 `Split` +
//! `ByteLevel`) and the BPE form of SentencePiece (`▁` via the `Prepend`/`Replace` normalizer or the
//! `Metaspace` pre-tokenizer, byte fallback). Anything else is refused with the field that differs.
use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::pretok::LLAMA3_PATTERN;
use super::{Metaspace, PreTokenizer, SpecialIds, TokenKind, Tokenizer, SPACE_SYMBOL};
use crate::error::{Error, Result};

/// How a tokenizer.json splits text before its BPE model.
enum Pipeline {
    ByteLevel(PreTokenizer),
    Metaspace(Metaspace),
}

impl Tokenizer {
    /// Reads a HF `tokenizer.json`. BOS comes from a `TemplateProcessing` post-processor that starts with a
    /// special token; `tokenizer_config.json` beside it, if any, supplies `eos_token` and overrides
    /// `bos_token` / `add_bos_token`.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let root = read_json(path)?;
        let bad = |field: &str, msg: String| Error::format(path, field, msg);
        let model = &root["model"];
        if model["type"] != "BPE" {
            return Err(bad(
                "model.type",
                format!("{} is not supported (BPE only)", model["type"]),
            ));
        }
        for field in ["continuing_subword_prefix", "end_of_word_suffix"] {
            let v = &model[field];
            if !(v.is_null() || v == "") {
                return Err(bad(
                    &format!("model.{field}"),
                    format!("{v} is not supported"),
                ));
            }
        }
        let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
        let ignore_merges = model["ignore_merges"].as_bool().unwrap_or(false);

        // Tokens by id: the model's vocabulary, then the added tokens (which may reuse vocabulary ids).
        let mut by_id: HashMap<u32, (String, TokenKind)> = HashMap::new();
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("model.vocab", "not an object".into()))?;
        for (text, id) in vocab {
            let id = as_id(id).ok_or_else(|| bad("model.vocab", format!("\"{text}\": id {id}")))?;
            let is_byte =
                byte_fallback && text.len() == 6 && text.starts_with("<0x") && text.ends_with('>');
            let kind = if is_byte {
                TokenKind::Byte
            } else {
                TokenKind::Normal
            };
            by_id.insert(id, (text.clone(), kind));
        }
        for added in root["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(text)) = (as_id(&added["id"]), added["content"].as_str()) else {
                return Err(bad(
                    "added_tokens",
                    format!("entry {added} lacks id or content"),
                ));
            };
            let special = added["special"].as_bool().unwrap_or(false);
            let kind = if special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
            by_id.insert(id, (text.to_string(), kind));
        }
        let n = by_id.keys().max().map_or(0, |&m| m as usize + 1);
        let mut tokens = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let (text, kind) = by_id
                .remove(&id)
                .ok_or_else(|| bad("model.vocab", format!("no token has id {id}")))?;
            tokens.push(text);
            kinds.push(kind);
        }
        let id_of = |text: &str| tokens.iter().rposition(|t| t == text).map(|i| i as u32);

        let merges = parse_merges(&model["merges"]).map_err(|msg| bad("model.merges", msg))?;
        let merges = merges.iter().map(|(a, b)| (a.as_str(), b.as_str()));

        let mut ids = SpecialIds {
            unk: model["unk_token"].as_str().and_then(id_of),
            ..SpecialIds::default()
        };
        if let Some(bos) = template_bos(&root["post_processor"]) {
            ids.bos = id_of(&bos);
            ids.add_bos = ids.bos.is_some();
        }
        let config_path = path.with_file_name("tokenizer_config.json");
        if config_path.exists() {
            let config = read_json(&config_path)?;
            let token_text = |v: &Value| {
                v.as_str()
                    .or_else(|| v["content"].as_str())
                    .map(String::from)
            };
            if let Some(bos) = token_text(&config["bos_token"]) {
                ids.bos = id_of(&bos);
            }
            ids.eos = token_text(&config["eos_token"]).and_then(|t| id_of(&t));
            if let Some(add) = config["add_bos_token"].as_bool() {
                ids.add_bos = add;
            }
        }

        match pipeline(&root).map_err(|(field, msg)| bad(field, msg))? {
            Pipeline::ByteLevel(pre) => {
                Tokenizer::byte_level_bpe(tokens, kinds, merges, pre, ignore_merges, ids)
            }
            Pipeline::Metaspace(rule) => {
                Tokenizer::metaspace_bpe(tokens, kinds, merges, rule, byte_fallback, ids)
            }
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, "json", e.to_string()))
}

fn as_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

/// Merges as `"a b"` strings (older files) or `["a", "b"]` pairs (newer ones).
fn parse_merges(v: &Value) -> std::result::Result<Vec<(String, String)>, String> {
    let list = v.as_array().ok_or("not an array")?;
    list.iter()
        .enumerate()
        .map(|(rank, m)| {
            let pair = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(p) if p.len() == 2 => p[0]
                    .as_str()
                    .zip(p[1].as_str())
                    .map(|(a, b)| (a.into(), b.into())),
                _ => None,
            };
            pair.ok_or_else(|| format!("merge {rank}: {m} is not a pair"))
        })
        .collect()
}

/// The special token a `TemplateProcessing` (alone or in a `Sequence`) puts before a single text.
fn template_bos(post: &Value) -> Option<String> {
    match post["type"].as_str()? {
        "TemplateProcessing" => post["single"][0]["SpecialToken"]["id"]
            .as_str()
            .map(String::from),
        "Sequence" => post["processors"].as_array()?.iter().find_map(template_bos),
        _ => None,
    }
}

/// Recognizes the normalizer + pre-tokenizer pair; errors name the field that is not supported.
fn pipeline(root: &Value) -> std::result::Result<Pipeline, (&'static str, String)> {
    let (norm, pre) = (&root["normalizer"], &root["pre_tokenizer"]);
    let byte_level = |p: &Value, use_regex: bool| {
        p["type"] == "ByteLevel"
            && p["add_prefix_space"] == false
            && p["use_regex"].as_bool().unwrap_or(true) == use_regex
    };
    let refuse = |field, v: &Value| Err((field, format!("{v} is not supported")));
    if pre["type"] == "ByteLevel" || pre["type"] == "Sequence" {
        if !norm.is_null() {
            return refuse("normalizer", norm);
        }
        let parts: Vec<&Value> = match pre["pretokenizers"].as_array() {
            Some(list) => list.iter().collect(),
            None => vec![pre],
        };
        let found = match parts.as_slice() {
            [p] if byte_level(p, true) => PreTokenizer::Gpt2,
            [d, p]
                if d["type"] == "Digits"
                    && d["individual_digits"] == true
                    && byte_level(p, true) =>
            {
                PreTokenizer::Smollm
            }
            [s, p]
                if s["type"] == "Split"
                    && s["pattern"]["Regex"] == LLAMA3_PATTERN
                    && s["behavior"] == "Isolated"
                    && s["invert"] == false
                    && byte_level(p, false) =>
            {
                PreTokenizer::Llama3
            }
            _ => return refuse("pre_tokenizer", pre),
        };
        return Ok(Pipeline::ByteLevel(found));
    }
    let space = SPACE_SYMBOL.to_string();
    if pre["type"] == "Metaspace" {
        if !norm.is_null() || pre["replacement"] != space.as_str() {
            return refuse("pre_tokenizer", pre);
        }
        // Older files say add_prefix_space instead of prepend_scheme.
        let scheme =
            pre["prepend_scheme"]
                .as_str()
                .unwrap_or(match pre["add_prefix_space"].as_bool() {
                    Some(false) => "never",
                    _ => "always",
                });
        let (prepend, first_only) = match scheme {
            "always" => (true, false),
            "first" => (true, true),
            "never" => (false, false),
            _ => return refuse("pre_tokenizer.prepend_scheme", &pre["prepend_scheme"]),
        };
        let split = pre["split"].as_bool().unwrap_or(true);
        return Ok(Pipeline::Metaspace(Metaspace::PreTokenizer {
            prepend,
            first_only,
            split,
        }));
    }
    if !pre.is_null() {
        return refuse("pre_tokenizer", pre);
    }
    let steps: Vec<&Value> = match norm["normalizers"].as_array() {
        Some(list) => list.iter().collect(),
        None => vec![norm],
    };
    let replace = |v: &Value| {
        v["type"] == "Replace" && v["pattern"]["String"] == " " && v["content"] == space.as_str()
    };
    match steps.as_slice() {
        [p, r] if p["type"] == "Prepend" && p["prepend"] == space.as_str() && replace(r) => {
            Ok(Pipeline::Metaspace(Metaspace::Legacy))
        }
        [r] if replace(r) => Ok(Pipeline::Metaspace(Metaspace::PreTokenizer {
            prepend: false,
            first_only: false,
            split: false,
        })),
        _ => refuse("normalizer", norm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal tokenizer.json with the given pre-tokenizer and normalizer, written to a fresh folder.
    fn write(name: &str, pre: Value, norm: Value) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("eqat_tokenizer_json_{name}_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = serde_json::json!({
            "added_tokens": [{"id": 0, "content": "<s>", "special": true}],
            "normalizer": norm,
            "pre_tokenizer": pre,
            "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]},
            "model": {"type": "BPE", "vocab": {"<s>": 0, "a": 1, "b": 2, "ab": 3, "\u{2581}": 4}, "merges": ["a b"]},
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, root.to_string()).unwrap();
        path
    }

    #[test]
    fn metaspace_json_reads_bos_and_prepends() {
        let pre = serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
        let tok = Tokenizer::from_tokenizer_json(write("ok", pre, Value::Null)).unwrap();
        assert_eq!((tok.bos_id(), tok.add_bos()), (Some(0), true));
        assert_eq!(tok.encode("ab a"), [4, 3, 4, 1]);
        assert_eq!(tok.encode_with_special("<s>ab"), [0, 4, 3]);
        assert_eq!(tok.decode(&[4, 3, 4, 1]).unwrap(), "ab a");
    }

    #[test]
    fn unsupported_pipelines_name_the_field() {
        let pre = serde_json::json!({"type": "Whitespace"});
        let err = Tokenizer::from_tokenizer_json(write("bad", pre, Value::Null))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pre_tokenizer") && err.contains("Whitespace"),
            "{err}"
        );
        let pre =
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true});
        let err = Tokenizer::from_tokenizer_json(write("prefix", pre, Value::Null))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pre_tokenizer") && err.contains("add_prefix_space"),
            "{err}"
        );
        let missing = std::env::temp_dir().join("eqat_no_such_dir/tokenizer.json");
        assert!(Tokenizer::from_tokenizer_json(missing).is_err());
    }
}
