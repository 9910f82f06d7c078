//! Atomic round checkpoints and the round log; resume after a crash (docs/design.md, principle 6:
//! nothing committed is lost).
//!
//! A folder holds one pool checkpoint per committed round (`round-NNNNNN.safetensors`, written by
//! `fedpool_common::checkpoint`: temp file, fsync, rename, fsync of the folder) and `rounds.jsonl`,
//! one [`RoundRecord`] per line. A commit writes the checkpoint first, then appends the line and
//! fsyncs it: the checkpoint is the truth, the log its account. A server optimiser with state
//! (FedAdam's moments) has it written just before the checkpoint, as
//! `server-state-NNNNNN.safetensors`: a checkpoint on disk always has its state beside it.
//!
//! At [`Store::open`]:
//! - every checkpoint's header is read (not its tensors) and one made for another pool spec or
//!   backbone is an error naming the file — runs are never mixed silently;
//! - the newest checkpoint that reads and verifies is the one to resume from (newer ones that do
//!   not are skipped with a warning, and overwritten when their round is committed again);
//! - a torn last line of the log (a crash mid-append: bytes after the last newline) is truncated
//!   away;
//! - if the resumed round (≥ 1) has no line (a crash between the checkpoint and the line), a line
//!   marked `recovered` is appended for it;
//! - the resumed round's server state is read back (a damaged file is an error naming it).
//!
//! A fresh folder resumes nothing: the caller initialises a pool and hands it to
//! [`Store::write_initial`], so the initial pool (round 0) is on disk too ([`Store::open_or_init`]
//! does both).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fedpool_common::adapter::PoolSpec;
use fedpool_common::checkpoint::{
    checkpoint_path, latest_valid_pool, list_checkpoints, read_tensors, write_pool, write_tensors, CheckpointError,
    CheckpointMeta,
};
use fedpool_common::{AdapterPool, BackboneFingerprint, HostTensor, Round};

use crate::round::{Commit, RoundRecord};

/// The round log's file name in a store folder.
pub const ROUND_LOG: &str = "rounds.jsonl";

/// Metadata key naming the round a server-state file belongs to.
const META_ROUND: &str = "fedpool.round";

/// Where the server optimiser's state after `round` is kept in a store folder.
pub fn server_state_path(dir: &Path, round: Round) -> PathBuf {
    dir.join(format!("server-state-{:06}.safetensors", round.0))
}

/// Largest safetensors header read when checking a checkpoint's metadata (safetensors' own cap).
const MAX_HEADER: u64 = 100 << 20;

