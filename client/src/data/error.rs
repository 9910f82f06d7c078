//! What can go wrong when loading a dataset, with the file and line where it went wrong.

use std::path::{Path, PathBuf};

/// A dataset could not be loaded or a dataset operation was given bad input. Every variant names
/// the file (and line or record, where there is one) or the spec that was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The data file does not exist.
    #[error("data file {} not found", path.display())]
    FileNotFound {
        /// The path that was asked for.
        path: PathBuf,
    },
    /// The data file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file of a built-in dataset is missing from the assets folder.
    #[error(
        "built-in dataset '{name}' needs {}, which is missing: run scripts/fetch-assets.sh \
         (or point FEDPOOL_ASSETS at the assets folder)",
        path.display()
    )]
    AssetMissing {
        /// The built-in dataset's name.
        name: String,
        /// The file that is missing.
        path: PathBuf,
    },
    /// A column (or, in JSONL, a key) that the options name is not in the file.
    #[error("{}: no column '{column}' (columns found: {})", at(path, *line), list(found))]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The line (JSONL: the object's line; CSV/TSV: `None`, the header lacks it).
        line: Option<u64>,
        /// The column that was asked for.
        column: String,
        /// The columns that the file does have (JSONL: that object's keys, sorted).
        found: Vec<String>,
    },
    /// Loading found no examples at all.
    #[error("dataset {dataset} is empty: no examples")]
    Empty {
        /// The file or built-in spec that was loaded.
        dataset: String,
    },
    /// A label is not in the explicit label list of [`DataOptions::labels`](super::DataOptions::labels).
    #[error("unknown label '{label}' in {}:{line}, known: {}", path.display(), list(known))]
    UnknownLabel {
        /// The file.
        path: PathBuf,
        /// The 1-based line where the record starts.
        line: u64,
        /// The label found.
        label: String,
        /// The labels that were given.
        known: Vec<String>,
    },
    /// A line or record does not have the expected shape.
    #[error("{}: {message}", at(path, *line))]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The 1-based line where the record starts, where known.
        line: Option<u64>,
        /// What is wrong with it.
        message: String,
    },
    /// The file's format cannot be told from its name.
    #[error(
        "cannot tell the format of {}: name it .csv, .tsv (or .tab) or .jsonl (or .ndjson), or set the format",
        path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A spec that is neither an existing file nor a built-in dataset.
    #[error("'{spec}' is neither an existing file nor a built-in dataset (built-ins: {})", super::BUILTIN_NAMES.join(", "))]
    UnknownSpec {
        /// The spec as given.
        spec: String,
    },
    /// A `vader:` spec names a domain that VADER does not have.
    #[error("unknown VADER domain '{domain}' (valid domains: {})", list(valid))]
    UnknownDomain {
        /// The domain as given.
        domain: String,
        /// The valid domain names.
        valid: Vec<String>,
    },
    /// [`Dataset::subset`](super::Dataset::subset) was given ids that are not in the dataset.
    #[error("{count} id(s) not in dataset {dataset}, the first is {first}")]
    UnknownIds {
        /// The dataset's source.
        dataset: String,
        /// How many of the given ids are unknown.
        count: usize,
        /// The first unknown id, in the order given.
        first: u64,
    },
    /// The options contradict themselves (for example, a label listed twice).
    #[error("invalid data options: {0}")]
    InvalidOptions(String),
}

/// `path:line`, or just `path` when the line is not known.
fn at(path: &Path, line: Option<u64>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

/// Names, quoted and comma-separated; `(none)` for an empty list.
fn list(names: &[String]) -> String {
    if names.is_empty() {
        return "(none)".to_owned();
    }
    names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
}
