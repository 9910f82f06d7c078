//! Atomic round checkpoints and the round log; resume after a crash (docs/design.md, principle 6:
//! nothing committed is lost).
//!
//! ## Layout of a state folder
//! - `round-NNNNNN.safetensors`: the pool after round N (round 0: the initial pool), written by
//!   `fedpool_common::checkpoint` (temp file, fsync, rename, fsync of the folder);
//! - `server-state-NNNNNN.safetensors`: the server optimiser's state after round N (FedAdam's
//!   moments), written just before its checkpoint, so a checkpoint on disk always has its state
//!   beside it;
//! - `rounds.jsonl`: the round log, append-only: one [`RoundRecord`] line per committed round and
//!   one `{"eval_of": N, ...}` line per federated evaluation, merged into round N's record when
//!   read ([`read_round_log`], the one reader);
//! - `LOCK`: held by the one server using the folder, naming it (pid, host, start time).
//!
//! On Unix the folder is `0700` and every file in it `0600` (those of older runs are tightened
//! at open): checkpoints are derived from the clients' private data.
//!
//! ## Commit
//! [`Store::commit`] writes the server state, then the checkpoint, then appends the round's line
//! and fsyncs it: the checkpoint is the truth, the log its account. Then the [`Retention`] rule
//! deletes old checkpoints and their server states: the newest `keep_last`, every multiple of
//! `keep_every` and round 0 stay, and so does the newest, always (the one a restart resumes
//! from). A deletion that fails is logged, never an error. [`Store::record_eval`] appends one
//! fsync'd line: the log is never rewritten.
//!
//! ## Open and resume
//! At [`Store::open`]:
//! - the folder is locked (`LOCK`, an OS lock held for the store's life and released on drop or
//!   crash): a second server on the same folder gets [`StoreError::Locked`] naming the holder;
//! - every checkpoint's header is read (not its tensors) and one made for another pool spec or
//!   backbone is an error naming the file — runs are never mixed silently;
//! - the newest checkpoint that reads and verifies is the one to resume from (newer ones that do
//!   not are skipped with a warning, left alone by retention, and overwritten when their round is
//!   committed again);
//! - a torn last line of the log (a crash mid-append: bytes after the last newline) is truncated
//!   away;
//! - if the resumed round (≥ 1) has no line (a crash between the checkpoint and the line), a line
//!   marked `recovered` is appended for it;
//! - the resumed round's server state is read back (a damaged file is an error naming it).
//!
//! A fresh folder resumes nothing: the caller initialises a pool and hands it to
//! [`Store::write_initial`], so the initial pool (round 0) is on disk too ([`Store::open_or_init`]
//! does both).

mod lock;
mod log;
mod retention;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use fedpool_common::adapter::PoolSpec;
use fedpool_common::checkpoint::{
    checkpoint_path, latest_valid_pool, list_checkpoints, read_tensors, write_pool_private, write_tensors_private,
    CheckpointError, CheckpointMeta,
};
use fedpool_common::{AdapterPool, BackboneFingerprint, HostTensor, Round};

use crate::round::{Commit, EvalRecord, RoundRecord};

pub use lock::LOCK_FILE;
pub use log::{read_round_log, ROUND_LOG};
pub use retention::Retention;

use lock::StateLock;
use log::LogFile;

/// Metadata key naming the round a server-state file belongs to.
const META_ROUND: &str = "fedpool.round";

