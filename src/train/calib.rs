//! Calibration data for Block-AP and E2E-QP: text from a file, tokenized once, cut into seeded random windows.
//!
//! Rules: a `.jsonl` file contributes the "text" field of every line, joined with "\n\n" (as the GPTQ C4 loaders
//! join documents); any other file is read as UTF-8 text. Training windows are drawn from the first 90% of the
//! token stream and validation windows from the last 10%, so the two never share a token.
use crate::error::{Error, Result};
use crate::tensor::rng::Rng;
use std::path::Path;

/// The text of a calibration file (plain UTF-8, or the "text" fields of a JSON Lines file).
pub fn read_calibration_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        return Ok(raw);
    }
    let mut docs = Vec::new();
    for (i, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::format(
                path,
                format!("line {}", i + 1),
                format!("invalid JSON: {e}"),
            )
        })?;
        let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            Error::format(path, format!("line {}", i + 1), "no string field \"text\"")
        })?;
        docs.push(text.to_string());
    }
    Ok(docs.join("\n\n"))
}

/// Token windows: (training windows, validation windows).
pub type TrainValWindows = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Seeded random windows of `seqlen` tokens: `train` from the first 90% of `ids`, `val` from the last 10%.
pub fn calibration_windows(
    ids: &[u32],
    seqlen: usize,
    train: usize,
    val: usize,
    seed: u64,
) -> Result<TrainValWindows> {
    if seqlen == 0 {
        return Err(Error::invalid("calibration", "--seqlen must be positive"));
    }
    let split = ids.len() - ids.len() / 10;
    let (head, tail) = ids.split_at(split);
    let need = |part: &[u32], n: usize, what: &str| -> Result<()> {
        if n > 0 && part.len() < seqlen {
            return Err(Error::invalid(
                "calibration",
                format!(
                    "the {what} part of the calibration text has {} tokens, fewer than --seqlen {seqlen} \
                     ({} tokens in all); give more text or a shorter --seqlen",
                    part.len(),
                    ids.len()
                ),
            ));
        }
        Ok(())
    };
    need(head, train, "training (first 90%)")?;
    need(tail, val, "validation (last 10%)")?;
    let mut rng = Rng::new(seed);
    let mut draw = |part: &[u32], n: usize| -> Vec<Vec<u32>> {
        (0..n)
            .map(|_| {
                let start = rng.below(part.len() - seqlen + 1);
                part[start..start + seqlen].to_vec()
            })
            .collect()
    };
    let train_windows = draw(head, train);
    let val_windows = draw(tail, val);
    Ok((train_windows, val_windows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_seeded_disjoint_and_sized() {
        let ids: Vec<u32> = (0..1000).collect();
        let (tr, va) = calibration_windows(&ids, 16, 8, 3, 5).unwrap();
        assert_eq!((tr.len(), va.len()), (8, 3));
        assert!(tr
            .iter()
            .all(|w| w.len() == 16 && w.windows(2).all(|p| p[1] == p[0] + 1) && w[15] < 900));
        assert!(va.iter().all(|w| w[0] >= 900));
        assert_eq!(calibration_windows(&ids, 16, 8, 3, 5).unwrap().0, tr);
        assert_ne!(calibration_windows(&ids, 16, 8, 3, 6).unwrap().0, tr);
        let e = calibration_windows(&ids, 200, 1, 1, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("validation") && e.contains("--seqlen 200"),
            "{e}"
        );
    }

    #[test]
    fn jsonl_text_fields_are_joined_and_bad_lines_named() {
        let dir = std::env::temp_dir().join(format!("eqat-calib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.jsonl");
        std::fs::write(&p, "{\"text\": \"a b\"}\n\n{\"text\": \"c\", \"x\": 1}\n").unwrap();
        assert_eq!(read_calibration_text(&p).unwrap(), "a b\n\nc");
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"body\": 2}\n").unwrap();
        let e = read_calibration_text(&p).unwrap_err().to_string();
        assert!(
            e.contains("c.jsonl") && e.contains("line 2") && e.contains("\"text\""),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
