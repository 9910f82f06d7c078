//! What each virtual client must keep between its training and the end of the round, on disk.
//!
//! - **Error-feedback residuals.** A lossy upload codec leaves each client a residual (what its
//!   uploads left out), as large as the part of the pool it trained, and it must outlive the round.
//!   The files are the daemon's own ([`ResidualStore`]): a client's residual is replaced only once
//!   the engine **acknowledged** the update it belongs with, as in deployment; until then the new
//!   one waits in a pending file.
//! - **Uploads in flight.** A round's clients train at once, and their updates reach the engine
//!   later, at their simulated arrival times; meanwhile each waits as its frame body on disk and
//!   is decoded by the product's own frame decoder when it arrives.
//!
//! Held in memory, hundreds of clients' residuals and updates were most of a simulation's
//! footprint; on disk, memory holds only the client being encoded or delivered.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fedpool_client::session::residual::ResidualStore;
use fedpool_common::checkpoint::CheckpointError;
use fedpool_common::codec::ErrorFeedback;
use fedpool_common::frame;
use fedpool_common::wire::Update;
use fedpool_common::{SpecHash, TaskId};

/// The residuals and uploads in flight of a simulation's clients, in a temporary folder removed
/// when this is dropped.
#[derive(Debug)]
pub struct Spill {
    dir: tempfile::TempDir,
    spec: SpecHash,
    /// The task whose update each client's pending residual belongs with.
    pending: HashMap<usize, TaskId>,
}

impl Spill {
    /// An empty spill for pools of `spec`, in a new folder under `parent`.
    pub fn new_in(parent: &Path, spec: SpecHash) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix(".fedpool-sim-clients-").tempdir_in(parent)?;
        Ok(Self { dir, spec, pending: HashMap::new() })
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn current(&self, client: usize) -> ResidualStore {
        ResidualStore::new(&self.dir.path().join(client.to_string()), self.spec)
    }

    fn staged(&self, client: usize) -> ResidualStore {
        ResidualStore::new(&self.dir.path().join(client.to_string()).join("pending"), self.spec)
    }

    /// Client `client`'s residual as of its last acknowledged update (empty before the first).
    pub fn load(&self, client: usize) -> Result<ErrorFeedback, CheckpointError> {
        self.current(client).load()
    }

    /// Keeps `residual`, what client `client`'s update for `task` left out, until that update is
    /// acknowledged or refused. A newer staged residual replaces an older one.
    pub fn stage(&mut self, client: usize, task: TaskId, residual: &ErrorFeedback) -> Result<(), CheckpointError> {
        self.staged(client).save(residual)?;
        self.pending.insert(client, task);
        Ok(())
    }

    /// The engine acknowledged client `client`'s update for `task`: its staged residual becomes
    /// its residual. An acknowledgement of another task changes nothing.
    pub fn acknowledged(&mut self, client: usize, task: TaskId) -> Result<(), CheckpointError> {
        if self.pending.get(&client) != Some(&task) {
            return Ok(());
        }
        self.pending.remove(&client);
        let (from, to) = (self.staged(client), self.current(client));
        std::fs::rename(from.path(), to.path()).map_err(|e| CheckpointError {
            path: from.path().to_path_buf(),
            problem: format!("moving the acknowledged residual into place: {e}"),
        })
    }

    /// The engine refused client `client`'s update for `task` (`None`: whatever it sent): the
    /// staged residual is dropped and the client keeps the one it had, so the values are sent again.
    pub fn refused(&mut self, client: usize, task: Option<TaskId>) -> Result<(), CheckpointError> {
        let Some(&staged) = self.pending.get(&client) else { return Ok(()) };
        if task.is_some_and(|t| t != staged) {
            return Ok(());
        }
        self.pending.remove(&client);
        let path = self.staged(client).path().to_path_buf();
        std::fs::remove_file(&path)
            .map_err(|e| CheckpointError { path, problem: format!("dropping a refused update's residual: {e}") })
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
    use fedpool_common::{HostTensor, Sha256};
    use std::collections::BTreeMap;

    fn residual(v: f32) -> ErrorFeedback {
        let t = HostTensor::new(vec![2], vec![v, -v]).unwrap();
        ErrorFeedback::from_tensors(BTreeMap::from([("a.ssf_shift#0".to_string(), t)]))
    }

    #[test]
    fn a_residual_takes_effect_on_its_ack_only_and_a_refusal_keeps_the_old_one() {
        let parent = tempfile::tempdir().unwrap();
        let mut r = Spill::new_in(parent.path(), SpecHash(Sha256::of(b"spec"))).unwrap();
        assert!(r.load(3).unwrap().tensors().is_empty(), "no residual before the first update");

        r.stage(3, TaskId(10), &residual(1.0)).unwrap();
        assert!(r.load(3).unwrap().tensors().is_empty(), "a staged residual waits for its ack");
        r.acknowledged(3, TaskId(99)).unwrap();
        assert!(r.load(3).unwrap().tensors().is_empty(), "the ack of another task changes nothing");
        r.acknowledged(3, TaskId(10)).unwrap();
        assert_eq!(r.load(3).unwrap().tensors(), residual(1.0).tensors());
        assert!(r.load(4).unwrap().tensors().is_empty(), "clients do not share residuals");

        r.stage(3, TaskId(11), &residual(2.0)).unwrap();
        r.refused(3, Some(TaskId(12))).unwrap();
        r.acknowledged(3, TaskId(11)).unwrap();
        assert_eq!(
            r.load(3).unwrap().tensors(),
            residual(2.0).tensors(),
            "a refusal of another task is not this one's"
        );

        r.stage(3, TaskId(13), &residual(5.0)).unwrap();
        r.refused(3, None).unwrap();
        r.acknowledged(3, TaskId(13)).unwrap();
        assert_eq!(r.load(3).unwrap().tensors(), residual(2.0).tensors(), "a refused update's residual is dropped");

        let dir = r.dir().to_path_buf();
        assert!(dir.starts_with(parent.path()));
        drop(r);
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
