//! The round engine: a sans-IO state machine (DESIGN.md principle 1, in the manner of
//! quinn-proto). It is fed [`Event`]s — a client enrolled, was lost, sent an update or a
//! heartbeat, or time passed — each stamped with the driver's clock, and it returns the
//! [`Action`]s the driver must carry out, in order: welcome or refuse a client, send a task, ack or
//! reject an update, drop a client, commit a round, finish.
//!
//! It owns no socket, no task and no clock: [`Time`] is whatever the driver says it is (the QUIC
//! server's monotonic clock, the simulator's virtual one, a test's constants). The driver calls
//! [`Engine::handle`] for every event and sends [`Event::Tick`] no later than
//! [`Engine::next_wakeup`]; every call first runs the timers that are due (idle clients, the round
//! deadline), so an event that arrives late is judged as if the tick had come first.
//!
//! A round (DESIGN.md, "rounds that finish despite stragglers and crashes"):
//! 1. once `min_clients_to_start` enrolled clients are connected, round *last + 1* starts:
//!    ⌈`clients_per_round` × `over_selection`⌉ connected clients are sampled (deterministically from
//!    the seed, the round and the attempt) and each gets a [`RoundTask`] with its own id and a fresh
//!    random nonce, carrying the global pool encoded with the download codec;
//! 2. each update is checked (its sender, round, nonce, deadline, then [`Update::validate`]
//!    against the spec and the decode limits) and folded into the [`Merge`], or refused with a
//!    [`RejectReason`] — the round goes on;
//! 3. the round commits once `quorum` updates are in and either every selected client answered,
//!    `clients_per_round` updates are in (over-selection: the extra ones are not waited for), or
//!    the deadline passed; clients that did not answer are listed as stragglers;
//! 4. a deadline that passes with fewer than `quorum` updates (or every selected client answered
//!    and too few updates were good) starts the round again: attempt + 1, new tasks and nonces,
//!    `merge.begin` again. A round never hangs.
//!
//! 5. with `eval_deadline` set (federated evaluation, the default of `server.toml`), each commit
//!    is followed by an evaluation: every connected client gets an [`EvalTask`] with the new global
//!    pool, evaluates it on its own held-out split and answers with an [`EvalReport`] (accuracy,
//!    macro-F1, loss, examples; checked for range). Once every asked client reported or the
//!    evaluation deadline passed, [`Action::RecordEval`] carries the example-weighted means (an
//!    [`EvalRecord`]) to that round's line of the log, and only then does the next round start
//!    (its tasks reuse the evaluation's encoding of the pool). The last round finishes after its
//!    evaluation. A restart that lost an evaluation runs it first ([`Engine::resume_evaluation`]).
//!
//! Sampling is deterministic (ChaCha8 seeded from `seed`, the round and the attempt, over the
//! connected clients in identity order). Nonces are not: they come from the operating system's
//! secure random source (`Nonce::random`), since a predictable nonce would allow forged replays;
//! they change no result, so simulations stay reproducible.
//!
//! **The global pool in a task** travels in its transfer form, `AdapterPool::to_transfer` (a
//! delta from zero; for an SSF pool every slot listed with a usage count of 1, so that it passes
//! the same `PoolDelta::validate(spec)` as any other delta). A client rebuilds the pool with
//! `codec::decode` then `AdapterPool::from_transfer(delta, spec)`.
//! With a lossy download codec the client starts from an approximation of the global pool; its
//! delta is relative to what it decoded and is added to the server's exact pool.
//!
//! **Accounting** (the [`RoundRecord`] of a commit): `bytes_down` counts every task frame sent for
//! the round (all attempts, re-sends included; header + body); `bytes_up` counts the wire bytes of
//! every update received while the round was open, accepted or not; `rejected` counts the
//! refusals made while the round was open (a straggler's late update for the previous round is
//! counted in the round it arrived in). `clients`, `examples` and the metrics are those of the
//! committing attempt's accepted updates.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use fedpool_common::adapter::PoolSpec;
use fedpool_common::codec::{self, CodecConfig, DecodeLimits, EncodedDelta};
use fedpool_common::frame::{self, HEADER_LEN};
use fedpool_common::wire::{
    Ack, Enroll, EvalReport, EvalTask, ExpectedTask, Reject, RejectReason, RoundTask, TargetBudget, Update, Welcome,
    PROTOCOL_VERSION,
};
use fedpool_common::{AdapterPool, BackboneFingerprint, HostTensor, Nonce, Round, TaskId};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::aggregate::{truncate_lora, AggregateError, Merge};
use crate::ranks::{Plan, RankPlanner};

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

/// How the engine runs rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Rounds to train in all; after the commit of this round the engine finishes.
    pub total_rounds: u64,
    /// Updates a round wants; with over-selection the round commits once this many are in.
    pub clients_per_round: usize,
    /// Fewest accepted updates a round may commit with (1 ≤ quorum ≤ `clients_per_round`).
    pub quorum: usize,
    /// Factor ≥ 1 of extra clients sampled against stragglers: ⌈`clients_per_round` × this⌉ get a
    /// task (Bonawitz et al. 2019, "Towards federated learning at scale", use 1.3).
    pub over_selection: f64,
    /// Connected clients needed before a round starts (≥ `quorum`).
    pub min_clients_to_start: usize,
    /// How long a round attempt waits for updates, from the moment its tasks are sent.
    pub deadline: Duration,
    /// Local optimisation steps each task asks for.
    pub local_steps: u32,
    /// Seed of the client sampling (with the round and attempt numbers).
    pub seed: u64,
    /// How the global pool is encoded in tasks.
    pub download_codec: CodecConfig,
    /// Limits applied when decoding updates.
    pub decode_limits: DecodeLimits,
    /// The frozen backbone every client must run.
    pub backbone: BackboneFingerprint,
    /// How often clients are asked to send a heartbeat (told to them in the welcome).
    pub heartbeat: Duration,
    /// A connected client not heard from for this long is dropped (> `heartbeat`).
    pub idle_timeout: Duration,
    /// Federated evaluation: after each commit every connected client evaluates the new global
    /// pool on its held-out data and has this long to report (`None`: no evaluation).
    pub eval_deadline: Option<Duration>,
}

