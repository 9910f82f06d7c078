//! Datasets from CSV, TSV and JSONL files with named columns.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{sorted_names, DataError, Dataset, Example};

/// Which columns of a data file hold the text, the label and the group, and which labels exist.
/// Used for files only; the built-in datasets have fixed columns and labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataOptions {
    /// The text column (JSONL: key). Default `text`.
    pub text_column: String,
    /// The label column (JSONL: key). Default `label`. Values are strings or integers.
    pub label_column: String,
    /// The group column (JSONL: key), if any: a domain or user, for natural non-IID partitions.
    /// The column must exist; an empty value (JSONL: `null`) leaves that example without a group.
    pub group_column: Option<String>,
    /// The labels in index order. When given, a label not in the list is an error
    /// ([`DataError::UnknownLabel`]) and labels without examples keep their index; when not,
    /// the distinct labels found are sorted (numerically if all are integers).
    pub labels: Option<Vec<String>>,
    /// The file format; `None` tells it from the file name's extension.
    pub format: Option<FileFormat>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            text_column: "text".to_owned(),
            label_column: "label".to_owned(),
            group_column: None,
            labels: None,
            format: None,
        }
    }
}

/// A data file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// Comma-separated with a header row; RFC 4180 quoting, so quoted fields may hold commas,
    /// quotes (`""`) and line breaks.
    Csv,
    /// Tab-separated with a header row, one record per line and no quoting (IANA
    /// `text/tab-separated-values`): a `"` is an ordinary character, as in most TSV exports.
    Tsv,
    /// One JSON object per line, with the columns as keys; blank lines are skipped.
    Jsonl,
}

impl FileFormat {
    /// The format named by a file's extension (case-insensitive): `.csv`; `.tsv` or `.tab`;
    /// `.jsonl` or `.ndjson`.
    pub fn from_path(path: &Path) -> Option<FileFormat> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "csv" => Some(FileFormat::Csv),
            "tsv" | "tab" => Some(FileFormat::Tsv),
            "jsonl" | "ndjson" => Some(FileFormat::Jsonl),
            _ => None,
        }
    }
}

/// One record as read, before labels and groups become indices.
pub(super) struct RawRecord {
    /// The 1-based line where the record starts.
    pub(super) line: u64,
    pub(super) text: String,
    pub(super) label: String,
    pub(super) group: Option<String>,
}

/// Loads a CSV, TSV or JSONL file (see [`FileFormat`]). Example ids are the 0-based index of the
/// data record in the file (header and blank lines not counted); label and group values are
/// trimmed of surrounding whitespace, texts are kept as they are.
///
/// # Errors
/// [`DataError::FileNotFound`], [`DataError::Io`], [`DataError::UnknownFormat`],
/// [`DataError::MissingColumn`] (listing the columns found), [`DataError::Malformed`] (with the
/// line), [`DataError::UnknownLabel`], [`DataError::Empty`], [`DataError::InvalidOptions`].
pub fn load_file(path: &Path, options: &DataOptions) -> Result<Dataset, DataError> {
    let format = match options.format {
        Some(format) => format,
        None => FileFormat::from_path(path).ok_or_else(|| DataError::UnknownFormat { path: path.to_owned() })?,
    };
    let file = File::open(path).map_err(|source| open_error(path, source))?;
    let records = match format {
        FileFormat::Csv => read_delimited(path, file, b',', true, options)?,
        FileFormat::Tsv => read_delimited(path, file, b'\t', false, options)?,
        FileFormat::Jsonl => read_jsonl(path, file, options)?,
    };
    build(path, records, options)
}

/// Turns raw records into a dataset: label and group indices, ids, the empty check.
fn build(path: &Path, records: Vec<RawRecord>, options: &DataOptions) -> Result<Dataset, DataError> {
    let source = path.display().to_string();
    if records.is_empty() {
        return Err(DataError::Empty { dataset: source });
    }
    let label_names = match &options.labels {
        Some(labels) => {
            check_label_list(labels)?;
            labels.clone()
        }
        None => sorted_names(records.iter().map(|r| r.label.as_str())),
    };
    let group_names = sorted_names(records.iter().filter_map(|r| r.group.as_deref()));
    let label_index: HashMap<&str, usize> = label_names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let group_index: HashMap<&str, usize> = group_names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let mut examples = Vec::with_capacity(records.len());
    for (id, record) in (0u64..).zip(&records) {
        let label = *label_index.get(record.label.as_str()).ok_or_else(|| DataError::UnknownLabel {
            path: path.to_owned(),
            line: record.line,
            label: record.label.clone(),
            known: label_names.clone(),
        })?;
        // Every group value went into group_names, so the lookup cannot miss.
        let group = record.group.as_deref().and_then(|g| group_index.get(g).copied());
        examples.push(Example { id, text: record.text.clone(), label, group });
    }
    Ok(Dataset { examples, label_names, group_names, source })
}

