//! Versioned protocol messages between the client daemon and the server, and the checks an
//! update must pass before the server believes it (docs/design.md, principle 5: nothing trusted from the
//! wire).
//!
//! Each message travels in one frame (`frame`): its kind in the header, its body bincode-encoded.
//! Decoding checks the kind is valid for the direction, the size cap before reading, and decodes
//! with an allocation limit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::adapter::{PoolDelta, PoolError, PoolSpec};
use crate::codec::{self, CodecError, DecodeLimits, EncodedDelta};
use crate::frame::{self, FrameError, MessageKind};
use crate::ids::{BackboneFingerprint, Nonce, Round, SpecHash, TaskId};

/// The protocol version this build speaks; enrollment refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;

/// Client → server: join the federation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enroll {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The client's frozen backbone; must equal the server's.
    pub backbone: BackboneFingerprint,
    /// The pool layout the client trains; must equal the server's.
    pub spec_hash: SpecHash,
    /// Upload bandwidth the client's operator declared, bytes per second (the prior for budgets).
    pub declared_upload_bps: Option<u64>,
    /// Download bandwidth declared, bytes per second.
    pub declared_download_bps: Option<u64>,
    /// Training examples the client holds: a claim, which the coordinator caps (its roster or
    /// `max_examples_per_update`) and freezes for the client's life before it weighs anything.
    pub examples: u64,
    /// Software name and version, for the server's log.
    pub software: String,
}

/// Server → client: enrollment accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The identity the server gave the client (its certificate subject).
    pub client_name: String,
    /// The newest committed round.
    pub round: Round,
    /// Seconds between heartbeats the server expects.
    pub heartbeat_secs: u32,
}

/// The rank a client may train and upload on one LoRA target this round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetBudget {
    /// The target's name.
    pub target: String,
    /// Triplets (rank) granted.
    pub rank: u32,
}

/// Server → client: train on the global pool and send an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTask {
    /// The round this task belongs to.
    pub round: Round,
    /// This task's id.
    pub task_id: TaskId,
    /// Must be echoed in the update.
    pub nonce: Nonce,
    /// The global pool, encoded (as a delta from zero) with the download codec.
    pub global: EncodedDelta,
    /// Per-target LoRA ranks granted (empty for SSF pools: train everything).
    pub rank_budget: Vec<TargetBudget>,
    /// Local optimisation steps to run.
    pub local_steps: u32,
    /// Milliseconds from receipt until the server stops waiting for this update.
    pub deadline_ms: u64,
}

impl RoundTask {
    /// The granted LoRA rank per target (empty: no budget, train and send every triplet).
    pub fn granted_ranks(&self) -> std::collections::BTreeMap<String, usize> {
        self.rank_budget.iter().map(|b| (b.target.clone(), b.rank as usize)).collect()
    }
}

/// Training metrics a client reports with its update.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Mean training loss over the local steps.
    pub loss: f32,
    /// Training accuracy over the local steps.
    pub accuracy: f32,
    /// Local steps run.
    pub steps: u32,
    /// Seconds spent training.
    pub seconds: f32,
}

/// AdaLoRA triplet importance scores for one LoRA target (one score per rank index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TripletImportance {
    /// The target's name.
    pub target: String,
    /// Score per triplet, by rank index.
    pub scores: Vec<f32>,
}

/// Client → server: the result of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The task's round.
    pub round: Round,
    /// The task's id.
    pub task_id: TaskId,
    /// The task's nonce, echoed.
    pub nonce: Nonce,
    /// Examples trained on (the aggregation weight).
    pub examples: u64,
    /// The delta, encoded with the upload codec.
    pub delta: EncodedDelta,
    /// How training went.
    pub metrics: TrainMetrics,
    /// LoRA triplet importance (empty for SSF pools).
    pub importance: Vec<TripletImportance>,
}

/// Server → client: an update is part of a committed round that is on the server's disk (sent
/// only after the commit, never when the update is merely folded), so the client may now make its
/// error-feedback residual its own. An update folded into an attempt that ends without a commit
/// is answered with [`RejectReason::NotCommitted`] instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The update's round.
    pub round: Round,
    /// The update's task.
    pub task_id: TaskId,
}

/// Why a request or update was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// The peer speaks another protocol version.
    ProtocolVersion,
    /// The client runs another backbone.
    BackboneMismatch,
    /// The client trains another pool layout.
    SpecMismatch,
    /// An update for a task the server does not know (or gave another client).
    UnknownTask,
    /// An update for another round.
    WrongRound,
    /// The nonce does not match the task's (a replay).
    WrongNonce,
    /// The task already has an update.
    Duplicate,
    /// The update came after the deadline.
    Late,
    /// The delta does not fit the spec (names, shapes, slots).
    InvalidDelta,
    /// The delta holds NaN or infinite values, or bad metrics.
    NonFinite,
    /// The delta's digest or encoding is broken.
    Corrupt,
    /// A message of the wrong kind, too large, or malformed.
    Protocol,
    /// The update was accepted but its round attempt ended without a commit (below quorum, or the
    /// merge could not finish): it is in no committed round, so the client keeps its residual.
    NotCommitted,
    /// The client was refused too often and is quarantined for the rest of the run.
    Quarantined,
}

