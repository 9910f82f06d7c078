//! A simulation spread over worker processes (`fedpool-sim worker`), on this host or many.
//!
//! The coordinator (`fedpool-sim run --workers N`) keeps what decides the rounds — the round
//! engine on the virtual clock, the network model, the reports — and [`RemoteClients`] puts the
//! clients on the workers: each worker loads the experiment's backbone once on its own device and
//! rebuilds the same population from the experiment (checked: same layout, backbone and client
//! names), holds a shard of the clients as a [`crate::clients::LocalClients`] and trains them in
//! lockstep there. Coordinator and workers talk over the project's QUIC + mutual TLS ([`link`])
//! in the project's frames ([`wire`]).
//!
//! **Same rounds.** The driver is the one-process driver; every client's update is the same bytes
//! wherever it is computed (the same participant, seed and trainer), and the driver feeds the
//! engine arrivals in work order, not in the order workers finish. So an experiment gives the
//! same `rounds.csv` (wall time aside) in one process or on any number of workers, however the
//! clients are sharded — as long as a lockstep pass holds the same clients (on a CPU one client
//! per pass, the default; `max_rows_per_pass` groups within a worker's shard).
//!
//! **Faults.** A worker whose link fails (killed, its host lost: [`link::IDLE_TIMEOUT`]) is gone:
//! its clients never answer, so the engine lists them as stragglers of the rounds that selected
//! them and commits with the quorum of the others. A worker started again under the same name
//! takes its shard back at the next request (fresh participants: residuals start at zero).

pub mod coordinator;
pub mod link;
pub mod wire;
pub mod worker;

use std::net::SocketAddr;

pub use coordinator::{CoordinatorOptions, Listening, RemoteClients, Sharding, WorkerReport};
pub use worker::{run_worker, WorkerOptions, WorkerSummary};

/// Why the distributed part of a simulation failed.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// The certificate folder could not be prepared.
    #[error("certificates: {0}")]
    Certs(#[from] fedpool_server::certs::CertError),
    /// The TLS or QUIC configuration could not be built.
    #[error("TLS: {0}")]
    Tls(#[from] fedpool_transport::tls::TlsError),
    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator could not be reached in time.
    #[error("connecting to the coordinator at {addr}: {problem}")]
    Connect {
        /// The coordinator's address.
        addr: String,
        /// The last failure.
        problem: String,
    },
    /// The QUIC connection failed.
    #[error("the link: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to the link failed.
    #[error("writing to the link: {0}")]
    Link(#[source] std::io::Error),
    /// A frame could not be read or decoded.
    #[error("a frame on the link: {0}")]
    Frame(#[from] fedpool_common::frame::FrameError),
    /// The peer broke the protocol.
    #[error("{peer}: {problem}")]
    Protocol {
        /// Who.
        peer: String,
        /// What it did.
        problem: String,
    },
    /// Fewer workers connected than the run needs.
    #[error("{connected} of {expected} workers connected within {seconds} s (listening on {listen}): start them with `fedpool-sim worker --coordinator HOST:PORT --certs DIR --name worker-K`")]
    TooFewWorkers {
        /// Connected.
        connected: usize,
        /// Needed.
        expected: usize,
        /// Waited.
        seconds: u64,
        /// Where the coordinator listens.
        listen: SocketAddr,
    },
    /// A worker built another population than the others (another experiment, model or data).
    #[error("worker {worker} loaded another population than {reference}: {what}")]
    Mismatch {
        /// The worker.
        worker: String,
        /// The worker it was compared with.
        reference: String,
        /// What differs.
        what: String,
    },
    /// A worker's request failed there (its error in words).
    #[error("worker {worker}: {message}")]
    WorkerFailed {
        /// The worker.
        worker: String,
        /// Its error.
        message: String,
    },
    /// Every worker is gone.
    #[error("every worker is gone: the run cannot go on")]
    NoWorkers,
    /// A file or folder could not be used.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The worker's own simulation step failed.
    #[error(transparent)]
    Sim(Box<crate::error::SimError>),
}

impl From<crate::error::SimError> for DistributedError {
    fn from(e: crate::error::SimError) -> Self {
        Self::Sim(Box::new(e))
    }
}