/// Mode of every file in a state folder (Unix): the private writers' mode.
#[cfg(unix)]
use fedpool_common::checkpoint::PRIVATE_FILE_MODE as PRIVATE_FILE;
/// Mode of a state folder (Unix).
#[cfg(unix)]
const PRIVATE_DIR: u32 = 0o700;

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
    /// Another process holds the state folder's lock: two servers must never share one folder.
    #[error(
        "{}: the state folder is in use by {holder}; stop that server or give this one another state_dir",
        path.display()
    )]
    Locked {
        /// The lock file (`state_dir/LOCK`).
        path: PathBuf,
        /// Who holds it, as it wrote itself into the file (pid, host, start time).
        holder: String,
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

/// A store folder, opened and locked: checkpoints and the round log. The folder stays locked
/// until the store is dropped.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    spec: PoolSpec,
    backbone: BackboneFingerprint,
    log: LogFile,
    records: Vec<RoundRecord>,
    /// The newest round on disk (None before the initial pool is written).
    last: Option<Round>,
    retention: Retention,
    /// Declared last: dropped (unlocked) after the log file is closed.
    lock: StateLock,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` for pools of `spec` on `backbone`, repairs
    /// the round log after a crash, and says where to resume. See the module documentation.
    pub fn open(dir: &Path, spec: PoolSpec, backbone: BackboneFingerprint) -> Result<(Store, Resume), StoreError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        // First of all: nothing below (the log's repair above all) may touch another server's files.
        let lock = StateLock::acquire(dir)?;
        make_private(dir);
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

        let (log, records, created) = LogFile::open(dir)?;
        if created {
            sync_dir(dir)?;
        }
        let last = resume.latest.as_ref().map(|(round, _)| *round);
        let mut store =
            Store { dir: dir.to_path_buf(), spec, backbone, log, records, last, retention: Retention::default(), lock };

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

    /// The store with `retention` deciding which checkpoints stay after each commit (from the
    /// next commit on; [`Retention::default`] until then).
    pub fn with_retention(mut self, retention: Retention) -> Store {
        self.retention = retention;
        self
    }

    /// The rule deciding which checkpoints stay after each commit.
    pub fn retention(&self) -> Retention {
        self.retention
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
        write_pool_private(&path, pool, &CheckpointMeta::now(Round(0), self.spec.clone(), self.backbone))?;
        self.last = Some(Round(0));
        tracing::info!(file = %path.display(), "initial pool written");
        Ok(path)
    }

    /// Persists a committed round: its server state and checkpoint (atomically), then its log
    /// line (appended and fsync'd); then deletes the checkpoints [`Store::retention`] does not
    /// keep. Returns the checkpoint's path. Rounds must come in increasing order.
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
            write_tensors_private(&server_state_path(&self.dir, commit.round), &commit.server_state, meta)?;
        }
        let path = checkpoint_path(&self.dir, commit.round);
        write_pool_private(&path, &commit.pool, &CheckpointMeta::now(commit.round, self.spec.clone(), self.backbone))?;
        self.last = Some(commit.round);
        self.append(&commit.record)?;
        // The round is on disk: only now may older checkpoints go.
        retention::prune(&self.dir, &self.retention, commit.round);
        Ok(path)
    }

    /// Adds the federated evaluation of `round` to the log: one line of its own
    /// (`{"eval_of": N, ...}`), appended and fsync'd, merged into round N's record when read. The
    /// log is never rewritten, so recording costs one line however long the run.
    pub fn record_eval(&mut self, round: Round, eval: &EvalRecord) -> Result<(), StoreError> {
        let Some(i) = self.records.iter().rposition(|r| r.round == round.0) else {
            return Err(StoreError::Order(format!(
                "no line for round {round} in {} to add its evaluation to",
                self.log.path().display()
            )));
        };
        let line = log::eval_line(round.0, eval).map_err(|e| StoreError::Log {
            path: self.log.path().to_path_buf(),
            line: self.records.len() + 1,
            problem: format!("cannot serialise the evaluation: {e}"),
        })?;
        self.log.append(&line)?;
        self.records[i].eval = Some(eval.clone());
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
        self.log.path()
    }

    /// The lock file's path (`state_dir/LOCK`).
    pub fn lock_path(&self) -> &Path {
        self.lock.path()
    }

    fn append(&mut self, record: &RoundRecord) -> Result<(), StoreError> {
        let line = log::round_line(record).map_err(|e| StoreError::Log {
            path: self.log.path().to_path_buf(),
            line: self.records.len() + 1,
            problem: format!("cannot serialise the record: {e}"),
        })?;
        self.log.append(&line)?;
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
        median_update_norm: None,
        eval: None,
    }
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

/// Makes a state folder and the store's files in it readable by their owner only (`0700`,
/// `0600`): a folder or files of an older run are tightened. A failure is logged: the files stay
/// as they were, the store works.
fn make_private(dir: &Path) {
    #[cfg(unix)]
    {
        restrict(dir, PRIVATE_DIR);
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name == ROUND_LOG
                || name == LOCK_FILE
                || (name.ends_with(".safetensors")
                    && (name.starts_with("round-") || name.starts_with("server-state-")));
            if ours {
                restrict(&entry.path(), PRIVATE_FILE);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Sets `path`'s mode to `mode` if it allows more (group or others).
#[cfg(unix)]
fn restrict(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::metadata(path) else { return };
    let current = meta.permissions().mode() & 0o777;
    if current & !mode == 0 {
        return;
    }
    match fs::set_permissions(path, fs::Permissions::from_mode(mode)) {
        Ok(()) => {
            tracing::debug!(file = %path.display(), from = %format!("{current:o}"), to = %format!("{mode:o}"), "tightened")
        }
        Err(error) => tracing::warn!(file = %path.display(), %error, "cannot make a state file private"),
    }
}
