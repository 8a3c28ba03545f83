//! E2E-QP's training sequences, apart from Block-AP's calibration windows (`engine train --e2e-data`).
//!
//! A `.json` (one array of records) or `.jsonl` (one record per line) file is read by the fields its first
//! record has: "instruction" and "output" (and an optional "input") make Alpaca instruction data
//! (`train::instruct`, loss on the response only); "text" makes plain text, the fields joined with "\n\n" as
//! for calibration. Every later record must have the same fields. Any other file is text by the rules of
//! `--calib` (`eval::data::read_eval_text`). Text is cut into seeded windows of `--e2e-seqlen` tokens, drawn
//! the way calibration windows are (`calib::calibration_windows`, first 90% of the tokens).
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::train::calib::calibration_windows;
use crate::train::e2e_qp::Example;
use crate::train::instruct::{instruction_examples, Instruction};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where E2E-QP's training sequences come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eData {
    /// The calibration source: Block-AP's own training windows, or new windows of it when `--e2e-seqlen` or
    /// `--e2e-train-size` differ from `--seqlen` and `--train-size`.
    Calibration,
    /// Text or instruction records, told apart by their fields.
    File(PathBuf),
}

/// The contents of an `--e2e-data` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eRecords {
    Text(String),
    Instructions(Vec<Instruction>),
}

/// Reads an `--e2e-data` file (the module comment gives the rules).
pub fn read_e2e_file(path: &Path) -> Result<E2eRecords> {
    let ext = path.extension().and_then(|e| e.to_str());
    if !matches!(ext, Some("json") | Some("jsonl")) {
        return Ok(E2eRecords::Text(crate::eval::data::read_eval_text(path)?));
    }
    let raw = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records: Vec<(usize, Value)> = if raw.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&raw)
            .map_err(|e| Error::format(path, "JSON array", e.to_string()))?;
        array_element_lines(&raw).into_iter().zip(values).collect()
    } else {
        raw.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(|v| (i + 1, v))
                    .map_err(|e| Error::format(path, format!("line {}", i + 1), e.to_string()))
            })
            .collect::<Result<_>>()?
    };
    let Some((first_line, first)) = records.first() else {
        return Err(Error::format(path, "records", "the file holds no records"));
    };
    let as_str = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    let is_instruction =
        |v: &Value| as_str(v, "instruction").is_some() && as_str(v, "output").is_some();
    if is_instruction(first) {
        let mut out = Vec::with_capacity(records.len());
        for (line, v) in &records {
            let field = format!("line {line}");
            if !is_instruction(v) {
                return Err(Error::format(
                    path,
                    field,
                    format!("no string \"instruction\" and \"output\" fields (line {first_line} is an instruction record)"),
                ));
            }
            let input = match v.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(Error::format(
                        path,
                        field,
                        format!("\"input\" must be a string, not {other}"),
                    ))
                }
            };
            out.push(Instruction {
                instruction: as_str(v, "instruction").expect("checked"),
                input,
                output: as_str(v, "output").expect("checked"),
            });
        }
        return Ok(E2eRecords::Instructions(out));
    }
    let mut docs = Vec::with_capacity(records.len());
    for (line, v) in &records {
        let text = as_str(v, "text").ok_or_else(|| {
            let what = if *line == *first_line {
                "neither a string \"text\" field nor string \"instruction\" and \"output\" fields"
                    .to_string()
            } else {
                format!("no string \"text\" field (line {first_line} is a text record)")
            };
            Error::format(path, format!("line {line}"), what)
        })?;
        docs.push(text);
    }
    Ok(E2eRecords::Text(docs.join("\n\n")))
}

/// The 1-based line on which each element of a well-formed top-level JSON array starts (serde_json gives no
/// positions for the elements it parses).
fn array_element_lines(text: &str) -> Vec<usize> {
    let (mut lines, mut line) = (Vec::new(), 1);
    let (mut depth, mut in_string, mut escaped, mut expect_element) = (0usize, false, false, false);
    for b in text.bytes() {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if depth == 1 && expect_element && b != b']' {
            lines.push(line);
            expect_element = false;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect_element = true;
                }
            }
            b']' | b'}' => depth -= 1,
            b',' if depth == 1 => expect_element = true,
            _ => {}
        }
    }
    lines
}