fn check_label_list(labels: &[String]) -> Result<(), DataError> {
    if labels.is_empty() {
        return Err(DataError::InvalidOptions("the label list is empty".to_owned()));
    }
    let mut seen = std::collections::HashSet::new();
    for label in labels {
        if !seen.insert(label.as_str()) {
            return Err(DataError::InvalidOptions(format!("label '{label}' is listed twice")));
        }
    }
    Ok(())
}

pub(crate) fn open_error(path: &Path, source: std::io::Error) -> DataError {
    if source.kind() == std::io::ErrorKind::NotFound {
        DataError::FileNotFound { path: path.to_owned() }
    } else {
        DataError::Io { path: path.to_owned(), source }
    }
}

/// A label or group value: trimmed; `None` when empty.
fn value(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

pub(super) fn read_delimited(
    path: &Path,
    file: File,
    delimiter: u8,
    quoting: bool,
    options: &DataOptions,
) -> Result<Vec<RawRecord>, DataError> {
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).quoting(quoting).from_reader(file);
    let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
    if headers.is_empty() {
        return Err(DataError::Empty { dataset: path.display().to_string() });
    }
    let column = |name: &str| {
        headers.iter().position(|h| h.trim() == name).ok_or_else(|| DataError::MissingColumn {
            path: path.to_owned(),
            line: None,
            column: name.to_owned(),
            found: headers.iter().map(str::to_owned).collect(),
        })
    };
    let text_at = column(&options.text_column)?;
    let label_at = column(&options.label_column)?;
    let group_at = options.group_column.as_deref().map(column).transpose()?;
    let mut records = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, e))?;
        let line = record.position().map_or(0, csv::Position::line);
        // The csv reader rejects records whose length differs from the header's, so every
        // column index is in range; `unwrap_or_default` only guards that invariant.
        let field = |at: usize| record.get(at).unwrap_or_default();
        let label = value(field(label_at)).ok_or_else(|| DataError::Malformed {
            path: path.to_owned(),
            line: Some(line),
            message: format!("empty label (column '{}')", options.label_column),
        })?;
        records.push(RawRecord {
            line,
            text: field(text_at).to_owned(),
            label,
            group: group_at.and_then(|at| value(field(at))),
        });
    }
    Ok(records)
}

/// A csv crate error as a [`DataError`] naming the line.
fn csv_error(path: &Path, error: csv::Error) -> DataError {
    let line = error.position().map(csv::Position::line);
    let message = match error.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("record has {len} field(s), the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8 in field {}", err.field() + 1),
        _ => error.to_string(),
    };
    match error.into_kind() {
        csv::ErrorKind::Io(source) => DataError::Io { path: path.to_owned(), source },
        _ => DataError::Malformed { path: path.to_owned(), line, message },
    }
}

fn read_jsonl(path: &Path, file: File, options: &DataOptions) -> Result<Vec<RawRecord>, DataError> {
    let mut records = Vec::new();
    for (line_no, line) in (1u64..).zip(BufReader::new(file).lines()) {
        let malformed = |message: String| DataError::Malformed { path: path.to_owned(), line: Some(line_no), message };
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => malformed("invalid UTF-8".to_owned()),
            _ => DataError::Io { path: path.to_owned(), source: e },
        })?;
        let line = if line_no == 1 { line.strip_prefix('\u{feff}').unwrap_or(&line) } else { &line };
        if line.trim().is_empty() {
            continue;
        }
        let object = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(object)) => object,
            Ok(other) => return Err(malformed(format!("expected a JSON object, found {}", json_kind(&other)))),
            Err(e) => return Err(malformed(format!("invalid JSON: {e}"))),
        };
        let get = |key: &str| {
            object.get(key).ok_or_else(|| DataError::MissingColumn {
                path: path.to_owned(),
                line: Some(line_no),
                column: key.to_owned(),
                found: object.keys().cloned().collect(),
            })
        };
        let text = match get(&options.text_column)? {
            serde_json::Value::String(text) => text.clone(),
            other => {
                return Err(malformed(format!(
                    "'{}' must be a string, found {}",
                    options.text_column,
                    json_kind(other)
                )))
            }
        };
        let label = json_value(get(&options.label_column)?)
            .filter(|label| !label.is_empty())
            .ok_or_else(|| malformed(format!("'{}' must be a non-empty string or an integer", options.label_column)))?;
        let group = match &options.group_column {
            None => None,
            Some(key) => match get(key)? {
                serde_json::Value::Null => None,
                found => {
                    let group = json_value(found).ok_or_else(|| {
                        malformed(format!("'{key}' must be a string, an integer or null, found {}", json_kind(found)))
                    })?;
                    (!group.is_empty()).then_some(group)
                }
            },
        };
        records.push(RawRecord { line: line_no, text, label, group });
    }
    Ok(records)
}

/// A JSON label or group value as a name: a trimmed string, or an integer's digits; `None` for
/// any other kind of value.
fn json_value(found: &serde_json::Value) -> Option<String> {
    match found {
        serde_json::Value::String(s) => Some(s.trim().to_owned()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// What kind of JSON value this is, for error messages.
fn json_kind(found: &serde_json::Value) -> &'static str {
    match found {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