/// A refusal, with the reason in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The round the refused message concerned, if any.
    pub round: Option<Round>,
    /// The task the refused message concerned, if any.
    pub task_id: Option<TaskId>,
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// What was wrong, for a person.
    pub detail: String,
}

/// Server → client: evaluate a committed global pool on the client's held-out data (federated
/// evaluation: the server has no data, so every connected client measures the new global model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalTask {
    /// The committed round whose global pool this is.
    pub round: Round,
    /// This evaluation task's id (echoed in the report).
    pub task_id: TaskId,
    /// The global pool, encoded as in [`RoundTask::global`].
    pub global: EncodedDelta,
    /// Milliseconds from receipt until the server stops waiting for the report.
    pub deadline_ms: u64,
}

/// Held-out metrics of one client for one global pool.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Fraction of held-out examples predicted correctly, in [0, 1].
    pub accuracy: f32,
    /// Macro-averaged F1 over the classes present, in [0, 1].
    pub macro_f1: f32,
    /// Mean cross-entropy.
    pub loss: f32,
    /// Held-out examples evaluated (the weight of these metrics).
    pub examples: u64,
}

impl EvalMetrics {
    /// Checks the numbers are possible: accuracy and F1 in [0, 1], a finite non-negative loss, at
    /// least one example.
    pub fn validate(&self) -> Result<(), Invalid> {
        let unit = |v: f32| v.is_finite() && (0.0..=1.0).contains(&v);
        if !(unit(self.accuracy) && unit(self.macro_f1)) {
            return Err(Invalid::new(
                RejectReason::NonFinite,
                format!("accuracy {} and macro-F1 {} must be in [0, 1]", self.accuracy, self.macro_f1),
            ));
        }
        if !(self.loss.is_finite() && self.loss >= 0.0) {
            return Err(Invalid::new(RejectReason::NonFinite, format!("loss {} must be finite and ≥ 0", self.loss)));
        }
        if self.examples == 0 {
            return Err(Invalid::new(RejectReason::Protocol, "an evaluation of 0 examples"));
        }
        Ok(())
    }
}

/// Client → server: the result of an [`EvalTask`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The evaluated round.
    pub round: Round,
    /// The evaluation task's id.
    pub task_id: TaskId,
    /// What the client measured.
    pub metrics: EvalMetrics,
}

/// Liveness, either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increases by one per heartbeat sent on a connection.
    pub seq: u64,
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Join.
    Enroll(Enroll),
    /// A trained update.
    Update(Update),
    /// Liveness.
    Heartbeat(Heartbeat),
    /// Metrics of a global pool on held-out data.
    EvalReport(EvalReport),
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// Enrollment accepted.
    Welcome(Welcome),
    /// A round task.
    Task(Box<RoundTask>),
    /// Update accepted.
    Ack(Ack),
    /// Something refused.
    Reject(Reject),
    /// Liveness.
    Heartbeat(Heartbeat),
    /// Evaluate a committed global pool.
    EvalTask(Box<EvalTask>),
}

impl ClientMessage {
    /// The message as one frame (header + body).
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        match self {
            ClientMessage::Enroll(m) => frame::frame(MessageKind::Enroll, &frame::to_bytes(m)?),
            ClientMessage::Update(m) => frame::frame(MessageKind::Update, &frame::to_bytes(m)?),
            ClientMessage::Heartbeat(m) => frame::frame(MessageKind::Heartbeat, &frame::to_bytes(m)?),
            ClientMessage::EvalReport(m) => frame::frame(MessageKind::EvalReport, &frame::to_bytes(m)?),
        }
    }

    /// Decodes a frame body of `kind` (its header already checked by `FrameHeader::parse`).
    pub fn decode(kind: MessageKind, body: &[u8]) -> Result<Self, FrameError> {
        Ok(match kind {
            MessageKind::Enroll => ClientMessage::Enroll(frame::from_bytes(body)?),
            MessageKind::Update => ClientMessage::Update(frame::from_bytes(body)?),
            MessageKind::Heartbeat => ClientMessage::Heartbeat(frame::from_bytes(body)?),
            MessageKind::EvalReport => ClientMessage::EvalReport(frame::from_bytes(body)?),
            other => return Err(FrameError::UnexpectedKind(other)),
        })
    }
}