/// E2E-QP's examples from an `--e2e-data` file: `count` windows of `seqlen` tokens of text, or `count`
/// instruction records cut to `seqlen`; `say` hears what was made.
pub fn file_examples(
    path: &Path,
    tokenizer: &Tokenizer,
    seqlen: usize,
    count: usize,
    seed: u64,
    mut say: impl FnMut(&str),
) -> Result<Vec<Example>> {
    match read_e2e_file(path)? {
        E2eRecords::Text(text) => {
            let ids = tokenizer.encode(&text);
            say(&format!(
                "E2E-QP data: {count} windows of {seqlen} tokens from {} ({} tokens of text)",
                path.display(),
                ids.len()
            ));
            let (windows, _) = calibration_windows(&ids, seqlen, count, 0, seed)?;
            Ok(windows.into_iter().map(Example::causal).collect())
        }
        E2eRecords::Instructions(records) => {
            let made = instruction_examples(&records, tokenizer, seqlen, count, seed)?;
            let tokens: usize = made.examples.iter().map(|e| e.ids.len()).sum();
            say(&format!(
                "E2E-QP data: {count} of {} Alpaca instruction records from {}; {} cut to --e2e-seqlen {seqlen}, \
                 {} skipped (no response token within it); loss on {} response tokens of {tokens}",
                records.len(),
                path.display(),
                made.truncated,
                made.dropped,
                made.response_tokens
            ));
            Ok(made.examples)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn records_are_told_apart_by_their_fields_and_bad_ones_named_by_line() {
        let dir = std::env::temp_dir().join(format!("eqat-e2e-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let alpaca = Instruction {
            instruction: "Say hi.".into(),
            input: String::new(),
            output: "Hi.".into(),
        };
        let with_input = Instruction {
            instruction: "Echo.".into(),
            input: "x".into(),
            output: "x".into(),
        };
        let want = E2eRecords::Instructions(vec![alpaca, with_input]);
        let jsonl = "{\"instruction\": \"Say hi.\", \"output\": \"Hi.\"}\n\n\
                     {\"instruction\": \"Echo.\", \"input\": \"x\", \"output\": \"x\"}\n";
        assert_eq!(read_e2e_file(&write(&dir, "a.jsonl", jsonl)).unwrap(), want);
        let array =
            "[\n  {\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi.\"},\n  \
                     {\"instruction\": \"Echo.\", \"input\": \"x\", \"output\": \"x\"}\n]\n";
        assert_eq!(read_e2e_file(&write(&dir, "a.json", array)).unwrap(), want);
        let text = "{\"text\": \"one\"}\n{\"text\": \"two\", \"id\": 3}\n";
        assert_eq!(
            read_e2e_file(&write(&dir, "t.jsonl", text)).unwrap(),
            E2eRecords::Text("one\n\ntwo".into())
        );
        assert_eq!(
            read_e2e_file(&write(&dir, "t.txt", "plain {\"text\"}")).unwrap(),
            E2eRecords::Text("plain {\"text\"}".into())
        );

        // Errors name the file and the line of the offending record.
        let cases = [
            ("b.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n", "line 1", "neither"),
            ("c.jsonl", "{\"text\": \"a\"}\n\n{\"instruction\": \"b\", \"output\": \"c\"}\n", "line 3", "\"text\""),
            ("d.json", "[{\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": \"a{[\\\"\", \"output\": \"b\"},\n\n {\"instruction\": \"a\"}]", "line 4", "\"output\""),
            ("e.jsonl", "{\"instruction\": \"a\", \"input\": 3, \"output\": \"b\"}\n", "line 1", "\"input\""),
            ("f.jsonl", "{\"text\": \"a\"}\n{\"text\": \n", "line 2", "EOF"),
            ("g.json", "[]", "records", "no records"),
        ];
        for (name, body, line, what) in cases {
            let e = read_e2e_file(&write(&dir, name, body))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(name) && e.contains(line) && e.contains(what),
                "{name}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
