//! The job's JSONL log (DIR/train_log.jsonl): append-only, so a resumed run keeps the killed run's lines.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends one JSON object per line to DIR/train_log.jsonl.
pub(super) struct Log(std::fs::File, PathBuf);

impl Log {
    pub(super) fn open(dir: &Path) -> Result<Log> {
        let path = dir.join("train_log.jsonl");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Log(f, path))
    }
    pub(super) fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.0, "{v}").map_err(|e| Error::io(&self.1, e))
    }
}
