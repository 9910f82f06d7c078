//! What each virtual client must keep between its training and the end of the round, on disk.
//!
//! - **Error-feedback residuals.** A lossy upload codec leaves each client a residual (what its
//!   uploads left out), as large as the part of the pool it trained, and it must outlive the round.
//!   [`SpilledResidual`] is each client's [`ResidualStorage`] (its `Participant` decides when a
//!   staged residual becomes the client's: on the engine's ack); the files are the daemon's own
//!   ([`ResidualStore`]), the staged one in a `pending` folder beside the acknowledged one.
//! - **Uploads in flight.** A round's clients train at once, and their updates reach the engine
//!   later, at their simulated arrival times; meanwhile each waits as its frame body on disk and
//!   is decoded by the product's own frame decoder when it arrives.
//!
//! Held in memory, hundreds of clients' residuals and updates were most of a simulation's
//! footprint; on disk, memory holds only the client being encoded or delivered.

use std::path::{Path, PathBuf};

use fedpool_client::participant::ResidualStorage;
use fedpool_client::session::residual::ResidualStore;
use fedpool_common::checkpoint::CheckpointError;
use fedpool_common::codec::ErrorFeedback;
use fedpool_common::frame;
use fedpool_common::wire::Update;
use fedpool_common::SpecHash;

/// The residuals and uploads in flight of a simulation's clients, in a temporary folder removed
/// when this is dropped.
#[derive(Debug)]
pub struct Spill {
    dir: tempfile::TempDir,
    spec: SpecHash,
}

impl Spill {
    /// An empty spill for pools of `spec`, in a new folder under `parent`.
    pub fn new_in(parent: &Path, spec: SpecHash) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix(".fedpool-sim-clients-").tempdir_in(parent)?;
        Ok(Self { dir, spec })
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Client `client`'s residual storage in this folder (valid while this spill lives).
    pub fn residuals(&self, client: usize) -> SpilledResidual {
        let dir = self.dir.path().join(client.to_string());
        SpilledResidual {
            current: ResidualStore::new(&dir, self.spec),
            staged: ResidualStore::new(&dir.join("pending"), self.spec),
        }
    }
}

/// One client's residuals as files: the acknowledged one and a staged one.
#[derive(Debug)]
pub struct SpilledResidual {
    current: ResidualStore,
    staged: ResidualStore,
}

impl ResidualStorage for SpilledResidual {
    fn acknowledged(&mut self) -> Result<ErrorFeedback, CheckpointError> {
        self.current.load()
    }

    fn stage(&mut self, residual: ErrorFeedback) -> Result<(), CheckpointError> {
        self.staged.save(&residual)
    }

    fn promote(&mut self) -> Result<(), CheckpointError> {
        let (from, to) = (self.staged.path(), self.current.path());
        if !from.exists() {
            return Ok(());
        }
        std::fs::rename(from, to).map_err(|e| CheckpointError {
            path: from.to_path_buf(),
            problem: format!("moving the acknowledged residual into place: {e}"),
        })
    }

    fn discard(&mut self) -> Result<(), CheckpointError> {
        let path = self.staged.path();
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError {
                path: path.to_path_buf(),
                problem: format!("dropping a refused update's residual: {e}"),
            }),
            _ => Ok(()),
        }
    }
}

/// An update waiting on disk for its arrival time ([`Spill::park_upload`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedUpload {
    path: PathBuf,
}

