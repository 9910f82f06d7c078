//! Pools (and any named tensors, such as an error-feedback residual) to and from safetensors
//! files, written atomically and verified on read.
//!
//! A write goes to a temporary file beside the target (`.NAME.tmp.PID`), is fsync'd, renamed over
//! the target, and the folder is fsync'd: a crash leaves either the old file or the new one, plus
//! at worst a temporary file that readers ignore. Every file carries a SHA-256 of its tensors in
//! its metadata, so a flipped byte anywhere is refused on read, with the file's name.
//!
//! Two kinds of files are written: files meant for people and other tools (an exported adapter,
//! metrics) with the process's default mode (`0666` less the umask: [`atomic_write`],
//! [`write_tensors`], [`write_pool`]), and state derived from private data (the coordinator's
//! checkpoints and log, a client's error-feedback residual) readable by its owner only: the
//! `*_private` variants create the temporary file with mode `0600` on Unix, so the file is never
//! readable by others, not even between its creation and the rename.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use safetensors::tensor::{Dtype, TensorView};

use crate::adapter::{AdapterPool, PoolSpec};
use crate::ids::{BackboneFingerprint, Round, Sha256};
use crate::tensor::HostTensor;

/// Metadata key: the file format and its version.
pub const META_FORMAT: &str = "fedpool.format";
/// Metadata key: SHA-256 over every tensor's name, shape and bytes, in name order.
pub const META_DATA_SHA256: &str = "fedpool.data_sha256";
const FORMAT_TENSORS: &str = "fedpool-tensors-v1";
const FORMAT_POOL: &str = "fedpool-pool-v1";
const CHECKPOINT_PREFIX: &str = "round-";
const CHECKPOINT_SUFFIX: &str = ".safetensors";

/// Named tensors, as stored in a file.
pub type NamedTensors = BTreeMap<String, HostTensor>;
/// A file's string metadata.
pub type Metadata = BTreeMap<String, String>;

/// A checkpoint that could not be written or read, with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {}: {problem}", path.display())]
pub struct CheckpointError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub problem: String,
}

impl CheckpointError {
    fn new(path: &Path, problem: impl ToString) -> Self {
        Self { path: path.to_path_buf(), problem: problem.to_string() }
    }
}

/// What a pool checkpoint says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// The committed round the pool is the result of (0: the initial pool).
    pub round: Round,
    /// The pool's spec (stored whole, so a checkpoint is self-describing).
    pub spec: PoolSpec,
    /// The backbone the pool was trained on.
    pub backbone: BackboneFingerprint,
    /// When the file was written, RFC 3339 (UTC, seconds).
    pub created_at: String,
}

impl CheckpointMeta {
    /// Metadata for a pool of `spec` at `round` on `backbone`, stamped now.
    pub fn now(round: Round, spec: PoolSpec, backbone: BackboneFingerprint) -> Self {
        let created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        Self { round, spec, backbone, created_at }
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder. The
/// file gets the default mode (`0666` less the umask); see [`atomic_write_private`] for state.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, Access::Default)
}

/// [`atomic_write`] for a file readable and writable by its owner only (mode `0600` on Unix, set
/// on the temporary file before any byte is written; elsewhere the default).
pub fn atomic_write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, Access::Private)
}

/// Who may read a file written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The process's default (`0666` less the umask).
    Default,
    /// The owner only (`0600`).
    Private,
}

/// The mode of files written with [`atomic_write_private`] and the other `*_private` writers.
#[cfg(unix)]
pub const PRIVATE_FILE_MODE: u32 = 0o600;

fn write_atomically(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = create_temp(&tmp, access)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates (or truncates) the temporary file of an atomic write with the mode `access` asks for.
fn create_temp(tmp: &Path, access: Access) -> std::io::Result<File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(PRIVATE_FILE_MODE);
        let f = options.open(tmp)?;
        // A stale temporary file of the same name keeps its old mode through `open`: set it.
        f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
        return Ok(f);
    }
    #[cfg(not(unix))]
    let _ = access;
    options.open(tmp)
}

struct F32View<'a>(&'a HostTensor);

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.0.data().iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.numel() * 4
    }
}

