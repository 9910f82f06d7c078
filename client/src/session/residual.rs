//! The error-feedback residual on disk (docs/design.md, "Compression"): what top-k left out of earlier
//! uploads, kept in the state folder so that a restart loses none of it. With FedSA-LoRA the file
//! also holds the client's own B (`participant::PERSONAL_PREFIX` keys), saved by the same rule.
//!
//! The residual is saved only once the server **acknowledged** the update it belongs with: an
//! upload that was refused or cut off (a crash mid-upload) leaves the file as it was, so the values
//! it would have carried are sent again later instead of being lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedpool_common::checkpoint::{read_tensors, write_tensors_private, CheckpointError};
use fedpool_common::codec::ErrorFeedback;
use fedpool_common::SpecHash;

use crate::participant::MemoryResidual;

/// The residual file's name in the state folder.
pub const RESIDUAL_FILE: &str = "residual.safetensors";

/// Metadata key naming the pool spec the residual belongs to.
const META_SPEC: &str = "fedpool.spec_hash";

/// Where a client's residual lives.
#[derive(Debug, Clone)]
pub struct ResidualStore {
    path: PathBuf,
    spec: SpecHash,
}

impl ResidualStore {
    /// The residual of pools of `spec` in `state_dir`.
    pub fn new(state_dir: &Path, spec: SpecHash) -> Self {
        Self { path: state_dir.join(RESIDUAL_FILE), spec }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved residual; empty if there is none yet. A residual of another pool spec (the
    /// federation changed its adapter) is discarded with a warning; a damaged file is an error.
    pub fn load(&self) -> Result<ErrorFeedback, CheckpointError> {
        if !self.path.exists() {
            return Ok(ErrorFeedback::new());
        }
        let (tensors, meta) = read_tensors(&self.path)?;
        if meta.get(META_SPEC).map(String::as_str) != Some(self.spec.to_string().as_str()) {
            tracing::warn!(file = %self.path.display(), "the saved residual belongs to another pool spec; starting from zero");
            return Ok(ErrorFeedback::new());
        }
        Ok(ErrorFeedback::from_tensors(tensors))
    }

    /// Saves `residual` atomically (temp file, fsync, rename), readable by its owner only (mode
    /// `0600` on Unix): the residual is derived from the client's private data.
    pub fn save(&self, residual: &ErrorFeedback) -> Result<(), CheckpointError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CheckpointError { path: dir.to_path_buf(), problem: e.to_string() })?;
        }
        let meta = BTreeMap::from([(META_SPEC.to_string(), self.spec.to_string())]);
        write_tensors_private(&self.path, residual.tensors(), meta)
    }
}

impl ResidualStore {
    /// The daemon's residual storage for its [`Participant`](crate::participant::Participant),
    /// starting from `acknowledged` (what [`ResidualStore::load`] read): the staged residual in
    /// memory only (a crash before the ack loses it, and its values are sent again), the
    /// acknowledged one saved here before it replaces the one in memory.
    pub fn into_storage(self, acknowledged: ErrorFeedback) -> MemoryResidual {
        MemoryResidual::new(acknowledged).persisted_by(Box::new(move |r: &ErrorFeedback| self.save(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedpool_common::{HostTensor, Sha256};

    #[test]
    fn a_saved_residual_loads_back_bit_for_bit_and_another_specs_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SpecHash(Sha256::of(b"spec"));
        let store = ResidualStore::new(dir.path(), spec);
        assert!(store.load().unwrap().tensors().is_empty(), "nothing saved yet");
        let t = HostTensor::new(vec![2, 3], vec![0.5, -1.25, 3.0, 1e-7, -0.0, 42.0]).unwrap();
        // A slot row's residual and a personal tensor (FedSA-LoRA's B) alike.
        let personal = format!("{}q.lora_B.weight", crate::participant::PERSONAL_PREFIX);
        let r = ErrorFeedback::from_tensors(BTreeMap::from([("a.ssf_scale#3".to_string(), t.clone()), (personal, t)]));
        store.save(&r).unwrap();
        assert_eq!(store.load().unwrap().tensors(), r.tensors());
        let other = ResidualStore::new(dir.path(), SpecHash(Sha256::of(b"other")));
        assert!(other.load().unwrap().tensors().is_empty());
        std::fs::write(store.path(), b"garbage").unwrap();
        assert!(store.load().is_err(), "a damaged residual is an error, not silently zero");
    }

    #[cfg(unix)]
    #[test]
    fn the_saved_residual_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = ResidualStore::new(dir.path(), SpecHash(Sha256::of(b"spec")));
        let t = HostTensor::new(vec![1], vec![0.5]).unwrap();
        store.save(&ErrorFeedback::from_tensors(BTreeMap::from([("a".to_string(), t)]))).unwrap();
        let mode = std::fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the residual is derived from private data");
    }
}