impl Spill {
    /// Writes client `client`'s `update` to disk until it arrives; a client has at most one
    /// update per task.
    pub fn park_upload(&self, client: usize, update: &Update) -> Result<ParkedUpload, CheckpointError> {
        let path = self.dir.path().join(client.to_string()).join(format!("update-{}.frame", update.task_id.0));
        let failed = |problem: String| CheckpointError { path: path.clone(), problem };
        let body = frame::to_bytes(update).map_err(|e| failed(format!("encoding the update: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
        }
        // Scratch, gone with the simulation: no need for the fsync of an atomic write.
        std::fs::write(&path, &body).map_err(|e| failed(e.to_string()))?;
        Ok(ParkedUpload { path })
    }

    /// The parked update, decoded as the server decodes a frame body; its file is removed.
    pub fn take_upload(&self, parked: &ParkedUpload) -> Result<Update, CheckpointError> {
        let failed = |problem: String| CheckpointError { path: parked.path.clone(), problem };
        let body = std::fs::read(&parked.path).map_err(|e| failed(e.to_string()))?;
        let update = frame::from_bytes(&body).map_err(|e| failed(format!("decoding the update: {e}")))?;
        std::fs::remove_file(&parked.path).map_err(|e| failed(e.to_string()))?;
        Ok(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedpool_common::{HostTensor, Sha256, TaskId};
    use std::collections::BTreeMap;

    fn residual(v: f32) -> ErrorFeedback {
        let t = HostTensor::new(vec![2], vec![v, -v]).unwrap();
        ErrorFeedback::from_tensors(BTreeMap::from([("a.ssf_shift#0".to_string(), t)]))
    }

    #[test]
    fn a_staged_residual_takes_effect_on_promotion_only_and_a_discard_keeps_the_old_one() {
        let parent = tempfile::tempdir().unwrap();
        let spill = Spill::new_in(parent.path(), SpecHash(Sha256::of(b"spec"))).unwrap();
        let mut r = spill.residuals(3);
        assert!(r.acknowledged().unwrap().tensors().is_empty(), "no residual before the first update");

        r.stage(residual(1.0)).unwrap();
        assert!(r.acknowledged().unwrap().tensors().is_empty(), "a staged residual waits for its ack");
        r.promote().unwrap();
        assert_eq!(r.acknowledged().unwrap().tensors(), residual(1.0).tensors());
        assert!(spill.residuals(4).acknowledged().unwrap().tensors().is_empty(), "clients do not share residuals");

        r.stage(residual(5.0)).unwrap();
        r.discard().unwrap();
        r.promote().unwrap();
        assert_eq!(r.acknowledged().unwrap().tensors(), residual(1.0).tensors(), "a discarded residual is gone");
        r.discard().unwrap(); // nothing staged: nothing to do

        let dir = spill.dir().to_path_buf();
        assert!(dir.starts_with(parent.path()));
        drop(spill);
        assert!(!dir.exists(), "the folder goes with the simulation");
    }

    #[test]
    fn a_parked_update_comes_back_equal_and_its_file_goes() {
        let parent = tempfile::tempdir().unwrap();
        let spill = Spill::new_in(parent.path(), SpecHash(Sha256::of(b"spec"))).unwrap();
        let mut tensors = BTreeMap::new();
        tensors.insert("a.ssf_shift#0".to_string(), HostTensor::new(vec![3], vec![0.5, -1.0, 2.0]).unwrap());
        let delta =
            fedpool_common::adapter::PoolDelta { spec_hash: SpecHash(Sha256::of(b"spec")), slots: None, tensors };
        let cfg = fedpool_common::codec::CodecConfig::default();
        let update = Update {
            round: fedpool_common::Round(2),
            task_id: TaskId(7),
            nonce: fedpool_common::Nonce([3; 16]),
            examples: 12,
            delta: fedpool_common::codec::encode(&delta, &cfg, None, 1).unwrap(),
            metrics: fedpool_common::wire::TrainMetrics { loss: 0.5, accuracy: 0.75, steps: 4, seconds: 1.5 },
            importance: Vec::new(),
        };
        let parked = spill.park_upload(5, &update).unwrap();
        assert_eq!(spill.take_upload(&parked).unwrap(), update);
        assert!(!parked.path.exists(), "a delivered update's file is removed");
        assert!(spill.take_upload(&parked).is_err(), "an update is delivered once");
    }
}
