//! Evaluation text from a file, by its name:
//! - `*.raw` (WikiText's `wiki.test.raw` ...): the HF `wikitext-2-raw-v1` rows joined with "\n\n", as GPTQ and
//!   EfficientQAT do (`"\n\n".join(load_dataset('wikitext', ...)['text'])`). HF's loader makes one row per
//!   line: a whitespace-only line becomes "", any other line keeps its "\n" ([`wikitext_rows_joined`]);
//! - `*.jsonl`: the "text" field of every line, joined with "\n\n" (as for calibration files);
//! - anything else: the file's UTF-8 text as it is.
//!
//! Without `--data`, the WikiText-2 test split is looked for at `shared/data/wikitext-2-raw/wiki.test.raw`
//! under the current directory and its parent.
use crate::error::{Error, Result};
use crate::train::calib::read_calibration_text;
use std::path::{Path, PathBuf};

/// Where the WikiText-2 test split lives beside a checkout of this repository.
const WIKITEXT2_TEST: &str = "shared/data/wikitext-2-raw/wiki.test.raw";

/// How a file's bytes become the evaluation text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextRule {
    /// WikiText raw: HF rows joined with "\n\n".
    WikitextRows,
    /// JSON Lines: "text" fields joined with "\n\n".
    JsonlText,
    /// Plain UTF-8, as it is.
    Plain,
}

impl TextRule {
    pub fn for_path(path: &Path) -> TextRule {
        match path.extension().and_then(|e| e.to_str()) {
            Some("raw") => TextRule::WikitextRows,
            Some("jsonl") => TextRule::JsonlText,
            _ => TextRule::Plain,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            TextRule::WikitextRows => "WikiText rows joined with \"\\n\\n\"",
            TextRule::JsonlText => "JSON Lines \"text\" fields joined with \"\\n\\n\"",
            TextRule::Plain => "plain text",
        }
    }
}

/// The evaluation text of `path` by the rule its name selects.
pub fn read_eval_text(path: &Path) -> Result<String> {
    match TextRule::for_path(path) {
        TextRule::WikitextRows => {
            let raw = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            Ok(wikitext_rows_joined(&raw))
        }
        TextRule::JsonlText | TextRule::Plain => read_calibration_text(path),
    }
}

/// WikiText raw text as HF rows joined with "\n\n": each line with its "\n" is a row, or "" when it holds
/// only whitespace.
pub fn wikitext_rows_joined(raw: &str) -> String {
    let rows: Vec<&str> = raw
        .split_inclusive('\n')
        .map(|line| if line.trim().is_empty() { "" } else { line })
        .collect();
    rows.join("\n\n")
}

/// The WikiText-2 test split beside this checkout (under `.` or `..`), if there.
pub fn default_eval_data() -> Result<PathBuf> {
    let candidates = [
        Path::new(".").join(WIKITEXT2_TEST),
        Path::new("..").join(WIKITEXT2_TEST),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            Error::invalid(
                "eval",
                format!(
                "no --data given and the WikiText-2 test split is not at ./{WIKITEXT2_TEST} or \
                 ../{WIKITEXT2_TEST}; pass --data FILE (wiki.test.raw, a .jsonl or a .txt)"
            ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikitext_rows_follow_the_hf_loader() {
        // A blank line (" \n") is an empty row; text lines keep their "\n"; rows are joined with "\n\n".
        let raw = " \n = Title = \n \n Body text . \n";
        assert_eq!(
            wikitext_rows_joined(raw),
            "\n\n = Title = \n\n\n\n\n Body text . \n"
        );
        // A last line without "\n" is a row as it is.
        assert_eq!(wikitext_rows_joined("a\nb"), "a\n\n\nb");
        assert_eq!(wikitext_rows_joined(""), "");
    }

    #[test]
    fn rules_follow_the_file_name() {
        assert_eq!(
            TextRule::for_path(Path::new("x/wiki.test.raw")),
            TextRule::WikitextRows
        );
        assert_eq!(
            TextRule::for_path(Path::new("c4.jsonl")),
            TextRule::JsonlText
        );
        assert_eq!(TextRule::for_path(Path::new("book.txt")), TextRule::Plain);
        assert_eq!(TextRule::for_path(Path::new("README")), TextRule::Plain);
    }

    #[test]
    fn read_eval_text_applies_the_rule_and_names_missing_files() {
        let dir = std::env::temp_dir().join(format!("eqat-eval-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("w.raw");
        std::fs::write(&raw, " \n a \n").unwrap();
        assert_eq!(read_eval_text(&raw).unwrap(), "\n\n a \n");
        let txt = dir.join("w.txt");
        std::fs::write(&txt, " \n a \n").unwrap();
        assert_eq!(read_eval_text(&txt).unwrap(), " \n a \n");
        let jsonl = dir.join("d.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"one\"}\n{\"text\": \"two\", \"url\": \"u\"}\n",
        )
        .unwrap();
        assert_eq!(read_eval_text(&jsonl).unwrap(), "one\n\ntwo");
        let e = read_eval_text(&dir.join("absent.raw"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.raw"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
