//! The round log's records: a [`RoundRecord`] per committed round (one JSON line of
//! `rounds.jsonl`), with the [`EvalRecord`] of its federated evaluation once the clients reported.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One committed round, as logged: one JSON line of `rounds.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round.
    pub round: u64,
    /// The attempt that committed (1 = the first).
    pub attempt: u32,
    /// Clients whose updates were accepted, sorted.
    pub clients: Vec<String>,
    /// Examples behind the accepted updates.
    pub examples: u64,
    /// Wire bytes of every update received while the round was open.
    pub bytes_up: u64,
    /// Bytes of every task frame sent for the round (all attempts).
    pub bytes_down: u64,
    /// Refusals while the round was open, by reason (`RejectReason`'s name).
    pub rejected: BTreeMap<String, u64>,
    /// Selected clients of the committing attempt that sent nothing, sorted.
    pub stragglers: Vec<String>,
    /// Example-weighted mean of the reported training losses.
    pub train_loss: Option<f64>,
    /// Example-weighted mean of the reported training accuracies.
    pub train_accuracy: Option<f64>,
    /// When the round's first attempt started, seconds since the driver's epoch.
    pub started_at_secs: f64,
    /// When the round committed, seconds since the driver's epoch.
    pub committed_at_secs: f64,
    /// True for a line written at start-up for a checkpoint whose line was lost in a crash (the
    /// other fields are then unknown and zero).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
    /// The median L2 norm of the accepted updates (before any scaling): the next round's norm
    /// bound is a multiple of it, and a restart reads it back from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub median_update_norm: Option<f64>,
    /// The federated evaluation of the round's global pool (added once the clients reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalRecord>,
}

/// The federated evaluation of one global pool: every reporting client's held-out metrics,
/// weighted by its held-out examples. The accuracy of a round is this one (the global model's),
/// not the clients' training accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Example-weighted mean accuracy (None: no client reported).
    pub accuracy: Option<f64>,
    /// Example-weighted mean of the clients' macro-F1.
    pub macro_f1: Option<f64>,
    /// Example-weighted mean loss.
    pub loss: Option<f64>,
    /// Held-out examples behind the numbers.
    pub examples: u64,
    /// Clients that reported, sorted.
    pub clients: Vec<String>,
    /// Clients asked that did not report in time, sorted.
    pub missing: Vec<String>,
    /// Bytes of the evaluation task frames sent (the global pool, once per client).
    pub bytes_down: u64,
    /// Bytes of the reports received.
    pub bytes_up: u64,
    /// Seconds from the tasks to the last report (or the deadline).
    pub seconds: f64,
}