/// Why the store could not open, resume or commit.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or folder operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The folder holds a checkpoint of another run (another pool spec or backbone).
    #[error("{}: checkpoint of another run: {problem}", path.display())]
    Foreign {
        /// The checkpoint.
        path: PathBuf,
        /// What differs.
        problem: String,
    },
    /// A line of the round log does not parse.
    #[error("{}, line {line}: {problem}", path.display())]
    Log {
        /// The log.
        path: PathBuf,
        /// The line number (1-based).
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A commit or initial pool that does not follow the store's history.
    #[error("{0}")]
    Order(String),
    /// Checkpoint files exist but none verifies: starting afresh would hide the problem.
    #[error("no checkpoint in {} verifies (newest: {newest}); move them away to start afresh", dir.display())]
    NoValidCheckpoint {
        /// The store's folder.
        dir: PathBuf,
        /// Why the newest one was refused.
        newest: String,
    },
    /// The caller's initial pool could not be made.
    #[error("initialising the pool: {0}")]
    Init(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Where a run resumes.
#[derive(Debug, Default)]
pub struct Resume {
    /// The newest complete checkpoint: the round it holds the result of (0: the initial pool)
    /// and its pool. `None` in a fresh folder: initialise a pool and pass it to
    /// [`Store::write_initial`].
    pub latest: Option<(Round, AdapterPool)>,
    /// The checkpoint file `latest` came from.
    pub path: Option<PathBuf>,
    /// The server optimiser's state saved with `latest` (empty if none was saved: a plain
    /// average, round 0, or a store written before states were kept).
    pub server_state: BTreeMap<String, HostTensor>,
    /// Newer checkpoint files that did not verify and were skipped, with why.
    pub skipped: Vec<String>,
}

/// A store folder, opened: checkpoints and the round log.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    spec: PoolSpec,
    backbone: BackboneFingerprint,
    log_path: PathBuf,
    log: File,
    records: Vec<RoundRecord>,
    /// The newest round on disk (None before the initial pool is written).
    last: Option<Round>,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` for pools of `spec` on `backbone`, repairs
    /// the round log after a crash, and says where to resume. See the module documentation.
    pub fn open(dir: &Path, spec: PoolSpec, backbone: BackboneFingerprint) -> Result<(Store, Resume), StoreError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        check_foreign(dir, &spec, backbone)?;

        let latest = latest_valid_pool(dir).map_err(io(dir))?;
        for skipped in &latest.skipped {
            tracing::warn!(error = %skipped, "skipping a checkpoint that does not verify");
        }
        let skipped: Vec<String> = latest.skipped.iter().map(ToString::to_string).collect();
        let resume = match latest.checkpoint {
            None => {
                if let Some(newest) = latest.skipped.first() {
                    // Files exist but none verifies: starting over would hide the problem.
                    return Err(StoreError::NoValidCheckpoint { dir: dir.to_path_buf(), newest: newest.to_string() });
                }
                Resume { skipped, ..Resume::default() }
            }
            Some(c) => {
                if c.meta.spec != spec || c.pool.spec_hash != spec.hash() {
                    return Err(StoreError::Foreign { path: c.path, problem: "another pool spec".into() });
                }
                if c.meta.backbone != backbone {
                    return Err(StoreError::Foreign { path: c.path, problem: "another backbone".into() });
                }
                let server_state = read_server_state(dir, c.meta.round)?;
                Resume { latest: Some((c.meta.round, c.pool)), path: Some(c.path), server_state, skipped }
            }
        };

        let log_path = dir.join(ROUND_LOG);
        let created = !log_path.exists();
        let mut log = OpenOptions::new().read(true).append(true).create(true).open(&log_path).map_err(io(&log_path))?;
        if created {
            sync_dir(dir)?;
        }
        let records = read_log(&log_path, &mut log)?;
        let last = resume.latest.as_ref().map(|(round, _)| *round);
        let mut store = Store { dir: dir.to_path_buf(), spec, backbone, log_path, log, records, last };

        if let (Some((round, _)), Some(path)) = (&resume.latest, &resume.path) {
            if round.0 > 0 && !store.records.iter().any(|r| r.round == round.0) {
                tracing::warn!(
                    %round,
                    file = %path.display(),
                    "the newest checkpoint has no line in {ROUND_LOG} (crash between the two writes); appending a recovered line"
                );
                store.append(&recovered_record(*round))?;
            }
            if let Some(r) = store.records.iter().find(|r| r.round > round.0) {
                tracing::warn!(
                    logged = r.round,
                    resumed = %round,
                    "{ROUND_LOG} has lines for rounds after the resumed checkpoint; they will be logged again"
                );
            }
        }
        Ok((store, resume))
    }

    /// Opens the store and, in a fresh folder, writes the pool `init` returns as round 0. Returns
    /// the store, the round to continue after and its pool.
    pub fn open_or_init<E: std::fmt::Display>(
        dir: &Path,
        spec: PoolSpec,
        backbone: BackboneFingerprint,
        init: impl FnOnce(&PoolSpec) -> Result<AdapterPool, E>,
    ) -> Result<(Store, Round, AdapterPool), StoreError> {
        let (mut store, resume) = Self::open(dir, spec, backbone)?;
        match resume.latest {
            Some((round, pool)) => Ok((store, round, pool)),
            None => {
                let pool = init(&store.spec).map_err(|e| StoreError::Init(e.to_string()))?;
                store.write_initial(&pool)?;
                Ok((store, Round(0), pool))
            }
        }
    }

    /// Writes the initial pool as the round 0 checkpoint (only into a store with no checkpoint).
    pub fn write_initial(&mut self, pool: &AdapterPool) -> Result<PathBuf, StoreError> {
        if let Some(last) = self.last {
            return Err(StoreError::Order(format!(
                "{} already holds round {last}: the initial pool is written only once",
                self.dir.display()
            )));
        }
        let path = checkpoint_path(&self.dir, Round(0));
        write_pool(&path, pool, &CheckpointMeta::now(Round(0), self.spec.clone(), self.backbone))?;
        self.last = Some(Round(0));
        tracing::info!(file = %path.display(), "initial pool written");
        Ok(path)
    }

    /// Persists a committed round: its checkpoint (atomically), then its log line (appended and
    /// fsync'd). Returns the checkpoint's path. Rounds must come in increasing order.
    pub fn commit(&mut self, commit: &Commit) -> Result<PathBuf, StoreError> {
        if let Some(last) = self.last {
            if commit.round <= last {
                return Err(StoreError::Order(format!(
                    "cannot commit round {}: round {last} is already on disk",
                    commit.round
                )));
            }
        }
        if commit.record.round != commit.round.0 {
            return Err(StoreError::Order(format!(
                "commit of round {} carries the record of round {}",
                commit.round, commit.record.round
            )));
        }
        if !commit.server_state.is_empty() {
            let meta = BTreeMap::from([(META_ROUND.to_string(), commit.round.0.to_string())]);
            write_tensors(&server_state_path(&self.dir, commit.round), &commit.server_state, meta)?;
        }
        let path = checkpoint_path(&self.dir, commit.round);
        write_pool(&path, &commit.pool, &CheckpointMeta::now(commit.round, self.spec.clone(), self.backbone))?;
        self.last = Some(commit.round);
        self.append(&commit.record)?;
        Ok(path)
    }

    /// Adds the federated evaluation of `round` to that round's line of the log: the log is
    /// rewritten atomically (temp file, fsync, rename), so a crash leaves the old or the new log.
    pub fn record_eval(&mut self, round: Round, eval: &crate::round::EvalRecord) -> Result<(), StoreError> {
        let Some(i) = self.records.iter().rposition(|r| r.round == round.0) else {
            return Err(StoreError::Order(format!(
                "no line for round {round} in {} to add its evaluation to",
                self.log_path.display()
            )));
        };
        let mut records = self.records.clone();
        records[i].eval = Some(eval.clone());
        let mut text = String::new();
        for (n, r) in records.iter().enumerate() {
            let line = serde_json::to_string(r).map_err(|e| StoreError::Log {
                path: self.log_path.clone(),
                line: n + 1,
                problem: format!("cannot serialise the record: {e}"),
            })?;
            text.push_str(&line);
            text.push('\n');
        }
        let path = self.log_path.clone();
        fedpool_common::checkpoint::atomic_write(&path, text.as_bytes()).map_err(io(&path))?;
        self.log = OpenOptions::new().read(true).append(true).open(&path).map_err(io(&path))?;
        self.records = records;
        Ok(())
    }

    /// The round log, oldest first (as read at open, plus the lines appended since).
    pub fn rounds(&self) -> &[RoundRecord] {
        &self.records
    }

    /// The newest round on disk (None in a fresh store before [`Store::write_initial`]).
    pub fn last_round(&self) -> Option<Round> {
        self.last
    }

    /// The store's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The round log's path.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn append(&mut self, record: &RoundRecord) -> Result<(), StoreError> {
        let mut line = serde_json::to_string(record).map_err(|e| StoreError::Log {
            path: self.log_path.clone(),
            line: self.records.len() + 1,
            problem: format!("cannot serialise the record: {e}"),
        })?;
        line.push('\n');
        let path = &self.log_path;
        self.log.write_all(line.as_bytes()).map_err(io(path))?;
        self.log.sync_data().map_err(io(path))?;
        self.records.push(record.clone());
        Ok(())
    }
}

/// The server optimiser's state saved with `round`'s checkpoint; empty if there is none. A file
/// that does not read or verify is an error naming it (delete it to restart the optimiser's
/// state from zero).
fn read_server_state(dir: &Path, round: Round) -> Result<BTreeMap<String, HostTensor>, StoreError> {
    let path = server_state_path(dir, round);
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let (tensors, meta) = read_tensors(&path)?;
    if meta.get(META_ROUND).map(String::as_str) != Some(round.0.to_string().as_str()) {
        return Err(StoreError::Foreign {
            path,
            problem: format!("the server state of round {:?}, not of round {round}", meta.get(META_ROUND)),
        });
    }
    Ok(tensors)
}

/// The line written for a checkpoint whose log line was lost.
fn recovered_record(round: Round) -> RoundRecord {
    RoundRecord {
        round: round.0,
        attempt: 0,
        clients: Vec::new(),
        examples: 0,
        bytes_up: 0,
        bytes_down: 0,
        rejected: BTreeMap::new(),
        stragglers: Vec::new(),
        train_loss: None,
        train_accuracy: None,
        started_at_secs: 0.0,
        committed_at_secs: 0.0,
        recovered: true,
        eval: None,
    }
}

/// Reads the round log, truncating a torn last line (no trailing newline) away.
fn read_log(path: &Path, log: &mut File) -> Result<Vec<RoundRecord>, StoreError> {
    let mut bytes = Vec::new();
    log.seek(SeekFrom::Start(0)).map_err(io(path))?;
    log.read_to_end(&mut bytes).map_err(io(path))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        tracing::warn!(
            file = %path.display(),
            bytes = bytes.len() - complete,
            "truncating a torn last line of the round log (crash mid-append)"
        );
        log.set_len(complete as u64).map_err(io(path))?;
        log.sync_data().map_err(io(path))?;
        bytes.truncate(complete);
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| StoreError::Log {
        path: path.to_path_buf(),
        line: bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1,
        problem: "not UTF-8".into(),
    })?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| StoreError::Log {
            path: path.to_path_buf(),
            line: i + 1,
            problem: e.to_string(),
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Checks the header of every checkpoint in `dir` (reading its metadata only): each must be of
/// `spec` and `backbone`. Files whose header cannot be read are left to `latest_valid_pool`.
fn check_foreign(dir: &Path, spec: &PoolSpec, backbone: BackboneFingerprint) -> Result<(), StoreError> {
    let want_spec = spec.hash().0.to_hex();
    let want_backbone = backbone.0.to_hex();
    for (_, path) in list_checkpoints(dir).map_err(io(dir))? {
        let meta = match read_header_metadata(&path) {
            Ok(m) => m,
            Err(problem) => {
                tracing::warn!(file = %path.display(), %problem, "cannot read a checkpoint's header");
                continue;
            }
        };
        let got_spec = meta.get("fedpool.spec_hash").map(String::as_str).unwrap_or("");
        if got_spec != want_spec {
            return Err(StoreError::Foreign {
                path,
                problem: format!(
                    "pool spec {} where this run trains spec {}",
                    &got_spec[..got_spec.len().min(16)],
                    &want_spec[..16]
                ),
            });
        }
        let got_backbone = meta.get("fedpool.backbone").map(String::as_str).unwrap_or("");
        if got_backbone != want_backbone {
            return Err(StoreError::Foreign {
                path,
                problem: format!(
                    "backbone {} where this run uses backbone {}",
                    &got_backbone[..got_backbone.len().min(16)],
                    &want_backbone[..16]
                ),
            });
        }
    }
    Ok(())
}

/// The `__metadata__` of a safetensors file, from its header alone (8-byte length + JSON).
fn read_header_metadata(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| format!("header length: {e}"))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(format!("header of {n} bytes is too large"));
    }
    let mut header = Vec::new();
    f.take(n).read_to_end(&mut header).map_err(|e| e.to_string())?;
    if header.len() as u64 != n {
        return Err(format!("header truncated: {} of {n} bytes", header.len()));
    }
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: BTreeMap<String, String>,
    }
    let h: Header = serde_json::from_slice(&header).map_err(|e| format!("header JSON: {e}"))?;
    Ok(h.metadata)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}