impl ServerMessage {
    /// The message as one frame (header + body).
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        match self {
            ServerMessage::Welcome(m) => frame::frame(MessageKind::Welcome, &frame::to_bytes(m)?),
            ServerMessage::Task(m) => frame::frame(MessageKind::Task, &frame::to_bytes(m)?),
            ServerMessage::Ack(m) => frame::frame(MessageKind::Ack, &frame::to_bytes(m)?),
            ServerMessage::Reject(m) => frame::frame(MessageKind::Reject, &frame::to_bytes(m)?),
            ServerMessage::Heartbeat(m) => frame::frame(MessageKind::Heartbeat, &frame::to_bytes(m)?),
            ServerMessage::EvalTask(m) => frame::frame(MessageKind::EvalTask, &frame::to_bytes(m)?),
        }
    }

    /// Decodes a frame body of `kind` (its header already checked by `FrameHeader::parse`).
    pub fn decode(kind: MessageKind, body: &[u8]) -> Result<Self, FrameError> {
        Ok(match kind {
            MessageKind::Welcome => ServerMessage::Welcome(frame::from_bytes(body)?),
            MessageKind::Task => ServerMessage::Task(Box::new(frame::from_bytes(body)?)),
            MessageKind::Ack => ServerMessage::Ack(frame::from_bytes(body)?),
            MessageKind::Reject => ServerMessage::Reject(frame::from_bytes(body)?),
            MessageKind::Heartbeat => ServerMessage::Heartbeat(frame::from_bytes(body)?),
            MessageKind::EvalTask => ServerMessage::EvalTask(Box::new(frame::from_bytes(body)?)),
            other => return Err(FrameError::UnexpectedKind(other)),
        })
    }
}

/// What the server expects of an update for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedTask {
    /// The task's round.
    pub round: Round,
    /// The task's id.
    pub task_id: TaskId,
    /// The task's nonce.
    pub nonce: Nonce,
}

/// An update refused by [`Update::validate`]: the reason and the words for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason:?}: {detail}")]
pub struct Invalid {
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// What was wrong.
    pub detail: String,
}

impl Invalid {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }

    /// The refusal as a message to send back.
    pub fn to_reject(&self, round: Option<Round>, task_id: Option<TaskId>) -> Reject {
        Reject { round, task_id, reason: self.reason, detail: self.detail.clone() }
    }
}

impl Update {
    /// Checks an update against its task and the pool spec, and decodes its delta: round, task
    /// and nonce; a positive example count; finite metrics and importance scores; the payload's
    /// digest and limits; and the decoded delta's names, shapes, slots and finite values.
    pub fn validate(
        &self,
        expected: &ExpectedTask,
        spec: &PoolSpec,
        limits: &DecodeLimits,
    ) -> Result<PoolDelta, Invalid> {
        use RejectReason::*;
        if self.task_id != expected.task_id {
            return Err(Invalid::new(
                UnknownTask,
                format!("task {} is not the expected task {}", self.task_id, expected.task_id),
            ));
        }
        if self.round != expected.round {
            return Err(Invalid::new(
                WrongRound,
                format!("update for round {}, task is for round {}", self.round, expected.round),
            ));
        }
        if self.nonce != expected.nonce {
            return Err(Invalid::new(WrongNonce, "nonce does not match the task's (replayed update?)"));
        }
        if self.examples == 0 {
            return Err(Invalid::new(InvalidDelta, "example count is 0"));
        }
        let m = &self.metrics;
        if !(m.loss.is_finite() && m.accuracy.is_finite() && m.seconds.is_finite()) {
            return Err(Invalid::new(NonFinite, "training metrics hold NaN or infinity"));
        }
        let mut seen = BTreeMap::new();
        for imp in &self.importance {
            if !spec.targets.iter().any(|t| t.name == imp.target) || seen.insert(imp.target.as_str(), ()).is_some() {
                return Err(Invalid::new(
                    InvalidDelta,
                    format!("importance for unknown or repeated target {:?}", imp.target),
                ));
            }
            if imp.scores.len() > spec.max_rank {
                return Err(Invalid::new(
                    InvalidDelta,
                    format!("{} importance scores for {:?}, max rank {}", imp.scores.len(), imp.target, spec.max_rank),
                ));
            }
            if !imp.scores.iter().all(|s| s.is_finite()) {
                return Err(Invalid::new(NonFinite, format!("importance for {:?} holds NaN or infinity", imp.target)));
            }
        }
        let delta = codec::decode(&self.delta, limits).map_err(|e| match e {
            CodecError::DigestMismatch | CodecError::Malformed(_) | CodecError::Frame(_) => {
                Invalid::new(Corrupt, e.to_string())
            }
            CodecError::TooLarge(_) | CodecError::Config(_) => Invalid::new(InvalidDelta, e.to_string()),
        })?;
        delta.validate(spec).map_err(|e| match e {
            PoolError::NonFinite(_) => Invalid::new(NonFinite, e.to_string()),
            other => Invalid::new(InvalidDelta, other.to_string()),
        })?;
        Ok(delta)
    }
}