impl EngineConfig {
    /// Checks the settings can run rounds that finish.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.total_rounds == 0 {
            return bad("total_rounds must be at least 1".into());
        }
        if self.clients_per_round == 0 {
            return bad("clients_per_round must be at least 1".into());
        }
        if self.quorum == 0 || self.quorum > self.clients_per_round {
            return bad(format!(
                "quorum {} must be in 1..={} (clients_per_round)",
                self.quorum, self.clients_per_round
            ));
        }
        if !(self.over_selection.is_finite() && self.over_selection >= 1.0) {
            return bad(format!("over_selection {} must be a finite number ≥ 1", self.over_selection));
        }
        if self.min_clients_to_start < self.quorum {
            return bad(format!(
                "min_clients_to_start {} is below the quorum {}: such a round could never commit",
                self.min_clients_to_start, self.quorum
            ));
        }
        if self.deadline.is_zero() || self.deadline.as_millis() > u128::from(u64::MAX) {
            return bad(format!("deadline {:?} must be positive", self.deadline));
        }
        if self.local_steps == 0 {
            return bad("local_steps must be at least 1".into());
        }
        if self.heartbeat.is_zero() || self.heartbeat.as_secs() > u64::from(u32::MAX) {
            return bad(format!("heartbeat {:?} must be positive and fit in u32 seconds", self.heartbeat));
        }
        if self.idle_timeout <= self.heartbeat {
            return bad(format!(
                "idle_timeout {:?} must be longer than the heartbeat {:?}",
                self.idle_timeout, self.heartbeat
            ));
        }
        if self.eval_deadline.is_some_and(|d| d.is_zero()) {
            return bad("eval_deadline must be positive".into());
        }
        self.download_codec.validate().map_err(|e| EngineError::Config(format!("download codec: {e}")))?;
        Ok(())
    }

    /// Clients sampled per round attempt: ⌈`clients_per_round` × `over_selection`⌉.
    pub fn selected_per_round(&self) -> usize {
        let n = (self.clients_per_round as f64 * self.over_selection).ceil();
        if n >= usize::MAX as f64 {
            usize::MAX
        } else {
            (n as usize).max(self.clients_per_round)
        }
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
    /// Time passed (send one no later than [`Engine::next_wakeup`]).
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
    /// The federated evaluation of the round's global pool (added once the clients reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalRecord>,
}

/// The round log as a fixed-width table: round, the global model's accuracy and macro-F1
/// (federated evaluation; `-` where none), clients, bytes up and down (training and evaluation),
/// seconds of the round.
pub fn round_table(records: &[RoundRecord]) -> String {
    let mut s = format!(
        "{:>5} {:>9} {:>9} {:>8} {:>7} {:>12} {:>12} {:>8}\n",
        "round", "accuracy", "macro-F1", "eval n", "clients", "bytes up", "bytes down", "seconds"
    );
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
    for r in records {
        let e = r.eval.as_ref();
        let up = r.bytes_up + e.map_or(0, |e| e.bytes_up);
        let down = r.bytes_down + e.map_or(0, |e| e.bytes_down);
        s.push_str(&format!(
            "{:>5} {:>9} {:>9} {:>8} {:>7} {:>12} {:>12} {:>8.1}\n",
            r.round,
            pct(e.and_then(|e| e.accuracy)),
            pct(e.and_then(|e| e.macro_f1)),
            e.map_or(0, |e| e.examples),
            r.clients.len(),
            up,
            down,
            (r.committed_at_secs - r.started_at_secs).max(0.0) + e.map_or(0.0, |e| e.seconds),
        ));
    }
    s
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

/// Why an engine could not be built or run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The configuration cannot run rounds.
    #[error("engine config: {0}")]
    Config(String),
    /// The pool spec or the starting global pool is unusable.
    #[error("pool: {0}")]
    Pool(String),
    /// The global pool could not be encoded for a task.
    #[error("encoding the global pool of round {round}: {problem}")]
    Encode {
        /// The round.
        round: Round,
        /// What failed.
        problem: String,
    },
    /// The merge failed.
    #[error("round {round}: {source}")]
    Merge {
        /// The round.
        round: Round,
        /// The merge's error.
        source: AggregateError,
    },
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    Open,
    Accepted,
    Rejected,
}

/// A task handed out.
#[derive(Debug, Clone)]
struct TaskInfo {
    round: Round,
    client: ClientId,
    nonce: Nonce,
    state: TaskState,
    /// The LoRA ranks granted (rank budgets), if any.
    ranks: Option<BTreeMap<String, usize>>,
}

/// What the engine knows of an enrolled client.
#[derive(Debug, Clone)]
struct ClientState {
    connected: bool,
    last_heard: Time,
    /// The training examples it declared at enrollment: an update may not claim more.
    examples: u64,
}

/// The running totals of one round, kept across its attempts.
#[derive(Debug, Clone)]
struct RoundAccount {
    round: Round,
    started_at: Time,
    bytes_up: u64,
    bytes_down: u64,
    rejected: BTreeMap<String, u64>,
}

/// A running federated evaluation of a committed round.
#[derive(Debug)]
struct Evaluation {
    round: Round,
    started_at: Time,
    deadline_at: Time,
    tasks: BTreeMap<ClientId, TaskId>,
    pending: BTreeSet<ClientId>,
    reported: Vec<String>,
    examples: u64,
    accuracy_sum: f64,
    f1_sum: f64,
    loss_sum: f64,
    bytes_down: u64,
    bytes_up: u64,
}

/// The running attempt of a round.
#[derive(Debug)]
struct Attempt {
    number: u32,
    deadline_at: Time,
    /// The attempt's tasks by client (each selected client has one).
    by_client: BTreeMap<ClientId, TaskId>,
    accepted: Vec<String>,
    answered: usize,
    examples: u64,
    loss_sum: f64,
    accuracy_sum: f64,
}