fn data_digest(tensors: &BTreeMap<String, HostTensor>) -> Sha256 {
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(tensors.len() * 3);
    for (name, t) in tensors {
        parts.push(name.as_bytes().to_vec());
        parts.push(t.shape().iter().flat_map(|&d| (d as u64).to_le_bytes()).collect());
        parts.push(t.data().iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    Sha256::of_parts(parts.iter().map(Vec::as_slice))
}

/// Writes named f32 tensors and string metadata to a safetensors file, atomically, adding the
/// format tag and the data digest. The file gets the default mode; see [`write_tensors_private`].
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    write_tensors_as(path, tensors, metadata, Access::Default)
}

/// [`write_tensors`] for a file readable by its owner only (mode `0600` on Unix): state derived
/// from private data, such as a client's error-feedback residual.
pub fn write_tensors_private(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    write_tensors_as(path, tensors, metadata, Access::Private)
}

fn write_tensors_as(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: BTreeMap<String, String>,
    access: Access,
) -> Result<(), CheckpointError> {
    let mut meta: HashMap<String, String> = metadata.into_iter().collect();
    meta.entry(META_FORMAT.into()).or_insert_with(|| FORMAT_TENSORS.into());
    meta.insert(META_DATA_SHA256.into(), data_digest(tensors).to_hex());
    let views = tensors.iter().map(|(n, t)| (n.as_str(), F32View(t)));
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| CheckpointError::new(path, e))?;
    write_atomically(path, &bytes, access).map_err(|e| CheckpointError::new(path, e))
}

/// Reads a file written by [`write_tensors`]: parses it, checks every tensor is f32, and checks
/// the data digest.
pub fn read_tensors(path: &Path) -> Result<(NamedTensors, Metadata), CheckpointError> {
    let bytes = fs::read(path).map_err(|e| CheckpointError::new(path, e))?;
    tensors_from_bytes(path, &bytes)
}

/// [`read_tensors`] on a file's bytes already in memory (`path` only names them in errors): the
/// same checks, no I/O. The fuzz target `checkpoint` feeds it.
pub fn tensors_from_bytes(path: &Path, bytes: &[u8]) -> Result<(NamedTensors, Metadata), CheckpointError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::new(path, format!("not a valid safetensors file ({e})")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::new(path, e))?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        tensors.insert(
            name.clone(),
            host_tensor(&view).map_err(|p| CheckpointError::new(path, format!("tensor {name:?}: {p}")))?,
        );
    }
    let expected =
        meta.get(META_DATA_SHA256).ok_or_else(|| CheckpointError::new(path, "no data digest: not a fedpool file"))?;
    if data_digest(&tensors).to_hex() != *expected {
        return Err(CheckpointError::new(path, "data digest mismatch: the file is corrupted"));
    }
    Ok((tensors, meta))
}

fn host_tensor(view: &TensorView<'_>) -> Result<HostTensor, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!("dtype {:?}, expected F32", view.dtype()));
    }
    let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    HostTensor::new(view.shape().to_vec(), data).map_err(|e| e.to_string())
}

/// Writes a pool checkpoint atomically, with the default mode (an adapter exported for people
/// and tools). The pool must follow `meta.spec`. See [`write_pool_private`].
pub fn write_pool(path: &Path, pool: &AdapterPool, meta: &CheckpointMeta) -> Result<(), CheckpointError> {
    write_pool_as(path, pool, meta, Access::Default)
}

/// [`write_pool`] for a file readable by its owner only (mode `0600` on Unix): the coordinator's
/// round checkpoints.
pub fn write_pool_private(path: &Path, pool: &AdapterPool, meta: &CheckpointMeta) -> Result<(), CheckpointError> {
    write_pool_as(path, pool, meta, Access::Private)
}

fn write_pool_as(
    path: &Path,
    pool: &AdapterPool,
    meta: &CheckpointMeta,
    access: Access,
) -> Result<(), CheckpointError> {
    pool.validate(&meta.spec).map_err(|e| CheckpointError::new(path, format!("pool does not fit its spec: {e}")))?;
    let spec_json = serde_json::to_string(&meta.spec).map_err(|e| CheckpointError::new(path, e))?;
    let metadata = BTreeMap::from([
        (META_FORMAT.to_string(), FORMAT_POOL.to_string()),
        ("fedpool.round".to_string(), meta.round.0.to_string()),
        ("fedpool.spec".to_string(), spec_json),
        ("fedpool.spec_hash".to_string(), pool.spec_hash.0.to_hex()),
        ("fedpool.backbone".to_string(), meta.backbone.0.to_hex()),
        ("fedpool.created_at".to_string(), meta.created_at.clone()),
    ]);
    write_tensors_as(path, &pool.tensors, metadata, access)
}

/// Reads and verifies a pool checkpoint: digest, format, metadata, and the pool against its spec.
pub fn read_pool(path: &Path) -> Result<(AdapterPool, CheckpointMeta), CheckpointError> {
    let bytes = fs::read(path).map_err(|e| CheckpointError::new(path, e))?;
    pool_from_bytes(path, &bytes)
}

