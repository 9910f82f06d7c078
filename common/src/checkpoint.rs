//! Pools (and any named tensors, such as an error-feedback residual) to and from safetensors
//! files, written atomically and verified on read.
//!
//! A write goes to a temporary file beside the target (`.NAME.tmp.PID`), is fsync'd, renamed over
//! the target, and the folder is fsync'd: a crash leaves either the old file or the new one, plus
//! at worst a temporary file that readers ignore. Every file carries a SHA-256 of its tensors in
//! its metadata, so a flipped byte anywhere is refused on read, with the file's name.

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

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
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
/// format tag and the data digest.
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let mut meta: HashMap<String, String> = metadata.into_iter().collect();
    meta.entry(META_FORMAT.into()).or_insert_with(|| FORMAT_TENSORS.into());
    meta.insert(META_DATA_SHA256.into(), data_digest(tensors).to_hex());
    let views = tensors.iter().map(|(n, t)| (n.as_str(), F32View(t)));
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| CheckpointError::new(path, e))?;
    atomic_write(path, &bytes).map_err(|e| CheckpointError::new(path, e))
}

/// Reads a file written by [`write_tensors`]: parses it, checks every tensor is f32, and checks
/// the data digest.
pub fn read_tensors(path: &Path) -> Result<(NamedTensors, Metadata), CheckpointError> {
    let bytes = fs::read(path).map_err(|e| CheckpointError::new(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| CheckpointError::new(path, format!("not a valid safetensors file ({e})")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| CheckpointError::new(path, e))?;
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

/// Writes a pool checkpoint atomically. The pool must follow `meta.spec`.
pub fn write_pool(path: &Path, pool: &AdapterPool, meta: &CheckpointMeta) -> Result<(), CheckpointError> {
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
    write_tensors(path, &pool.tensors, metadata)
}

/// Reads and verifies a pool checkpoint: digest, format, metadata, and the pool against its spec.
pub fn read_pool(path: &Path) -> Result<(AdapterPool, CheckpointMeta), CheckpointError> {
    let (tensors, meta) = read_tensors(path)?;
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