/// The round engine. See the module documentation.
pub struct Engine {
    config: EngineConfig,
    spec: PoolSpec,
    spec_hash: fedpool_common::SpecHash,
    merge: Box<dyn Merge>,
    global: AdapterPool,
    /// The newest committed round.
    committed: Round,
    clients: BTreeMap<ClientId, ClientState>,
    /// Tasks of the running round and of the round before (to tell late from unknown).
    tasks: HashMap<TaskId, TaskInfo>,
    next_task: u64,
    /// The current round's totals (present from its first attempt until its commit).
    account: Option<RoundAccount>,
    attempt: Option<Attempt>,
    /// Attempts started for the current round so far.
    attempts_started: u32,
    /// The global pool encoded for the current round's tasks, and the task frame size.
    encoded: Option<(Round, EncodedDelta)>,
    /// Per-client LoRA rank budgets, when a policy is set ([`Engine::with_ranks`]).
    ranks: Option<RankPlanner>,
    /// The current round's global truncated to each granted rank list, encoded.
    truncated: BTreeMap<Vec<usize>, EncodedDelta>,
    /// A committed round whose federated evaluation is still to start.
    eval_owed: Option<Round>,
    /// The federated evaluation running, if any (no round starts meanwhile).
    evaluation: Option<Evaluation>,
    now: Time,
    finished: bool,
    finished_announced: bool,
    fatal: bool,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("committed", &self.committed)
            .field("clients", &self.clients.len())
            .field("attempt", &self.attempt.as_ref().map(|a| a.number))
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// A 64-bit mix (SplitMix64's finaliser), to derive independent seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn reject_key(reason: RejectReason) -> String {
    format!("{reason:?}")
}

/// At most 16 hex characters of a digest, for messages.
fn short_hex(s: &str) -> &str {
    &s[..s.len().min(16)]
}

impl Engine {
    /// An engine that continues after `start_round` (the newest committed round; 0 for a fresh
    /// start) from the pool `global`, merging with `merge`.
    pub fn new(
        config: EngineConfig,
        spec: PoolSpec,
        merge: Box<dyn Merge>,
        start_round: Round,
        global: AdapterPool,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        spec.validate().map_err(|e| EngineError::Pool(e.to_string()))?;
        global.validate(&spec).map_err(|e| EngineError::Pool(format!("the global pool does not fit the spec: {e}")))?;
        let finished = start_round.0 >= config.total_rounds;
        Ok(Self {
            spec_hash: spec.hash(),
            config,
            spec,
            merge,
            global,
            committed: start_round,
            clients: BTreeMap::new(),
            tasks: HashMap::new(),
            // Task ids start high in later rounds so that ids of an earlier server run are unlikely
            // to be reused (the nonce is what protects; this keeps logs unambiguous).
            next_task: start_round.0.saturating_mul(1 << 20).saturating_add(1),
            account: None,
            attempt: None,
            attempts_started: 0,
            encoded: None,
            ranks: None,
            truncated: BTreeMap::new(),
            eval_owed: None,
            evaluation: None,
            now: Time::ZERO,
            finished,
            finished_announced: false,
            fatal: false,
        })
    }

    /// Grants LoRA rank budgets with `planner` from now on: each task carries the client's ranks
    /// and the global truncated to them; an update with a larger rank than granted is refused.
    pub fn with_ranks(mut self, planner: RankPlanner) -> Self {
        self.ranks = Some(planner);
        self
    }

    /// The rank planner, if budgets are on.
    pub fn rank_planner(&self) -> Option<&RankPlanner> {
        self.ranks.as_ref()
    }

    /// Asks for the federated evaluation of the newest committed round before the next round
    /// starts: for a restart after a crash that lost it (the round log's line has no `eval`).
    /// Does nothing without `eval_deadline` or before round 1.
    pub fn resume_evaluation(&mut self) {
        if self.config.eval_deadline.is_some() && self.committed.0 > 0 {
            self.eval_owed = Some(self.committed);
            self.finished = false;
        }
    }

    /// The round being evaluated, if a federated evaluation is running.
    pub fn evaluating(&self) -> Option<Round> {
        self.evaluation.as_ref().map(|e| e.round)
    }

    /// The newest committed round.
    pub fn round(&self) -> Round {
        self.committed
    }

    /// The global pool after the newest committed round.
    pub fn global(&self) -> &AdapterPool {
        &self.global
    }

    /// The server optimiser's state (FedAdam's moments; empty for a plain average), as the
    /// next commit will persist it.
    pub fn server_state(&self) -> BTreeMap<String, HostTensor> {
        self.merge.server_state()
    }

    /// True once the last round is committed.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Connected clients.
    pub fn connected_clients(&self) -> usize {
        self.clients.values().filter(|c| c.connected).count()
    }

    /// The round being trained and its attempt number, if one is running.
    pub fn running(&self) -> Option<(Round, u32)> {
        self.attempt.as_ref().map(|a| (Round(self.committed.0 + 1), a.number))
    }

