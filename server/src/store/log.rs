//! The round log, `rounds.jsonl`: append-only JSON lines, read back by [`read_round_log`].
//!
//! Two kinds of line:
//! - a round line: one [`RoundRecord`], appended when the round commits;
//! - an evaluation line: `{"eval_of": 7, ...}`, the [`EvalRecord`] of round 7's federated
//!   evaluation with its fields inline, appended when the clients reported.
//!
//! Reading merges each evaluation line into the newest round line of its round that comes before
//! it (a later evaluation line of the same round wins). Logs written before evaluation lines
//! existed, whose round lines carry `eval` themselves, read the same. Nothing is ever rewritten:
//! recording an evaluation costs one line, not a copy of the log.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io, StoreError};
use crate::round::{EvalRecord, RoundRecord};

/// The round log's file name in a store folder.
pub const ROUND_LOG: &str = "rounds.jsonl";

/// The key that marks an evaluation line.
const EVAL_OF: &str = "eval_of";

/// An evaluation line: the round it evaluates, then the record's fields inline.
#[derive(Debug, Serialize, Deserialize)]
struct EvalLine {
    eval_of: u64,
    #[serde(flatten)]
    eval: EvalRecord,
}

/// Reads the round log at `path`: every round's [`RoundRecord`], oldest first, with its
/// federated evaluation merged in. An incomplete last line (a writer mid-append, or a crash the
/// store has not repaired yet) is ignored, and the file is not modified: safe while a server
/// appends to it. This is the one reader of `rounds.jsonl` (`fedpool-server report`, the
/// store at open, the tests).
pub fn read_round_log(path: &Path) -> Result<Vec<RoundRecord>, StoreError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let complete = complete_len(&bytes);
    if complete < bytes.len() {
        tracing::debug!(file = %path.display(), bytes = bytes.len() - complete, "ignoring an incomplete last line");
    }
    parse(path, &bytes[..complete])
}

/// The length of the log's complete lines (up to and including the last newline).
fn complete_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// Parses complete lines of a round log into merged records.
fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<RoundRecord>, StoreError> {
    let text = std::str::from_utf8(bytes).map_err(|e| StoreError::Log {
        path: path.to_path_buf(),
        line: bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1,
        problem: "not UTF-8".into(),
    })?;
    let mut records: Vec<RoundRecord> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |e: serde_json::Error| StoreError::Log { path: path.to_path_buf(), line: i + 1, problem: e.to_string() };
        let value: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
        if value.get(EVAL_OF).is_none() {
            records.push(serde_json::from_value(value).map_err(bad)?);
            continue;
        }
        let EvalLine { eval_of, eval } = serde_json::from_value(value).map_err(bad)?;
        match records.iter_mut().rev().find(|r| r.round == eval_of) {
            Some(record) => record.eval = Some(eval),
            None => tracing::warn!(
                file = %path.display(),
                line = i + 1,
                round = eval_of,
                "an evaluation line for a round with no line before it; ignored"
            ),
        }
    }
    Ok(records)
}

/// A round line, newline included.
pub(super) fn round_line(record: &RoundRecord) -> Result<String, serde_json::Error> {
    serde_json::to_string(record).map(|mut s| {
        s.push('\n');
        s
    })
}

/// An evaluation line of `round`, newline included.
pub(super) fn eval_line(round: u64, eval: &EvalRecord) -> Result<String, serde_json::Error> {
    serde_json::to_string(&EvalLine { eval_of: round, eval: eval.clone() }).map(|mut s| {
        s.push('\n');
        s
    })
}

/// The round log, open for appending.
#[derive(Debug)]
pub(super) struct LogFile {
    path: PathBuf,
    file: File,
}

