//! JSONL input files (preference pairs, edit requests). Schemas: `docs/editing-data.md`.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads a JSONL file: one JSON object per non-blank line.
///
/// # Errors
/// [`Error::Io`]; [`Error::Json`] naming the file and the 1-based line;
/// [`Error::InvalidInput`] for a file with no records.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            line: Some(i + 1),
            source,
        })?;
        out.push(v);
    }
    if out.is_empty() {
        return Err(Error::invalid("read_jsonl", path.display().to_string(), "no records"));
    }
    Ok(out)
}