/// [`read_pool`] on a file's bytes already in memory (`path` only names them in errors): the
/// same checks, no I/O. The fuzz target `checkpoint` feeds it.
pub fn pool_from_bytes(path: &Path, bytes: &[u8]) -> Result<(AdapterPool, CheckpointMeta), CheckpointError> {
    let (tensors, meta) = tensors_from_bytes(path, bytes)?;
    let err = |p: String| CheckpointError::new(path, p);
    let get = |k: &str| meta.get(k).ok_or_else(|| err(format!("metadata has no {k:?}")));
    if get(META_FORMAT)? != FORMAT_POOL {
        return Err(err(format!("format {:?} is not {FORMAT_POOL:?}", meta[META_FORMAT])));
    }
    let round = get("fedpool.round")?.parse::<u64>().map_err(|e| err(format!("bad round: {e}")))?;
    let spec: PoolSpec = serde_json::from_str(get("fedpool.spec")?).map_err(|e| err(format!("bad spec: {e}")))?;
    let backbone = Sha256::from_hex(get("fedpool.backbone")?).ok_or_else(|| err("bad backbone fingerprint".into()))?;
    let spec_hash = Sha256::from_hex(get("fedpool.spec_hash")?).ok_or_else(|| err("bad spec hash".into()))?;
    let pool = AdapterPool { spec_hash: crate::ids::SpecHash(spec_hash), tensors };
    pool.validate(&spec).map_err(|e| err(format!("pool does not fit its spec: {e}")))?;
    let meta = CheckpointMeta {
        round: Round(round),
        spec,
        backbone: BackboneFingerprint(backbone),
        created_at: get("fedpool.created_at")?.clone(),
    };
    Ok((pool, meta))
}

/// The checkpoint file of `round` in `dir`: `round-000007.safetensors`.
pub fn checkpoint_path(dir: &Path, round: Round) -> PathBuf {
    dir.join(format!("{CHECKPOINT_PREFIX}{:06}{CHECKPOINT_SUFFIX}", round.0))
}

/// The round checkpoints in `dir`, oldest first. Temporary files of interrupted writes and
/// anything not named like a checkpoint are ignored (their content is not checked here).
pub fn list_checkpoints(dir: &Path) -> std::io::Result<Vec<(Round, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let round = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .and_then(|r| r.strip_suffix(CHECKPOINT_SUFFIX))
            .and_then(|r| r.parse::<u64>().ok());
        if let Some(r) = round {
            out.push((Round(r), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A pool read back from its checkpoint file.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// The pool.
    pub pool: AdapterPool,
    /// Its metadata.
    pub meta: CheckpointMeta,
    /// The file it came from.
    pub path: PathBuf,
}

/// What [`latest_valid_pool`] found.
#[derive(Debug, Default)]
pub struct Latest {
    /// The newest checkpoint that reads and verifies, if any.
    pub checkpoint: Option<LoadedCheckpoint>,
    /// Newer checkpoint files that did not, newest first, with why.
    pub skipped: Vec<CheckpointError>,
}

/// The newest checkpoint in `dir` that reads and verifies, skipping (and reporting) newer ones
/// that do not.
pub fn latest_valid_pool(dir: &Path) -> std::io::Result<Latest> {
    let mut latest = Latest::default();
    for (_, path) in list_checkpoints(dir)?.into_iter().rev() {
        match read_pool(&path) {
            Ok((pool, meta)) => {
                latest.checkpoint = Some(LoadedCheckpoint { pool, meta, path });
                return Ok(latest);
            }
            Err(e) => latest.skipped.push(e),
        }
    }
    Ok(latest)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_writes_are_0600_even_over_a_world_readable_target_and_a_stale_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        // A world-readable target and a stale temporary file of this process's name.
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let stale = dir.path().join(format!(".state.safetensors.tmp.{}", std::process::id()));
        fs::write(&stale, b"stale").unwrap();
        fs::set_permissions(&stale, fs::Permissions::from_mode(0o666)).unwrap();
        let t = BTreeMap::from([("x".to_string(), HostTensor::new(vec![2], vec![1.0, 2.0]).unwrap())]);
        write_tensors_private(&path, &t, BTreeMap::new()).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!stale.exists(), "the temporary file was renamed over the target");
        assert_eq!(read_tensors(&path).unwrap().0, t);
        atomic_write_private(&path, b"bytes").unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn default_writes_keep_the_default_mode_for_exported_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter.json");
        atomic_write(&path, b"{}").unwrap();
        let probe = dir.path().join("probe");
        File::create(&probe).unwrap();
        assert_eq!(mode(&path), mode(&probe), "same as any file the process creates");
    }
}