impl LogFile {
    /// Opens (creating, owner-only) the log in `dir`, truncates a torn last line (a crash
    /// mid-append) away, and reads it. Returns whether the file was created, for the caller to
    /// fsync the folder.
    pub(super) fn open(dir: &Path) -> Result<(LogFile, Vec<RoundRecord>, bool), StoreError> {
        let path = dir.join(ROUND_LOG);
        let created = !path.exists();
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, super::PRIVATE_FILE);
        let mut file = options.open(&path).map_err(io(&path))?;
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        file.read_to_end(&mut bytes).map_err(io(&path))?;
        let complete = complete_len(&bytes);
        if complete < bytes.len() {
            tracing::warn!(
                file = %path.display(),
                bytes = bytes.len() - complete,
                "truncating a torn last line of the round log (crash mid-append)"
            );
            file.set_len(complete as u64).map_err(io(&path))?;
            file.sync_data().map_err(io(&path))?;
            bytes.truncate(complete);
        }
        let records = parse(&path, &bytes)?;
        Ok((LogFile { path, file }, records, created))
    }

    /// The log's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one complete line and fsyncs it. A write that fails part-way is cut back off
    /// (best effort), so the next line does not land after half a line.
    pub(super) fn append(&mut self, line: &str) -> Result<(), StoreError> {
        let path = &self.path;
        let before = self.file.metadata().map_err(io(path))?.len();
        let result = self.file.write_all(line.as_bytes()).and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            if let Err(undo) = self.file.set_len(before) {
                tracing::warn!(file = %path.display(), error = %undo, "cannot cut a failed append back off");
            }
            return Err(StoreError::Io { path: path.clone(), source: e });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn record(round: u64) -> RoundRecord {
        RoundRecord {
            round,
            attempt: 1,
            clients: vec!["a".into()],
            examples: 10,
            bytes_up: 1,
            bytes_down: 2,
            rejected: BTreeMap::new(),
            stragglers: Vec::new(),
            train_loss: None,
            train_accuracy: None,
            started_at_secs: 0.0,
            committed_at_secs: 1.0,
            recovered: false,
            median_update_norm: None,
            eval: None,
        }
    }

    fn eval(accuracy: f64) -> EvalRecord {
        EvalRecord {
            accuracy: Some(accuracy),
            macro_f1: None,
            loss: Some(0.25),
            examples: 64,
            clients: vec!["a".into()],
            missing: Vec::new(),
            bytes_down: 100,
            bytes_up: 10,
            seconds: 0.5,
        }
    }

    #[test]
    fn an_eval_line_names_its_round_and_merges_into_the_round_before_it_the_later_one_winning() {
        let line = eval_line(2, &eval(0.5)).unwrap();
        assert!(line.starts_with("{\"eval_of\":2,\"accuracy\":0.5"), "{line}");
        let text = [
            round_line(&record(1)).unwrap(),
            round_line(&record(2)).unwrap(),
            eval_line(1, &eval(0.25)).unwrap(),
            line,
            eval_line(1, &eval(0.75)).unwrap(),
        ]
        .concat();
        let records = parse(Path::new("rounds.jsonl"), text.as_bytes()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].eval, Some(eval(0.75)), "the later evaluation of round 1 wins");
        assert_eq!(records[1].eval, Some(eval(0.5)));
    }

    #[test]
    fn a_round_logged_again_after_a_resume_gets_only_the_evaluations_after_its_new_line() {
        let text = [
            round_line(&record(2)).unwrap(),
            eval_line(2, &eval(0.5)).unwrap(),
            round_line(&record(2)).unwrap(),
            eval_line(9, &eval(0.5)).unwrap(),
        ]
        .concat();
        let records = parse(Path::new("rounds.jsonl"), text.as_bytes()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].eval.is_some(), records[1].eval.is_some()), (true, false));
    }

    #[test]
    fn a_bad_eval_line_is_an_error_naming_its_line() {
        let text = [round_line(&record(1)).unwrap(), "{\"eval_of\":1,\"accuracy\":\"high\"}\n".into()].concat();
        let err = parse(Path::new("rounds.jsonl"), text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("rounds.jsonl, line 2"), "{err}");
    }
}
