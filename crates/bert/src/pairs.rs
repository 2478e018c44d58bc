//! Reading sentence-pair files: TSV, CSV and JSONL, optionally with a label.
//!
//! - TSV / CSV: a header naming `text_a` and `text_b` (and optionally `label`; other columns are
//!   ignored), or no header and two columns (`text_a`, `text_b`) or three (`..., label`). CSV
//!   follows RFC 4180 quoting; TSV has no quoting.
//! - JSONL: one object per line with string `text_a` and `text_b`, and optionally `label`
//!   (a number or a string).
//!
//! Rows stream in file order. A bad row is an [`Error::Data`] naming the file, the line and the
//! cause; the stream goes on after it, so a caller can skip bad rows or stop at the first.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A pair-file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFormat {
    /// Tab-separated values, no quoting.
    Tsv,
    /// Comma-separated values, RFC 4180 quoting.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl PairFormat {
    /// The format a file name implies (`.tsv`, `.csv`, `.jsonl`).
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "tsv" | "tab" => Ok(Self::Tsv),
            "csv" => Ok(Self::Csv),
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            _ => Err(Error::InvalidOption(format!(
                "{}: cannot tell the format from the extension; name it (tsv, csv or jsonl)",
                path.display()
            ))),
        }
    }
}

/// One row of a pair file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRecord {
    /// 1-based line number where the row starts.
    pub line: u64,
    /// First text.
    pub text_a: String,
    /// Second text.
    pub text_b: String,
    /// The label as written, when the file has one.
    pub label: Option<String>,
}

fn data_error(path: &Path, line: u64, reason: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Refuses a row whose text [`crate::limits::text_problem`] objects to (empty, oversized,
/// NUL bytes), naming the column.
fn checked(path: &Path, record: PairRecord) -> Result<PairRecord> {
    for (column, text) in [("text_a", &record.text_a), ("text_b", &record.text_b)] {
        if let Some(problem) = crate::limits::text_problem(text, false) {
            return Err(data_error(path, record.line, format!("{column} {problem}")));
        }
    }
    Ok(record)
}

/// Streams the rows of a pair file in order. Rows with an empty, oversized or NUL-holding text
/// are errors too (see [`crate::limits`]).
pub fn read_pair_records(
    path: &Path,
    format: PairFormat,
) -> Result<Box<dyn Iterator<Item = Result<PairRecord>>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let path = path.to_path_buf();
    Ok(match format {
        PairFormat::Jsonl => Box::new(jsonl_records(path, file)),
        PairFormat::Tsv => Box::new(delimited_records(path, file, b'\t', false)),
        PairFormat::Csv => Box::new(delimited_records(path, file, b',', true)),
    })
}

fn jsonl_records(path: PathBuf, file: File) -> impl Iterator<Item = Result<PairRecord>> {
    BufReader::new(file)
        .lines()
        .enumerate()
        .filter_map(move |(i, line)| {
            let line_no = i as u64 + 1;
            let text = match line {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Some(Err(data_error(
                        &path,
                        line_no,
                        "invalid UTF-8 (not a UTF-8 text file?)",
                    )))
                }
                Err(e) => return Some(Err(data_error(&path, line_no, e.to_string()))),
            };
            if text.trim().is_empty() {
                return None;
            }
            let row = (|| -> std::result::Result<PairRecord, String> {
                let value: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?;
                let field = |name: &str| match value.get(name) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(format!("\"{name}\" must be a string, got {other}")),
                    None => Err(format!("missing \"{name}\"")),
                };
                let label = match value.get("label") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                };
                Ok(PairRecord {
                    line: line_no,
                    text_a: field("text_a")?,
                    text_b: field("text_b")?,
                    label,
                })
            })();
            Some(
                row.map_err(|reason| data_error(&path, line_no, reason))
                    .and_then(|record| checked(&path, record)),
            )
        })
}

/// Column positions of the fields.
#[derive(Debug, Clone, Copy)]
struct Columns {
    text_a: usize,
    text_b: usize,
    label: Option<usize>,
}

