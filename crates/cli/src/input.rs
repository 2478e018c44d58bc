//! Input files of the CLI: pair files through [`bert::pairs`] (TSV, CSV, JSONL), and text files
//! (one text per line, or JSONL with `"text"`). Every error names the file, the line and the
//! cause.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use bert::{read_pair_records, PairFormat, PairRecord};

/// A pair-file format, as `--format` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tab-separated values.
    Tsv,
    /// Comma-separated values (RFC 4180 quoting).
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl From<Format> for PairFormat {
    fn from(format: Format) -> Self {
        match format {
            Format::Tsv => Self::Tsv,
            Format::Csv => Self::Csv,
            Format::Jsonl => Self::Jsonl,
        }
    }
}

/// Streams the pairs of a file in order: `format`, or the one the extension implies.
pub fn read_pairs(
    path: &Path,
    format: Option<Format>,
) -> Result<impl Iterator<Item = Result<PairRecord>>> {
    let format = match format {
        Some(format) => format.into(),
        None => PairFormat::from_path(path)?,
    };
    Ok(read_pair_records(path, format)?.map(|row| row.map_err(anyhow::Error::from)))
}

/// One text of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRow {
    /// 1-based line number.
    pub line: u64,
    /// The text.
    pub text: String,
}

/// The texts of a file: JSONL (`{"text": ...}`) by extension, else one text per non-empty line.
pub fn read_texts(path: &Path) -> Result<Vec<TextRow>> {
    let is_jsonl = matches!(PairFormat::from_path(path), Ok(PairFormat::Jsonl));
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(|e| anyhow!("{}:{line_no}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let text = if is_jsonl {
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| anyhow!("{}:{line_no}: invalid JSON: {e}", path.display()))?;
            match value.get("text") {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => bail!("{}:{line_no}: missing string \"text\"", path.display()),
            }
        } else {
            line
        };
        rows.push(TextRow {
            line: line_no,
            text,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_read_from_lines_or_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let rows = read_texts(&write("d.txt", "one\n\ntwo\n")).unwrap();
        assert_eq!(
            rows,
            vec![
                TextRow {
                    line: 1,
                    text: "one".into()
                },
                TextRow {
                    line: 3,
                    text: "two".into()
                }
            ]
        );
        assert_eq!(
            read_texts(&write("d.jsonl", "{\"text\": \"x\"}\n")).unwrap()[0].text,
            "x"
        );
        let message = read_texts(&write("e.jsonl", "{\"t\": 1}\n"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("e.jsonl:1"), "{message}");
        let message = read_texts(&dir.path().join("absent.txt"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("absent.txt") && message.contains("cannot open"),
            "{message}"
        );
    }
}