    /// When the driver must send [`Event::Tick`] next: the running attempt's deadline or the
    /// earliest idle timeout of a connected client, whichever comes first. `None`: nothing is
    /// timed (only a new event can change anything).
    pub fn next_wakeup(&self) -> Option<Time> {
        if self.finished || self.fatal {
            return None;
        }
        let deadline =
            self.attempt.as_ref().map(|a| a.deadline_at).or_else(|| self.evaluation.as_ref().map(|e| e.deadline_at));
        let idle = self.clients.values().filter(|c| c.connected).map(|c| c.last_heard + self.config.idle_timeout).min();
        match (deadline, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Feeds one event at time `now`; returns what the driver must do, in order. Timers due at
    /// `now` run first. Times earlier than one already seen are taken as that one.
    pub fn handle(&mut self, now: Time, event: Event) -> Vec<Action> {
        let now = now.max(self.now);
        self.now = now;
        let mut out = Vec::new();
        if self.fatal {
            return out;
        }
        self.run_timers(now, &mut out);
        // A deadline that passed before this event is acted on first, as if the tick had come.
        self.progress(now, &mut out);
        match event {
            Event::Enroll { client, enroll } => self.on_enroll(now, client, enroll, &mut out),
            Event::Lost { client } => {
                if let Some(c) = self.clients.get_mut(&client) {
                    if c.connected {
                        tracing::debug!(%client, "client lost; its task stays open until the deadline");
                    }
                    c.connected = false;
                }
            }
            Event::Update { client, update, wire_bytes } => self.on_update(now, client, update, wire_bytes, &mut out),
            Event::EvalReport { client, report, wire_bytes } => {
                self.on_eval_report(now, client, report, wire_bytes, &mut out)
            }
            Event::Heartbeat { client } => {
                if let Some(c) = self.clients.get_mut(&client) {
                    if c.connected {
                        c.last_heard = now;
                    }
                }
            }
            Event::Throughput { client, bytes, seconds } => {
                if let Some(p) = self.ranks.as_mut() {
                    p.observe_upload(&client.0, bytes, seconds);
                }
            }
            Event::Tick => {}
        }
        self.progress(now, &mut out);
        if self.finished && !self.finished_announced {
            self.finished_announced = true;
            out.push(Action::Finished);
        }
        out
    }

    // ---- events ------------------------------------------------------------------------------

    fn on_enroll(&mut self, now: Time, client: ClientId, enroll: Enroll, out: &mut Vec<Action>) {
        let refusal = if enroll.protocol_version != PROTOCOL_VERSION {
            Some((
                RejectReason::ProtocolVersion,
                format!(
                    "client speaks protocol version {}, the server speaks version {PROTOCOL_VERSION}",
                    enroll.protocol_version
                ),
            ))
        } else if enroll.backbone != self.config.backbone {
            Some((
                RejectReason::BackboneMismatch,
                format!(
                    "client runs backbone {}, the server expects model {} (fingerprint of config.json + \
                     model.safetensors)",
                    short_hex(&enroll.backbone.to_string()),
                    short_hex(&self.config.backbone.to_string())
                ),
            ))
        } else if enroll.spec_hash != self.spec_hash {
            Some((
                RejectReason::SpecMismatch,
                format!(
                    "client trains pool spec {}, the server expects spec {} ({:?} adapter, {} targets)",
                    short_hex(&enroll.spec_hash.to_string()),
                    short_hex(&self.spec_hash.to_string()),
                    self.spec.kind,
                    self.spec.targets.len()
                ),
            ))
        } else {
            None
        };
        if let Some((reason, detail)) = refusal {
            tracing::warn!(%client, ?reason, %detail, "enrollment refused");
            out.push(Action::Reject {
                client: client.clone(),
                reject: Reject { round: None, task_id: None, reason, detail },
            });
            out.push(Action::Drop { client, reason: format!("enrollment refused: {reason:?}") });
            return;
        }
        let state = ClientState { connected: true, last_heard: now, examples: enroll.examples };
        let returning = self.clients.insert(client.clone(), state).is_some();
        tracing::info!(%client, returning, examples = enroll.examples, software = %enroll.software, "client enrolled");
        if let Some(p) = self.ranks.as_mut() {
            p.enrolled(&client.0, &enroll);
        }
        let heartbeat_secs = u32::try_from(self.config.heartbeat.as_secs().max(1)).unwrap_or(u32::MAX);
        out.push(Action::Welcome {
            client: client.clone(),
            welcome: Welcome { client_name: client.0.clone(), round: self.committed, heartbeat_secs },
        });
        // A client that comes back keeps its place: its open evaluation or task is sent again.
        let eval_open = self.evaluation.as_ref().filter(|e| e.pending.contains(&client)).map(|e| e.round);
        if let Some(round) = eval_open {
            tracing::info!(%client, %round, "re-sending the open evaluation task to a returning client");
            self.send_eval(now, client.clone(), out);
        }
        let open = self.attempt.as_ref().and_then(|a| a.by_client.get(&client).copied());
        if let Some(task_id) = open {
            if self.tasks.get(&task_id).is_some_and(|t| t.state == TaskState::Open) {
                tracing::info!(%client, task = %task_id, "re-sending the open task to a returning client");
                self.send_task(now, client, task_id, out);
            }
        }
    }

    fn on_update(&mut self, now: Time, client: ClientId, update: Update, wire_bytes: u64, out: &mut Vec<Action>) {
        if let Some(acc) = self.account.as_mut() {
            acc.bytes_up = acc.bytes_up.saturating_add(wire_bytes);
        }
        match self.clients.get_mut(&client) {
            Some(c) => {
                if c.connected {
                    c.last_heard = now;
                }
            }
            None => {
                let detail = "update from a client that has not enrolled".to_string();
                self.refuse(client, &update, RejectReason::Protocol, detail, out);
                return;
            }
        }
        match self.check_update(now, &client, &update) {
            Err((reason, detail)) => self.refuse(client, &update, reason, detail, out),
            Ok(expected) => match update.validate(&expected, &self.spec, &self.config.decode_limits) {
                Err(invalid) => {
                    self.mark(update.task_id, TaskState::Rejected);
                    self.refuse(client, &update, invalid.reason, invalid.detail, out);
                }
                Ok(delta) => {
                    let round = expected.round;
                    let declared = self.clients.get(&client).map_or(0, |c| c.examples);
                    if update.examples > declared {
                        let detail = format!(
                            "the update claims {} examples, the client declared {declared} at enrollment",
                            update.examples
                        );
                        self.mark(update.task_id, TaskState::Rejected);
                        self.refuse(client, &update, RejectReason::InvalidDelta, detail, out);
                        return;
                    }
                    if let Some(detail) = self.above_grant(&update, &delta) {
                        self.mark(update.task_id, TaskState::Rejected);
                        self.refuse(client, &update, RejectReason::InvalidDelta, detail, out);
                        return;
                    }
                    if let Err(e) = self.merge.fold(&delta, update.examples) {
                        tracing::warn!(%client, %round, error = %e, "the merge refused an update");
                        self.mark(update.task_id, TaskState::Rejected);
                        self.refuse(client, &update, RejectReason::InvalidDelta, e.to_string(), out);
                        return;
                    }
                    self.mark(update.task_id, TaskState::Accepted);
                    if let Some(p) = self.ranks.as_mut() {
                        p.observe_update(&client.0, &update);
                    }
                    if let Some(a) = self.attempt.as_mut() {
                        let w = update.examples as f64;
                        a.accepted.push(client.0.clone());
                        a.examples = a.examples.saturating_add(update.examples);
                        a.loss_sum += w * f64::from(update.metrics.loss);
                        a.accuracy_sum += w * f64::from(update.metrics.accuracy);
                    }
                    tracing::debug!(%client, %round, task = %update.task_id, examples = update.examples, "update accepted");
                    out.push(Action::Ack { client, ack: Ack { round, task_id: update.task_id } });
                }
            },
        }
    }

    /// Why an update carries more than its task granted (a LoRA rank above the budget), if it does.
    fn above_grant(&self, update: &Update, delta: &fedpool_common::PoolDelta) -> Option<String> {
        let granted = self.tasks.get(&update.task_id)?.ranks.as_ref()?;
        delta.lora_ranks(&self.spec).into_iter().find_map(|(target, rank)| {
            let allowed = granted.get(&target).copied().unwrap_or(0);
            (rank > allowed).then(|| format!("rank {rank} on LoRA target {target:?}, but the task granted {allowed}"))
        })
    }

    /// The task an update answers, if its sender, round, nonce, state and timing are right.
    fn check_update(
        &self,
        now: Time,
        client: &ClientId,
        update: &Update,
    ) -> Result<ExpectedTask, (RejectReason, String)> {
        let Some(task) = self.tasks.get(&update.task_id) else {
            return Err((RejectReason::UnknownTask, format!("task {} is not known to the server", update.task_id)));
        };
        if &task.client != client {
            return Err((RejectReason::UnknownTask, format!("task {} was not given to this client", update.task_id)));
        }
        if update.round != task.round {
            return Err((
                RejectReason::WrongRound,
                format!("update for round {}, task {} is for round {}", update.round, update.task_id, task.round),
            ));
        }
        if update.nonce != task.nonce {
            return Err((
                RejectReason::WrongNonce,
                format!("nonce does not match task {}'s (replayed update?)", update.task_id),
            ));
        }
        match task.state {
            TaskState::Accepted | TaskState::Rejected => {
                return Err((RejectReason::Duplicate, format!("task {} already has an update", update.task_id)));
            }
            TaskState::Open => {}
        }
        let live = self.attempt.as_ref().is_some_and(|a| a.by_client.get(client) == Some(&update.task_id));
        if !live {
            return Err((
                RejectReason::Late,
                format!("task {} of round {} closed before its update arrived", update.task_id, task.round),
            ));
        }
        if let Some(a) = self.attempt.as_ref() {
            if now >= a.deadline_at {
                return Err((RejectReason::Late, format!("update after the deadline of round {}", task.round)));
            }
        }
        Ok(ExpectedTask { round: task.round, task_id: update.task_id, nonce: task.nonce })
    }

    fn mark(&mut self, task_id: TaskId, state: TaskState) {
        if let Some(t) = self.tasks.get_mut(&task_id) {
            t.state = state;
            if let Some(a) = self.attempt.as_mut() {
                if a.by_client.get(&t.client) == Some(&task_id) {
                    a.answered += 1;
                }
            }
        }
    }

    fn refuse(
        &mut self,
        client: ClientId,
        update: &Update,
        reason: RejectReason,
        detail: String,
        out: &mut Vec<Action>,
    ) {
        tracing::info!(%client, round = %update.round, task = %update.task_id, ?reason, %detail, "update refused");
        if let Some(acc) = self.account.as_mut() {
            *acc.rejected.entry(reject_key(reason)).or_insert(0) += 1;
        }
        out.push(Action::Reject {
            client,
            reject: Reject { round: Some(update.round), task_id: Some(update.task_id), reason, detail },
        });
    }

    // ---- timers and round progress -------------------------------------------------------------

    fn run_timers(&mut self, now: Time, out: &mut Vec<Action>) {
        let idle: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.connected && now >= c.last_heard + self.config.idle_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for client in idle {
            if let Some(c) = self.clients.get_mut(&client) {
                c.connected = false;
            }
            let secs = self.config.idle_timeout.as_secs_f64();
            tracing::info!(%client, "dropping a client not heard from for {secs:.1} s");
            out.push(Action::Drop { client, reason: format!("not heard from for {secs:.1} s (idle timeout)") });
        }
    }

    /// Commits, retries or starts rounds as far as the state allows at `now`.
    fn progress(&mut self, now: Time, out: &mut Vec<Action>) {
        // Each pass changes the phase (evaluate, commit, retry or start), so this ends; the bound
        // is a guard.
        for _ in 0..6 {
            if self.fatal {
                return;
            }
            if let Some(e) = self.evaluation.as_ref() {
                if e.pending.is_empty() || now >= e.deadline_at {
                    self.finish_evaluation(now, out);
                    continue;
                }
                return;
            }
            if let Some(round) = self.eval_owed {
                // Like a round, an evaluation waits for enough connected clients (after a restart).
                if self.connected_clients() < self.config.min_clients_to_start {
                    return;
                }
                self.eval_owed = None;
                self.start_evaluation(now, round, out);
                continue;
            }
            if self.finished {
                return;
            }
            match self.attempt.as_ref() {
                Some(a) => {
                    let received = a.accepted.len();
                    let all_answered = a.answered >= a.by_client.len();
                    let deadline_passed = now >= a.deadline_at;
                    let c = &self.config;
                    if received >= c.quorum && (all_answered || received >= c.clients_per_round || deadline_passed) {
                        self.commit(now, out);
                    } else if deadline_passed || all_answered {
                        self.abandon_attempt(now, received);
                    } else {
                        return;
                    }
                }
                None => {
                    let connected = self.connected_clients();
                    if connected < self.config.min_clients_to_start {
                        return;
                    }
                    self.start_attempt(now, out);
                }
            }
        }
    }

    fn abandon_attempt(&mut self, now: Time, received: usize) {
        let Some(a) = self.attempt.take() else { return };
        let round = Round(self.committed.0 + 1);
        let why = if now >= a.deadline_at { "the deadline passed" } else { "every selected client answered" };
        tracing::warn!(
            %round,
            attempt = a.number,
            received,
            quorum = self.config.quorum,
            "round attempt missed its quorum ({why}); retrying with new tasks"
        );
        // The attempt's tasks stay known (an update for one is then `Late`) until the round after
        // next starts; `check_update` tells a closed task by its absence from the running attempt.
    }

    fn start_attempt(&mut self, now: Time, out: &mut Vec<Action>) {
        let round = Round(self.committed.0 + 1);
        // Tasks older than the previous round can no longer be told apart usefully: forget them.
        self.tasks.retain(|_, t| t.round.0 + 1 >= round.0);
        if self.encoded.as_ref().map(|(r, _)| *r) != Some(round) {
            match self.encode_global(round) {
                Ok(enc) => self.encoded = Some((round, enc)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a round");
                    self.fatal = true;
                    out.push(Action::Fatal(e));
                    return;
                }
            }
        }
        if let Err(source) = self.merge.begin(&self.global) {
            let e = EngineError::Merge { round, source };
            tracing::error!(error = %e, "the merge cannot begin a round");
            self.fatal = true;
            out.push(Action::Fatal(e));
            return;
        }
        self.attempts_started += 1;
        let number = self.attempts_started;
        let account = self.account.get_or_insert_with(|| RoundAccount {
            round,
            started_at: now,
            bytes_up: 0,
            bytes_down: 0,
            rejected: BTreeMap::new(),
        });
        debug_assert_eq!(account.round, round);

        // Sample deterministically from the connected clients in identity order.
        let candidates: Vec<ClientId> =
            self.clients.iter().filter(|(_, c)| c.connected).map(|(id, _)| id.clone()).collect();
        let want = self.config.selected_per_round().min(candidates.len());
        let seed = mix(self.config.seed ^ mix(round.0 ^ mix(u64::from(number))));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut picked: Vec<usize> = rand::seq::index::sample(&mut rng, candidates.len(), want).into_vec();
        picked.sort_unstable();
        let mut selected: Vec<ClientId> = picked.into_iter().map(|i| candidates[i].clone()).collect();
        let grants = self.plan_ranks(round, &mut selected);

        let deadline_at = now + self.config.deadline;
        let mut by_client = BTreeMap::new();
        for (client, ranks) in selected.iter().zip(grants) {
            let id = TaskId(self.next_task);
            self.next_task = self.next_task.wrapping_add(1);
            let info =
                TaskInfo { round, client: client.clone(), nonce: Nonce::random(), state: TaskState::Open, ranks };
            self.tasks.insert(id, info);
            by_client.insert(client.clone(), id);
        }
        self.attempt = Some(Attempt {
            number,
            deadline_at,
            by_client: by_client.clone(),
            accepted: Vec::new(),
            answered: 0,
            examples: 0,
            loss_sum: 0.0,
            accuracy_sum: 0.0,
        });
        tracing::info!(
            %round,
            attempt = number,
            selected = selected.len(),
            connected = candidates.len(),
            deadline_secs = self.config.deadline.as_secs_f64(),
            "round started"
        );
        for (client, id) in by_client {
            self.send_task(now, client, id, out);
        }
    }

    /// Sends (or re-sends) task `task_id` of the running attempt to `client`, with the time left
    /// until the deadline.
    fn send_task(&mut self, now: Time, client: ClientId, task_id: TaskId, out: &mut Vec<Action>) {
        let Some(ranks) = self.tasks.get(&task_id).map(|t| t.ranks.clone()) else { return };
        let global = match ranks.as_ref().map(|r| self.truncated_global(r)) {
            Some(Ok(enc)) => Some(enc),
            Some(Err(e)) => {
                tracing::error!(%client, error = %e, "cannot encode the truncated global pool; sending it whole");
                None
            }
            None => None,
        };
        let (Some(info), Some(a), Some((_, whole))) = (self.tasks.get(&task_id), &self.attempt, &self.encoded) else {
            return;
        };
        let left = a.deadline_at.since(now);
        let rank_budget = ranks
            .iter()
            .flatten()
            .map(|(target, &rank)| TargetBudget { target: target.clone(), rank: rank as u32 })
            .collect();
        let task = Box::new(RoundTask {
            round: info.round,
            task_id,
            nonce: info.nonce,
            global: global.unwrap_or_else(|| whole.clone()),
            rank_budget,
            local_steps: self.config.local_steps,
            deadline_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        });
        let size = frame::encoded_len(task.as_ref()).map(|n| (n + HEADER_LEN) as u64).unwrap_or(0);
        if let Some(acc) = self.account.as_mut() {
            acc.bytes_down = acc.bytes_down.saturating_add(size);
        }
        out.push(Action::SendTask { client, task });
    }

    /// Asks the rank planner (if any) for each selected client's ranks; clients told to sit out
    /// leave the selection. Without a planner every client trains every triplet (`None`).
    fn plan_ranks(&mut self, round: Round, selected: &mut Vec<ClientId>) -> Vec<Option<BTreeMap<String, usize>>> {
        let Some(planner) = self.ranks.as_ref() else { return vec![None; selected.len()] };
        let names: Vec<String> = selected.iter().map(|c| c.0.clone()).collect();
        let task_bytes = self.encoded.as_ref().map_or(0, |(_, e)| e.wire_len() as u64);
        let plans = match planner.plan(round, &names, task_bytes) {
            Ok(p) if p.len() == names.len() => p,
            Ok(_) | Err(_) => {
                tracing::error!(%round, "the rank planner failed; every client trains every triplet this round");
                return vec![None; selected.len()];
            }
        };
        let mut grants = Vec::with_capacity(selected.len());
        let mut kept = Vec::with_capacity(selected.len());
        for (client, plan) in selected.drain(..).zip(plans) {
            match plan {
                Plan::Train(ranks) => {
                    let per_target: Vec<u32> = ranks.iter().map(|b| b.rank).collect();
                    tracing::info!(%client, %round, ranks = ?per_target, "rank budget");
                    grants.push(Some(ranks.into_iter().map(|b| (b.target, b.rank as usize)).collect()));
                    kept.push(client);
                }
                Plan::SitOut(why) => tracing::info!(%client, %round, "sits this round out: {why}"),
            }
        }
        *selected = kept;
        grants
    }

    /// The current global truncated to `ranks` and encoded with the download codec (once per
    /// distinct rank list and round).
    fn truncated_global(&mut self, ranks: &BTreeMap<String, usize>) -> Result<EncodedDelta, EngineError> {
        let round = Round(self.committed.0 + 1);
        let key: Vec<usize> = self.spec.targets.iter().map(|t| ranks.get(&t.name).copied().unwrap_or(0)).collect();
        if let Some(e) = self.truncated.get(&key) {
            return Ok(e.clone());
        }
        let err = |p: String| EngineError::Encode { round, problem: p };
        let delta = truncate_lora(&self.global, &self.spec, ranks).map_err(|e| err(e.to_string()))?;
        let enc = codec::encode(&delta, &self.config.download_codec, None, mix(self.config.seed ^ round.0))
            .map_err(|e| err(e.to_string()))?;
        self.truncated.insert(key, enc.clone());
        Ok(enc)
    }

    /// The global pool as a delta from zero (every slot listed for SSF pools; see the module
    /// documentation), encoded with the download codec.
    fn encode_global(&self, round: Round) -> Result<EncodedDelta, EngineError> {
        let err = |p: String| EngineError::Encode { round, problem: p };
        let delta = self.global.to_transfer(&self.spec).map_err(|e| err(e.to_string()))?;
        codec::encode(&delta, &self.config.download_codec, None, mix(self.config.seed ^ round.0))
            .map_err(|e| err(e.to_string()))
    }

    fn commit(&mut self, now: Time, out: &mut Vec<Action>) {
        let Some(a) = self.attempt.take() else { return };
        let round = Round(self.committed.0 + 1);
        let pool = match self.merge.finish(&self.global) {
            Ok(p) => p,
            Err(source) => {
                let e = EngineError::Merge { round, source };
                tracing::error!(error = %e, attempt = a.number, "the merge could not finish; retrying the round");
                return;
            }
        };
        if let Err(e) = pool.validate(&self.spec) {
            tracing::error!(%round, error = %e, attempt = a.number, "the merge produced a pool that does not fit the spec; retrying the round");
            return;
        }
        let acc = self.account.take().unwrap_or(RoundAccount {
            round,
            started_at: now,
            bytes_up: 0,
            bytes_down: 0,
            rejected: BTreeMap::new(),
        });
        let mut stragglers: Vec<String> = a
            .by_client
            .iter()
            .filter(|(_, id)| self.tasks.get(id).is_some_and(|t| t.state == TaskState::Open))
            .map(|(c, _)| c.0.clone())
            .collect();
        stragglers.sort();
        let mut clients = a.accepted.clone();
        clients.sort();
        let w = a.examples as f64;
        let mean = |sum: f64| if a.examples > 0 { Some(sum / w) } else { None };
        let record = RoundRecord {
            round: round.0,
            attempt: a.number,
            clients,
            examples: a.examples,
            bytes_up: acc.bytes_up,
            bytes_down: acc.bytes_down,
            rejected: acc.rejected,
            stragglers,
            train_loss: mean(a.loss_sum),
            train_accuracy: mean(a.accuracy_sum),
            started_at_secs: acc.started_at.as_secs_f64(),
            committed_at_secs: now.as_secs_f64(),
            recovered: false,
            eval: None,
        };
        tracing::info!(
            %round,
            attempt = record.attempt,
            clients = record.clients.len(),
            stragglers = record.stragglers.len(),
            examples = record.examples,
            bytes_up = record.bytes_up,
            bytes_down = record.bytes_down,
            seconds = record.committed_at_secs - record.started_at_secs,
            train_loss = record.train_loss,
            "round committed"
        );
        self.global = pool.clone();
        self.truncated.clear();
        if let Some(p) = self.ranks.as_mut() {
            p.committed(&pool);
        }
        self.committed = round;
        self.attempts_started = 0;
        self.encoded = None;
        let server_state = self.merge.server_state();
        out.push(Action::Commit(Box::new(Commit { round, pool, record, server_state })));
        if self.config.eval_deadline.is_some() {
            self.eval_owed = Some(round);
        } else if self.committed.0 >= self.config.total_rounds {
            self.finished = true;
            tracing::info!(rounds = self.committed.0, "training finished");
        }
    }

    // ---- federated evaluation ------------------------------------------------------------------

    /// Sends every connected client an evaluation task for the global pool of `round` (the
    /// newest commit). The encoding is kept for the next round's tasks, which carry the same pool.
    fn start_evaluation(&mut self, now: Time, round: Round, out: &mut Vec<Action>) {
        let Some(deadline) = self.config.eval_deadline else { return };
        let next = Round(round.0 + 1);
        if self.encoded.as_ref().map(|(r, _)| *r) != Some(next) {
            match self.encode_global(next) {
                Ok(enc) => self.encoded = Some((next, enc)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the evaluation");
                    self.fatal = true;
                    out.push(Action::Fatal(e));
                    return;
                }
            }
        }
        let mut tasks = BTreeMap::new();
        for (client, _) in self.clients.iter().filter(|(_, c)| c.connected) {
            tasks.insert(client.clone(), TaskId(self.next_task));
            self.next_task = self.next_task.wrapping_add(1);
        }
        tracing::info!(%round, clients = tasks.len(), "federated evaluation started");
        let pending: BTreeSet<ClientId> = tasks.keys().cloned().collect();
        self.evaluation = Some(Evaluation {
            round,
            started_at: now,
            deadline_at: now + deadline,
            tasks,
            pending: pending.clone(),
            reported: Vec::new(),
            examples: 0,
            accuracy_sum: 0.0,
            f1_sum: 0.0,
            loss_sum: 0.0,
            bytes_down: 0,
            bytes_up: 0,
        });
        for client in pending {
            self.send_eval(now, client, out);
        }
    }

    /// Sends (or re-sends) `client`'s evaluation task with the time left until its deadline.
    fn send_eval(&mut self, now: Time, client: ClientId, out: &mut Vec<Action>) {
        let (Some(e), Some((_, global))) = (self.evaluation.as_mut(), &self.encoded) else { return };
        let Some(&task_id) = e.tasks.get(&client) else { return };
        let left = e.deadline_at.since(now);
        let task = Box::new(EvalTask {
            round: e.round,
            task_id,
            global: global.clone(),
            deadline_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        });
        let size = frame::encoded_len(task.as_ref()).map(|n| (n + HEADER_LEN) as u64).unwrap_or(0);
        e.bytes_down = e.bytes_down.saturating_add(size);
        out.push(Action::SendEval { client, task });
    }

    fn on_eval_report(
        &mut self,
        now: Time,
        client: ClientId,
        report: EvalReport,
        wire_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        if let Some(c) = self.clients.get_mut(&client) {
            if c.connected {
                c.last_heard = now;
            }
        }
        let refusal = match self.evaluation.as_mut() {
            None => Some((RejectReason::Late, format!("no evaluation is open (report for round {})", report.round))),
            Some(e) => {
                e.bytes_up = e.bytes_up.saturating_add(wire_bytes);
                if report.round != e.round {
                    Some((
                        RejectReason::WrongRound,
                        format!("evaluation of round {}, the open one is round {}", report.round, e.round),
                    ))
                } else if e.tasks.get(&client) != Some(&report.task_id) {
                    Some((
                        RejectReason::UnknownTask,
                        format!("evaluation task {} was not given to this client", report.task_id),
                    ))
                } else if !e.pending.contains(&client) {
                    Some((RejectReason::Duplicate, format!("evaluation task {} already reported", report.task_id)))
                } else if let Err(invalid) = report.metrics.validate() {
                    Some((invalid.reason, invalid.detail))
                } else {
                    let m = report.metrics;
                    let w = m.examples as f64;
                    e.pending.remove(&client);
                    e.reported.push(client.0.clone());
                    e.examples = e.examples.saturating_add(m.examples);
                    e.accuracy_sum += w * f64::from(m.accuracy);
                    e.f1_sum += w * f64::from(m.macro_f1);
                    e.loss_sum += w * f64::from(m.loss);
                    None
                }
            }
        };
        match refusal {
            None => out.push(Action::Ack { client, ack: Ack { round: report.round, task_id: report.task_id } }),
            Some((reason, detail)) => {
                tracing::info!(%client, round = %report.round, ?reason, %detail, "evaluation report refused");
                out.push(Action::Reject {
                    client,
                    reject: Reject { round: Some(report.round), task_id: Some(report.task_id), reason, detail },
                });
            }
        }
    }

    fn finish_evaluation(&mut self, now: Time, out: &mut Vec<Action>) {
        let Some(e) = self.evaluation.take() else { return };
        let w = e.examples as f64;
        let mean = |sum: f64| if e.examples > 0 { Some(sum / w) } else { None };
        let mut clients = e.reported.clone();
        clients.sort();
        let eval = EvalRecord {
            accuracy: mean(e.accuracy_sum),
            macro_f1: mean(e.f1_sum),
            loss: mean(e.loss_sum),
            examples: e.examples,
            clients,
            missing: e.pending.iter().map(|c| c.0.clone()).collect(),
            bytes_down: e.bytes_down,
            bytes_up: e.bytes_up,
            seconds: now.since(e.started_at).as_secs_f64(),
        };
        tracing::info!(
            round = %e.round,
            accuracy = eval.accuracy,
            macro_f1 = eval.macro_f1,
            examples = eval.examples,
            missing = eval.missing.len(),
            "federated evaluation finished"
        );
        out.push(Action::RecordEval { round: e.round, eval });
        if self.committed.0 >= self.config.total_rounds {
            self.finished = true;
            tracing::info!(rounds = self.committed.0, "training finished");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn over_selection_rounds_up() {
        let mut c = EngineConfig {
            total_rounds: 1,
            clients_per_round: 10,
            quorum: 8,
            over_selection: 1.3,
            min_clients_to_start: 8,
            deadline: Duration::from_secs(1),
            local_steps: 1,
            seed: 0,
            download_codec: CodecConfig::default(),
            decode_limits: DecodeLimits::default(),
            backbone: BackboneFingerprint(fedpool_common::Sha256::of(b"m")),
            heartbeat: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3),
            eval_deadline: None,
        };
        assert_eq!(c.selected_per_round(), 13);
        c.over_selection = 1.0;
        assert_eq!(c.selected_per_round(), 10);
        c.over_selection = 1.01;
        assert_eq!(c.selected_per_round(), 11);
        c.validate().unwrap();
        c.min_clients_to_start = 2;
        assert!(c.validate().is_err());
    }

    #[test]
    fn seeds_differ_per_round_and_attempt() {
        let s = |r: u64, a: u64| mix(7 ^ mix(r ^ mix(a)));
        let all: BTreeSet<u64> = [s(1, 1), s(1, 2), s(2, 1), s(2, 2)].into_iter().collect();
        assert_eq!(all.len(), 4);
    }
}