fn delimited_records(
    path: PathBuf,
    file: File,
    delimiter: u8,
    quoting: bool,
) -> impl Iterator<Item = Result<PairRecord>> {
    // The csv reader skips blank lines without counting them, so line numbers come from each
    // record's byte offset, counted on a second handle.
    let mut lines = LineCounter::new(&path);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delimiter)
        .quoting(quoting)
        .flexible(true)
        .from_reader(file);
    let mut columns: Option<Columns> = None;
    let mut first = true;
    let mut record = csv::StringRecord::new();
    let mut done = false;
    std::iter::from_fn(move || loop {
        if done {
            return None;
        }
        let record_start = reader.position().byte();
        match reader.read_record(&mut record) {
            Ok(false) => return None,
            Err(e) => {
                let line = lines
                    .first_content_line(e.position().map(|p| p.byte()).unwrap_or(record_start));
                let cause = match e.kind() {
                    csv::ErrorKind::Utf8 { .. } => {
                        "invalid UTF-8 (not a UTF-8 text file?)".to_string()
                    }
                    other => format!("{other:?}"),
                };
                // After bad UTF-8 the reader goes on with the next record; after an I/O error it
                // cannot, so the stream ends there.
                done = !matches!(e.kind(), csv::ErrorKind::Utf8 { .. });
                return Some(Err(data_error(&path, line, cause)));
            }
            Ok(true) => {}
        }
        let line =
            lines.first_content_line(record.position().map(|p| p.byte()).unwrap_or(record_start));
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if first {
            first = false;
            let names: Vec<&str> = record.iter().map(str::trim).collect();
            let find = |n: &str| names.iter().position(|x| *x == n);
            match (find("text_a"), find("text_b")) {
                (Some(text_a), Some(text_b)) => {
                    columns = Some(Columns {
                        text_a,
                        text_b,
                        label: find("label"),
                    });
                    continue;
                }
                (None, None) => {}
                _ => {
                    return Some(Err(data_error(
                        &path,
                        line,
                        "the header names only one of text_a and text_b",
                    )))
                }
            }
        }
        let row = match columns {
            Some(c) => {
                let needed = c.text_a.max(c.text_b).max(c.label.unwrap_or(0)) + 1;
                match (record.get(c.text_a), record.get(c.text_b)) {
                    (Some(a), Some(b)) if record.len() >= needed => {
                        Ok((a.to_string(), b.to_string(), c.label.and_then(|i| record.get(i)).map(String::from)))
                    }
                    _ => Err(format!("expected at least {needed} columns, found {}", record.len())),
                }
            }
            None if record.len() == 2 => Ok((record[0].to_string(), record[1].to_string(), None)),
            None if record.len() == 3 => Ok((record[0].to_string(), record[1].to_string(), Some(record[2].to_string()))),
            None => Err(format!(
                "expected 2 columns (text_a, text_b), 3 (with label), or a header naming them; found {}",
                record.len()
            )),
        };
        return Some(match row {
            Ok((text_a, text_b, label)) => checked(
                &path,
                PairRecord {
                    line,
                    text_a,
                    text_b,
                    label,
                },
            ),
            Err(reason) => Err(data_error(&path, line, reason)),
        });
    })
}

/// Maps byte offsets (non-decreasing) to 1-based line numbers by reading the file alongside.
struct LineCounter {
    reader: Option<BufReader<File>>,
    byte: u64,
    line: u64,
}

impl LineCounter {
    /// An independent handle on the file (a cloned handle would share the read offset).
    fn new(path: &Path) -> Self {
        Self {
            reader: File::open(path).ok().map(BufReader::new),
            byte: 0,
            line: 1,
        }
    }

    fn line_at(&mut self, target: u64) -> u64 {
        let Some(reader) = self.reader.as_mut() else {
            return self.line;
        };
        while self.byte < target {
            let Ok(buffer) = reader.fill_buf() else { break };
            if buffer.is_empty() {
                break;
            }
            let take = buffer.len().min((target - self.byte) as usize);
            self.line += buffer[..take].iter().filter(|&&b| b == b'\n').count() as u64;
            self.byte += take as u64;
            reader.consume(take);
        }
        self.line
    }

