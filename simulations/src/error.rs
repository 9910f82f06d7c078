//! Why a simulation stopped: [`SimError`], one type for the driver, the centralised reference and
//! the device check, each variant keeping its source error's type.

use fedpool_client::device::DeviceError;
use fedpool_client::participant::ParticipantError;
use fedpool_client::spec::UnknownAdapter;
use fedpool_client::train::TrainError;
use fedpool_common::adapter::PoolError;
use fedpool_common::checkpoint::CheckpointError;
use fedpool_common::codec::CodecError;
use fedpool_common::frame::FrameError;
use fedpool_server::aggregate::AggregateError;
use fedpool_server::budget::BudgetError;
use fedpool_server::config::ConfigError;
use fedpool_server::round::EngineError;

use crate::distributed::DistributedError;
use crate::experiment::ExperimentError;
use crate::network::NetworkError;
use crate::population::PopulationError;
use crate::tenancy::TenancyError;

/// Why a simulation stopped.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// `[adapter] kind` names no adapter.
    #[error("adapter.kind: {0}")]
    Adapter(#[from] UnknownAdapter),
    /// `[aggregate]` is unusable.
    #[error("[aggregate]: {0}")]
    Aggregate(#[from] ConfigError),
    /// The merge `[aggregate]` and `[budget]` ask for cannot be built for the spec.
    #[error("the merge: {0}")]
    Merge(#[from] AggregateError),
    /// `[budget]` is unusable.
    #[error("[budget]: {0}")]
    Budget(#[from] BudgetError),
    /// A codec table (`upload_codec`, `download_codec`) is unusable.
    #[error("[{table}]: {source}")]
    Codec {
        /// The table.
        table: &'static str,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// `[network]` is unusable (boxed: the largest error here).
    #[error(transparent)]
    Network(Box<NetworkError>),
    /// The device cannot be used.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// The starting global pool could not be made.
    #[error("the initial global pool: {0}")]
    Pool(#[from] PoolError),
    /// The round engine refused its configuration or stopped with an error.
    #[error("round engine: {0}")]
    Engine(#[from] EngineError),
    /// A client's training or evaluation failed.
    #[error("training: {0}")]
    Train(#[from] TrainError),
    /// Lockstep training failed.
    #[error("lockstep training: {0}")]
    Tenancy(#[from] TenancyError),
    /// A client's protocol step failed (decoding a global pool, encoding its update).
    #[error(transparent)]
    Participant(#[from] ParticipantError),
    /// A message could not be framed (its size on the wire).
    #[error("framing a message: {0}")]
    Frame(#[from] FrameError),
    /// The temporary folder for the clients' state could not be made.
    #[error("a temporary folder for the clients' residuals: {0}")]
    Scratch(#[source] std::io::Error),
    /// A client's error-feedback residual or update in flight could not be written or read back.
    #[error("a client's state on disk: {0}")]
    Spill(#[from] CheckpointError),
    /// The engine named a client the population does not have (a bug).
    #[error("the engine named an unknown client {0}")]
    UnknownClient(String),
    /// The experiment is unusable.
    #[error(transparent)]
    Experiment(Box<ExperimentError>),
    /// The backbone or the data could not be loaded.
    #[error(transparent)]
    Population(Box<PopulationError>),
    /// The link to a worker or the coordinator failed, or a worker did.
    #[error(transparent)]
    Distributed(Box<DistributedError>),
    /// A client index outside the population (a bug, or a worker given a bad shard).
    #[error("client index {0} is not in the population")]
    UnknownClientIndex(usize),
    /// The engine recorded an evaluation of a round it never committed (a bug).
    #[error("an evaluation of round {0} that was never committed")]
    UncommittedEval(u64),
    /// Nothing left to happen but the engine has not finished (a bug, or a population that can
    /// never reach the quorum).
    #[error("the simulation stalled at {seconds:.1} simulated seconds in round {round}: no event is pending and the engine waits")]
    Stalled {
        /// Simulated time.
        seconds: f64,
        /// The newest committed round.
        round: u64,
    },
}

impl From<NetworkError> for SimError {
    fn from(e: NetworkError) -> Self {
        Self::Network(Box::new(e))
    }
}

impl From<ExperimentError> for SimError {
    fn from(e: ExperimentError) -> Self {
        Self::Experiment(Box::new(e))
    }
}

impl From<PopulationError> for SimError {
    fn from(e: PopulationError) -> Self {
        Self::Population(Box::new(e))
    }
}

impl From<DistributedError> for SimError {
    fn from(e: DistributedError) -> Self {
        match e {
            // A worker's own step failed: say what failed, not how it travelled.
            DistributedError::Sim(e) => *e,
            e => Self::Distributed(Box::new(e)),
        }
    }
}
