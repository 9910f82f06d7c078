//! Data SPECs: a file path or a built-in dataset name (docs/design.md, "The command line").

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::builtin::{load_sms, load_trec, load_vader, unknown_domain};
use super::{load_file, DataError, DataOptions, Dataset, FileFormat, VaderDomain};

/// The built-in dataset names, as error messages and `--help` list them.
pub const BUILTIN_NAMES: [&str; 5] = ["vader", "vader:DOMAIN[,DOMAIN...]", "trec", "trec-fine", "sms"];

/// What a data SPEC names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    /// A CSV, TSV or JSONL file, loaded by [`load_file`].
    File(PathBuf),
    /// `vader` (all four domains) or `vader:tweets,amazonReviewSnippets` (some): VADER's
    /// sentiment ground truth, label `negative` / `positive` by the sign of the mean human score
    /// (score 0 dropped), group = domain (only the loaded ones, in canonical order). Ids count
    /// the data rows of the four files in [`VaderDomain::ALL`] order, whichever are loaded.
    /// Domains are kept sorted in canonical order, without repeats.
    Vader(Vec<VaderDomain>),
    /// `trec`: TREC question types, 6 coarse labels (`ABBR`, `DESC`, `ENTY`, `HUM`, `LOC`, `NUM`);
    /// duplicate (label, question) pairs of the source file are kept once. Ids are line indices.
    Trec,
    /// `trec-fine`: the same questions with the 50 fine labels, named `COARSE:fine`.
    TrecFine,
    /// `sms`: SMS spam, labels `ham` / `spam`, with the messages that the source CSV merged into
    /// other records split back out (5,574 messages). Ids number the messages in file order.
    Sms,
}

impl DataSpec {
    /// Whether this is a built-in dataset (read from the assets folder).
    pub fn is_builtin(&self) -> bool {
        !matches!(self, DataSpec::File(_))
    }
}

impl fmt::Display for DataSpec {
    /// The canonical spec: parsing it again gives the same `DataSpec` (for a file, while it
    /// exists).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::File(path) => write!(f, "{}", path.display()),
            DataSpec::Vader(domains) if domains.len() == VaderDomain::ALL.len() => f.write_str("vader"),
            DataSpec::Vader(domains) => {
                write!(f, "vader:{}", domains.iter().map(|d| d.name()).collect::<Vec<_>>().join(","))
            }
            DataSpec::Trec => f.write_str("trec"),
            DataSpec::TrecFine => f.write_str("trec-fine"),
            DataSpec::Sms => f.write_str("sms"),
        }
    }
}

impl FromStr for DataSpec {
    type Err = DataError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        parse_spec(spec)
    }
}

/// Reads a data SPEC. A path to an existing file wins over a built-in name (a file called `sms`
/// in the working folder is that file); then the built-in names; then anything that looks like a
/// path (a `/`, or a `.csv`, `.tsv`, `.jsonl` ... extension) is a missing file.
///
/// # Errors
/// [`DataError::UnknownDomain`] (listing the valid ones) for a bad `vader:` domain,
/// [`DataError::FileNotFound`] for a path-like spec with no file, [`DataError::UnknownSpec`]
/// (listing the built-ins) for anything else.
pub fn parse_spec(spec: &str) -> Result<DataSpec, DataError> {
    let path = Path::new(spec);
    if !spec.is_empty() && path.is_file() {
        return Ok(DataSpec::File(path.to_owned()));
    }
    match spec {
        "vader" => return Ok(DataSpec::Vader(VaderDomain::ALL.to_vec())),
        "trec" => return Ok(DataSpec::Trec),
        "trec-fine" => return Ok(DataSpec::TrecFine),
        "sms" => return Ok(DataSpec::Sms),
        _ => {}
    }
    if let Some(list) = spec.strip_prefix("vader:") {
        let mut domains =
            list.split(',').filter(|d| !d.trim().is_empty()).map(VaderDomain::parse).collect::<Result<Vec<_>, _>>()?;
        if domains.is_empty() {
            return Err(unknown_domain(list));
        }
        domains.sort();
        domains.dedup();
        return Ok(DataSpec::Vader(domains));
    }
    let path_like = spec.contains(['/', '\\']) || FileFormat::from_path(path).is_some();
    if path_like {
        return Err(DataError::FileNotFound { path: path.to_owned() });
    }
    Err(DataError::UnknownSpec { spec: spec.to_owned() })
}

/// Loads a parsed spec: a file with `options`, or a built-in dataset from `assets` (the folder
/// that scripts/fetch-assets.sh fills; `options` are not used for built-ins).
///
/// # Errors
/// As [`load_file`] for files; for built-ins, [`DataError::AssetMissing`] when the assets are not
/// fetched, [`DataError::Malformed`] naming file and line when they are damaged.
pub fn load(spec: &DataSpec, assets: &Path, options: &DataOptions) -> Result<Dataset, DataError> {
    match spec {
        DataSpec::File(path) => load_file(path, options),
        DataSpec::Vader(domains) => load_vader(assets, domains, spec),
        DataSpec::Trec => load_trec(assets, false, spec),
        DataSpec::TrecFine => load_trec(assets, true, spec),
        DataSpec::Sms => load_sms(assets, spec),
    }
}

/// Parses and loads a data SPEC, with built-ins read from [`assets_dir`].
///
/// # Errors
/// As [`parse_spec`] and [`load`].
pub fn load_spec(spec: &str, options: &DataOptions) -> Result<Dataset, DataError> {
    load(&parse_spec(spec)?, &assets_dir(), options)
}

/// The assets folder: `$FEDPOOL_ASSETS` when set; else `./assets` when it exists (a binary run
/// from the workspace root, as `make` does); else this workspace's `assets/` (the path this crate
/// was built from: `cargo test` runs in the crate folder); else `./assets`, which error messages
/// then name.
pub fn assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FEDPOOL_ASSETS").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("assets");
    if local.is_dir() {
        return local;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("assets");
    if workspace.is_dir() {
        return workspace.canonicalize().unwrap_or(workspace);
    }
    local
}
