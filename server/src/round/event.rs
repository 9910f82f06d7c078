//! What passes between the engine and its driver: client identities, the driver's [`Time`], the
//! [`Event`]s fed in and the [`Action`]s handed back (a [`Commit`] among them).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use fedpool_common::wire::{Ack, Enroll, EvalReport, EvalTask, Reject, RoundTask, Update, Welcome};
use fedpool_common::{AdapterPool, HostTensor, Round};

use super::{EngineError, EvalRecord, RoundRecord};

/// A client's identity: the subject of its certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub String);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ClientId {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for ClientId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// A point in time: the time since the driver's epoch (its start, or a simulation's zero). The
/// engine never reads a clock; it only compares the times it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub Duration);

impl Time {
    /// The driver's epoch.
    pub const ZERO: Time = Time(Duration::ZERO);

    /// `secs` seconds after the epoch.
    pub fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// `ms` milliseconds after the epoch.
    pub fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// Seconds since the epoch.
    pub fn as_secs_f64(self) -> f64 {
        self.0.as_secs_f64()
    }

    /// This time plus `d`, saturating instead of overflowing.
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d))
    }

    /// Time elapsed from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        self.plus(d)
    }
}

/// Something that happened, as the driver saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client (authenticated as `client`) asks to join.
    Enroll {
        /// Who.
        client: ClientId,
        /// What it said.
        enroll: Enroll,
    },
    /// A client's connection closed or failed. Its task stays open until the deadline.
    Lost {
        /// Who.
        client: ClientId,
    },
    /// A client sent an update.
    Update {
        /// Who.
        client: ClientId,
        /// The update (decoded from its frame, not yet believed).
        update: Update,
        /// Bytes the update took on the wire (frame header + body).
        wire_bytes: u64,
    },
    /// A client sent a heartbeat.
    Heartbeat {
        /// Who.
        client: ClientId,
    },
    /// A client reported how a global pool did on its held-out data.
    EvalReport {
        /// Who.
        client: ClientId,
        /// The report (not yet believed).
        report: EvalReport,
        /// Bytes the report took on the wire.
        wire_bytes: u64,
    },
    /// An upload from a client took this long, as the driver measured it (rank budgets estimate
    /// bandwidth from these).
    Throughput {
        /// Who.
        client: ClientId,
        /// Bytes received.
        bytes: u64,
        /// Seconds the transfer took.
        seconds: f64,
    },
    /// Time passed (send one no later than [`Engine::next_wakeup`](super::Engine::next_wakeup)).
    Tick,
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Tell a client its enrollment was accepted.
    Welcome {
        /// To whom.
        client: ClientId,
        /// The message.
        welcome: Welcome,
    },
    /// Send a client a round task.
    SendTask {
        /// To whom.
        client: ClientId,
        /// The task, with the encoded global pool.
        task: Box<RoundTask>,
    },
    /// Tell a client its update was accepted.
    Ack {
        /// To whom.
        client: ClientId,
        /// The message.
        ack: Ack,
    },
    /// Tell a client its enrollment or update was refused.
    Reject {
        /// To whom.
        client: ClientId,
        /// The message.
        reject: Reject,
    },
    /// Close a client's connection (after sending whatever came before).
    Drop {
        /// Whom.
        client: ClientId,
        /// Why, for the log.
        reason: String,
    },
    /// Ask a client to evaluate a committed global pool.
    SendEval {
        /// To whom.
        client: ClientId,
        /// The task, with the encoded global pool.
        task: Box<EvalTask>,
    },
    /// The federated evaluation of a committed round is complete: add it to that round's line of
    /// the round log.
    RecordEval {
        /// The evaluated round.
        round: Round,
        /// The example-weighted metrics.
        eval: EvalRecord,
    },
    /// A round is complete: persist it (`store::Store::commit`) before carrying out the actions
    /// after it, which may already send the next round's tasks.
    Commit(Box<Commit>),
    /// The last round is committed; the driver may shut down.
    Finished,
    /// The engine cannot go on (the merge refused to start a round); the driver should stop and
    /// report the error. Nothing a client sends leads here.
    Fatal(EngineError),
}

/// A committed round: the new global pool and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// The round committed.
    pub round: Round,
    /// The global pool after the round.
    pub pool: AdapterPool,
    /// The round's record for the log.
    pub record: RoundRecord,
    /// The server optimiser's state after the round (FedAdam's moments; empty for a plain
    /// average): persisted with the checkpoint, so a restart continues the same optimisation.
    pub server_state: BTreeMap<String, HostTensor>,
}
