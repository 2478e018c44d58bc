//! Reading pair and text files: TSV, CSV (with a header naming `text_a` and `text_b`, or two
//! columns without one) and JSONL (`{"text_a": ..., "text_b": ...}` per line). Every error
//! names the file, the line and the cause.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// A file format for pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tab-separated values.
    Tsv,
    /// Comma-separated values (RFC 4180 quoting).
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format a file name implies.
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
            _ => bail!(
                "{}: cannot tell the format from the extension; pass --format tsv|csv|jsonl",
                path.display()
            ),
        }
    }
}

/// One pair of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRow {
    /// 1-based line number in the file.
    pub line: u64,
    /// First text.
    pub text_a: String,
    /// Second text.
    pub text_b: String,
}

fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// Streams the pairs of a file in order; the first bad row ends the stream with an error.
pub fn read_pairs(
    path: &Path,
    format: Format,
) -> Result<Box<dyn Iterator<Item = Result<PairRow>>>> {
    let file = open(path)?;
    let path = path.to_path_buf();
    Ok(match format {
        Format::Jsonl => Box::new(jsonl_pairs(path, file)),
        Format::Tsv => Box::new(delimited_pairs(path, file, b'\t', false)),
        Format::Csv => Box::new(delimited_pairs(path, file, b',', true)),
    })
}

fn jsonl_pairs(path: PathBuf, file: File) -> impl Iterator<Item = Result<PairRow>> {
    BufReader::new(file)
        .lines()
        .enumerate()
        .filter_map(move |(i, line)| {
            let line_no = i as u64 + 1;
            let at = || format!("{}:{line_no}", path.display());
            let text = match line {
                Ok(text) => text,
                Err(e) => return Some(Err(anyhow!("{}: {e}", at()))),
            };
            if text.trim().is_empty() {
                return None;
            }
            let row = (|| {
                let value: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| anyhow!("invalid JSON: {e}"))?;
                let field = |name: &str| -> Result<String> {
                    match value.get(name) {
                        Some(serde_json::Value::String(s)) => Ok(s.clone()),
                        Some(other) => bail!("\"{name}\" must be a string, got {other}"),
                        None => bail!("missing \"{name}\""),
                    }
                };
                Ok(PairRow {
                    line: line_no,
                    text_a: field("text_a")?,
                    text_b: field("text_b")?,
                })
            })();
            Some(row.map_err(|e: anyhow::Error| anyhow!("{}: {e}", at())))
        })
}

fn delimited_pairs(
    path: PathBuf,
    file: File,
    delimiter: u8,
    quoting: bool,
) -> impl Iterator<Item = Result<PairRow>> {
    // The csv reader skips blank lines without counting them, so line numbers come from the
    // byte offset of each record instead, counted incrementally.
    let mut newlines = LineCounter::new(&path);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delimiter)
        .quoting(quoting)
        .flexible(true)
        .from_reader(file);
    let mut columns: Option<(usize, usize)> = None;
    let mut first = true;
    let mut record = csv::StringRecord::new();
    std::iter::from_fn(move || loop {
        let record_start = reader.position().byte();
        match reader.read_record(&mut record) {
            Ok(false) => return None,
            Err(e) => {
                let byte = e.position().map(|p| p.byte()).unwrap_or(record_start);
                let line = newlines.line_at(byte);
                return Some(Err(anyhow!("{}:{line}: {}", path.display(), csv_cause(&e))));
            }
            Ok(true) => {}
        }
        let line = newlines
            .first_content_line(record.position().map(|p| p.byte()).unwrap_or(record_start));
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if first {
            first = false;
            let names: Vec<&str> = record.iter().map(str::trim).collect();
            let a = names.iter().position(|n| *n == "text_a");
            let b = names.iter().position(|n| *n == "text_b");
            if let (Some(a), Some(b)) = (a, b) {
                columns = Some((a, b));
                continue;
            }
            if a.is_some() || b.is_some() {
                return Some(Err(anyhow!(
                    "{}:{line}: the header names only one of text_a and text_b",
                    path.display()
                )));
            }
        }
        let row = match columns {
            Some((a, b)) => match (record.get(a), record.get(b)) {
                (Some(x), Some(y)) => Ok((x.to_string(), y.to_string())),
                _ => Err(format!(
                    "expected at least {} columns, found {}",
                    a.max(b) + 1,
                    record.len()
                )),
            },
            None if record.len() == 2 => Ok((record[0].to_string(), record[1].to_string())),
            None => Err(format!(
                "expected 2 columns (text_a, text_b) or a header naming them, found {}",
                record.len()
            )),
        };
        return Some(match row {
            Ok((text_a, text_b)) => Ok(PairRow {
                line,
                text_a,
                text_b,
            }),
            Err(cause) => Err(anyhow!("{}:{line}: {cause}", path.display())),
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
    /// A second, independent handle on the file (a cloned handle would share the offset).
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

fn csv_cause(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8".into(),
        other => format!("{other:?}"),
    }
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
    let is_jsonl = matches!(Format::from_path(path), Ok(Format::Jsonl));
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(open(path)?).lines().enumerate() {
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

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn pairs(path: &Path) -> Result<Vec<PairRow>> {
        read_pairs(path, Format::from_path(path)?)?.collect()
    }

    #[test]
    fn all_three_formats_read_the_same_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let expected = vec![
            ("a b".to_string(), "c, d".to_string()),
            ("e".to_string(), "f \"g\"".to_string()),
        ];
        let files = [
            write(&dir, "p.tsv", "text_a\ttext_b\na b\tc, d\ne\tf \"g\"\n"),
            write(&dir, "q.tsv", "a b\tc, d\n\ne\tf \"g\"\n"),
            write(&dir, "p.csv", "id,text_b,text_a\n1,\"c, d\",a b\n2,\"f \"\"g\"\"\",e\n"),
            write(&dir, "p.jsonl", "{\"text_a\": \"a b\", \"text_b\": \"c, d\"}\n\n{\"text_a\": \"e\", \"text_b\": \"f \\\"g\\\"\"}\n"),
        ];
        for file in &files {
            let rows = pairs(file).unwrap();
            let texts: Vec<_> = rows
                .iter()
                .map(|r| (r.text_a.clone(), r.text_b.clone()))
                .collect();
            assert_eq!(texts, expected, "{}", file.display());
        }
        assert_eq!(pairs(&files[1]).unwrap()[1].line, 3);
    }

    #[test]
    fn bad_rows_name_file_line_and_cause() {
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
        ];
        for (name, text, needle) in cases {
            let path = write(&dir, name, text);
            let message = pairs(&path).unwrap_err().to_string();
            assert!(
                message.contains(name) && message.contains(needle),
                "{name}: {message}"
            );
        }
        let message = pairs(&dir.path().join("absent.tsv"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("absent.tsv") && message.contains("cannot open"),
            "{message}"
        );
        assert!(Format::from_path(Path::new("pairs.txt")).is_err());
    }

    #[test]
    fn texts_read_from_lines_or_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let rows = read_texts(&write(&dir, "d.txt", "one\n\ntwo\n")).unwrap();
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
        let rows = read_texts(&write(&dir, "d.jsonl", "{\"text\": \"x\"}\n")).unwrap();
        assert_eq!(rows[0].text, "x");
        let message = read_texts(&write(&dir, "e.jsonl", "{\"t\": 1}\n"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("e.jsonl:1"), "{message}");
    }
}