    /// The line of the first character at or after `target` that is not a line break: a
    /// record's position includes the blank lines the reader skipped before it.
    fn first_content_line(&mut self, target: u64) -> u64 {
        self.line_at(target);
        let Some(reader) = self.reader.as_mut() else {
            return self.line;
        };
        while let Ok(buffer) = reader.fill_buf() {
            match buffer.first() {
                Some(b'\n') => self.line += 1,
                Some(b'\r') => {}
                _ => break,
            }
            reader.consume(1);
            self.byte += 1;
        }
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn records(path: &Path) -> Result<Vec<PairRecord>> {
        read_pair_records(path, PairFormat::from_path(path)?)?.collect()
    }

    #[test]
    fn all_three_formats_read_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let expected = vec![
            (
                "a b".to_string(),
                "c, d".to_string(),
                Some("0.5".to_string()),
            ),
            (
                "e".to_string(),
                "f \"g\"".to_string(),
                Some("1".to_string()),
            ),
        ];
        let files = [
            write(&dir, "p.tsv", "text_a\ttext_b\tlabel\na b\tc, d\t0.5\ne\tf \"g\"\t1\n"),
            write(&dir, "q.tsv", "a b\tc, d\t0.5\n\ne\tf \"g\"\t1\n"),
            write(&dir, "p.csv", "id,text_b,label,text_a\n1,\"c, d\",0.5,a b\n2,\"f \"\"g\"\"\",1,e\n"),
            write(&dir, "p.jsonl", "{\"text_a\": \"a b\", \"text_b\": \"c, d\", \"label\": 0.5}\n\n{\"text_a\": \"e\", \"text_b\": \"f \\\"g\\\"\", \"label\": \"1\"}\n"),
        ];
        for file in &files {
            let rows = records(file).unwrap();
            let got: Vec<_> = rows
                .iter()
                .map(|r| (r.text_a.clone(), r.text_b.clone(), r.label.clone()))
                .collect();
            assert_eq!(got, expected, "{}", file.display());
        }
        assert_eq!(records(&files[1]).unwrap()[1].line, 3);
        let unlabelled = records(&write(&dir, "u.tsv", "x\ty\n")).unwrap();
        assert_eq!(unlabelled[0].label, None);
    }

    #[test]
    fn bad_rows_name_file_line_and_cause_and_the_stream_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "bad.jsonl",
                "{\"text_a\": \"x\", \"text_b\": \"y\"}\n{\"text_a\": \"x\"}\n",
                ":2: missing \"text_b\"",
            ),
            ("bad2.jsonl", "not json\n", ":1: invalid JSON"),
            (
                "bad3.jsonl",
                "{\"text_a\": 1, \"text_b\": \"y\"}\n",
                ":1: \"text_a\" must be a string",
            ),
            (
                "bad.tsv",
                "a\tb\nonly one column\n",
                ":2: expected 2 columns",
            ),
            (
                "bad.csv",
                "text_a,text_b\nx\n",
                ":2: expected at least 2 columns",
            ),
            (
                "half.csv",
                "text_a,label\nx,1\n",
                ":1: the header names only one",
            ),
            (
                "lines.csv",
                "text_a,text_b\n\"multi\nline\",x\n\nonly\n",
                ":5: expected at least 2",
            ),
        ];
        for (name, text, needle) in cases {
            let path = write(&dir, name, text);
            let message = records(&path).unwrap_err().to_string();
            assert!(
                message.contains(name) && message.contains(needle),
                "{name}: {message}"
            );
        }
        // After a bad row, later rows still come.
        let path = write(&dir, "mixed.tsv", "a\tb\nbad\nc\td\n");
        let rows: Vec<_> = read_pair_records(&path, PairFormat::Tsv).unwrap().collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[1].is_err() && rows[2].as_ref().unwrap().text_a == "c");
        let message = records(&dir.path().join("absent.tsv"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("absent.tsv"), "{message}");
        assert!(PairFormat::from_path(Path::new("pairs.txt")).is_err());
    }
}
