//! The round engine: a sans-IO state machine (docs/design.md, principle 1, in the manner of
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
//! A round (docs/design.md, "Rounds that finish despite stragglers and crashes"):
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
//! connected clients in identity order). Nonces come from a [`NonceSource`]: by default the
//! operating system's secure random source ([`OsNonces`]), since a predictable nonce would allow
//! forged replays; a test installs [`SeededNonces`] with [`Engine::with_nonces`], and the engine's
//! actions are then byte for byte a function of its events. Nonces change no result, so
//! simulations stay reproducible either way.
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
//!
//! **Layout.** This module holds the [`Engine`], its `Phase` and the event loop (`handle`,
//! timers, `progress`); `event` the types exchanged with the driver ([`Event`], [`Action`],
//! [`Commit`], [`ClientId`], [`Time`]); `config` [`EngineConfig`] and [`EngineError`]; `attempt`
//! a round's training attempt (sampling, grants, tasks, update checks, commit); `evaluation` the
//! federated evaluation; `record` the round log's [`RoundRecord`] and [`EvalRecord`]; `nonce` the
//! [`NonceSource`]s.
//!
//! [`RoundTask`]: fedpool_common::wire::RoundTask
//! [`Update::validate`]: fedpool_common::wire::Update::validate
//! [`EvalTask`]: fedpool_common::wire::EvalTask
//! [`EvalReport`]: fedpool_common::wire::EvalReport

mod attempt;
mod config;
mod evaluation;
mod event;
mod nonce;
mod record;
mod trust;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use fedpool_common::adapter::PoolSpec;
use fedpool_common::codec::EncodedDelta;
use fedpool_common::wire::{Enroll, Reject, RejectReason, Welcome, PROTOCOL_VERSION};
use fedpool_common::{AdapterPool, HostTensor, Round, SpecHash, TaskId};

pub use config::{EngineConfig, EngineError};
pub use event::{Action, ClientId, Commit, Event, Time};
pub use nonce::{NonceSource, OsNonces, SeededNonces};
pub use record::{EvalRecord, RoundRecord};
pub use trust::{
    NormBound, RosterEntry, TrustConfig, DEFAULT_MAX_ABS_VALUE, DEFAULT_MAX_EXAMPLES_PER_UPDATE, DEFAULT_NORM_FACTOR,
    DEFAULT_STRIKES, DEFAULT_STRIKE_WINDOW,
};

use crate::aggregate::Merge;
use crate::ranks::RankPlanner;
use attempt::{Attempt, Close, RoundAccount, TaskInfo, TaskState};
use evaluation::Evaluation;

/// What the engine knows of an enrolled client.
#[derive(Debug, Clone)]
struct ClientState {
    connected: bool,
    last_heard: Time,
    /// The training examples it declared at its first enrollment: an update may not claim more.
    declared: u64,
    /// What its updates weigh at most: `declared` capped by the roster or
    /// `max_examples_per_update` (frozen for the client's life).
    weight_cap: u64,
}

/// Where the engine stands. Each phase holds its own state, so that no other combination (an
/// attempt during an evaluation, a finished engine with an open attempt) can be written down.
///
/// `WaitingToTrain` → `Training` (enough clients connected) → `WaitingToEvaluate` (a commit, with
/// `eval_deadline`) → `Evaluating` (enough clients connected) → `WaitingToTrain` (the evaluation
/// recorded). A commit without evaluation, an abandoned attempt and a merge that cannot finish
/// lead back to `WaitingToTrain`; the last round's commit or evaluation to `Finished`; a pool
/// that cannot be encoded or a merge that cannot begin to `Failed`.
#[derive(Debug)]
enum Phase {
    /// Round `committed + 1` waits for `min_clients_to_start` connected clients. `account` holds
    /// the round's totals once one of its attempts ran (a retry waits here too).
    WaitingToTrain {
        /// The round's totals across its attempts (`None` before its first attempt).
        account: Option<RoundAccount>,
    },
    /// An attempt of round `committed + 1` is open.
    Training {
        /// The round's totals across its attempts.
        account: RoundAccount,
        /// The open attempt.
        attempt: Attempt,
    },
    /// The newest commit's federated evaluation waits for `min_clients_to_start` connected clients.
    WaitingToEvaluate,
    /// The federated evaluation of the newest commit is open; no round starts meanwhile.
    Evaluating(Evaluation),
    /// The last round is committed (and evaluated). `announced` once [`Action::Finished`] went out.
    Finished {
        /// Whether the driver was told.
        announced: bool,
    },
    /// The engine cannot go on ([`Action::Fatal`] went out); it ignores every event.
    Failed,
}

impl Phase {
    /// The phase's name, for logs and `Debug`.
    fn name(&self) -> &'static str {
        match self {
            Phase::WaitingToTrain { .. } => "waiting to train",
            Phase::Training { .. } => "training",
            Phase::WaitingToEvaluate => "waiting to evaluate",
            Phase::Evaluating(_) => "evaluating",
            Phase::Finished { .. } => "finished",
            Phase::Failed => "failed",
        }
    }
}

/// The round engine (see the module documentation for what a round is).
///
/// Its methods come in four families. Construction: [`Engine::new`], then the builders
/// [`Engine::with_ranks`] and [`Engine::with_nonces`], and [`Engine::resume_evaluation`] before
/// the first event. Events: [`Engine::handle`], the one method that changes the engine, returns
/// the actions to carry out in order. Timers: [`Engine::next_wakeup`], the latest time at which
/// the driver must send [`Event::Tick`]. Getters: [`Engine::round`], [`Engine::global`],
/// [`Engine::running`], [`Engine::evaluating`], [`Engine::is_finished`] and the like, which only
/// read. A driver builds the engine, then loops: wait for a client message or `next_wakeup`,
/// call `handle`, carry out the actions (persisting a [`Commit`] before what follows it), until
/// [`Action::Finished`] or [`Action::Fatal`].
pub struct Engine {
    config: EngineConfig,
    spec: PoolSpec,
    spec_hash: SpecHash,
    merge: Box<dyn Merge>,
    global: AdapterPool,
    /// The newest committed round.
    committed: Round,
    clients: BTreeMap<ClientId, ClientState>,
    /// Tasks of the running round and of the round before (to tell late from unknown).
    tasks: HashMap<TaskId, TaskInfo>,
    next_task: u64,
    /// Where the engine stands.
    phase: Phase,
    /// The global pool encoded for the tasks of the round it is for.
    encoded: Option<(Round, EncodedDelta)>,
    /// Per-client LoRA rank budgets, when a policy is set ([`Engine::with_ranks`]).
    ranks: Option<RankPlanner>,
    /// The current round's global truncated to each granted rank list, encoded.
    truncated: BTreeMap<Vec<usize>, EncodedDelta>,
    /// Where task nonces come from ([`Engine::with_nonces`]).
    nonces: Box<dyn NonceSource>,
    /// Refusals per client, and the quarantined ones.
    strikes: trust::StrikeBook,
    /// The median L2 norm of the accepted updates of the newest committed round (the norm
    /// bound's reference), if known.
    norm_median: Option<f64>,
    now: Time,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("committed", &self.committed)
            .field("clients", &self.clients.len())
            .field("phase", &self.phase.name())
            .field("attempt", &self.attempt().map(|a| a.number))
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

/// At most 16 hex characters of a digest, for messages.
fn short_hex(s: &str) -> &str {
    &s[..s.len().min(16)]
}

/// A client-supplied string made safe for a log line: at most 64 characters, control and other
/// non-printing characters escaped.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

impl Engine {
    /// An engine that continues after `start_round` (the newest committed round; 0 for a fresh
    /// start) from the pool `global`, merging with `merge`. Its nonces come from the operating
    /// system ([`OsNonces`]).
    pub fn new(
        config: EngineConfig,
        spec: PoolSpec,
        merge: Box<dyn Merge>,
        start_round: Round,
        global: AdapterPool,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        spec.validate()?;
        global.validate(&spec).map_err(EngineError::Global)?;
        let phase = if start_round.0 >= config.total_rounds {
            Phase::Finished { announced: false }
        } else {
            Phase::WaitingToTrain { account: None }
        };
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
            phase,
            encoded: None,
            ranks: None,
            truncated: BTreeMap::new(),
            nonces: Box::new(OsNonces),
            strikes: trust::StrikeBook::default(),
            norm_median: None,
            now: Time::ZERO,
        })
    }

    /// Starts with `median` as the median update norm of the newest committed round (the norm
    /// bound's reference: a restart takes it from the round log, so the bound holds from its
    /// first round on).
    pub fn with_norm_median(mut self, median: Option<f64>) -> Self {
        self.norm_median = median.filter(|m| m.is_finite() && *m > 0.0);
        self
    }

    /// The clients quarantined so far, each with the refusal that put it there.
    pub fn quarantined(&self) -> &BTreeMap<String, String> {
        self.strikes.quarantined()
    }

    /// Grants LoRA rank budgets with `planner` from now on: each task carries the client's ranks
    /// and the global truncated to them; an update with a larger rank than granted is refused.
    pub fn with_ranks(mut self, planner: RankPlanner) -> Self {
        self.ranks = Some(planner);
        self
    }

    /// Takes task nonces from `nonces` from now on instead of the operating system. With
    /// [`SeededNonces`] the engine's actions are byte for byte a function of its events (tests,
    /// simulations); a server keeps the default, as predictable nonces allow forged replays.
    pub fn with_nonces(mut self, nonces: impl NonceSource + 'static) -> Self {
        self.nonces = Box::new(nonces);
        self
    }

    /// The rank planner, if budgets are on.
    pub fn rank_planner(&self) -> Option<&RankPlanner> {
        self.ranks.as_ref()
    }

    /// Asks for the federated evaluation of the newest committed round before the next round
    /// starts: for a restart after a crash that lost it (the round log's line has no `eval`).
    /// Call it before the first event. Does nothing without `eval_deadline`, before round 1, or
    /// once an attempt or an evaluation has started.
    pub fn resume_evaluation(&mut self) {
        let not_started =
            matches!(self.phase, Phase::WaitingToTrain { account: None } | Phase::Finished { announced: false });
        if self.config.eval_deadline.is_some() && self.committed.0 > 0 && not_started {
            self.phase = Phase::WaitingToEvaluate;
        }
    }

    /// The round being evaluated, if a federated evaluation is running.
    pub fn evaluating(&self) -> Option<Round> {
        match &self.phase {
            Phase::Evaluating(e) => Some(e.round),
            _ => None,
        }
    }

    /// The newest committed round.
    pub fn round(&self) -> Round {
        self.committed
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Where the engine stands, in words: "waiting to train", "training", "waiting to
    /// evaluate", "evaluating", "finished" or "failed".
    pub fn phase_name(&self) -> &'static str {
        self.phase.name()
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

    /// True once the last round is committed (and evaluated).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished { .. })
    }

    /// Connected clients.
    pub fn connected_clients(&self) -> usize {
        self.clients.values().filter(|c| c.connected).count()
    }

    /// The round being trained and its attempt number, if one is running.
    pub fn running(&self) -> Option<(Round, u32)> {
        self.attempt().map(|a| (self.training_round(), a.number))
    }

    /// When the driver must send [`Event::Tick`] next: the running attempt's or evaluation's
    /// deadline or the earliest idle timeout of a connected client, whichever comes first.
    /// `None`: nothing is timed (only a new event can change anything).
    pub fn next_wakeup(&self) -> Option<Time> {
        let deadline = match &self.phase {
            Phase::Finished { .. } | Phase::Failed => return None,
            Phase::Training { attempt, .. } => Some(attempt.deadline_at),
            Phase::Evaluating(e) => Some(e.deadline_at),
            Phase::WaitingToTrain { .. } | Phase::WaitingToEvaluate => None,
        };
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
        if matches!(self.phase, Phase::Failed) {
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
        if let Phase::Finished { announced } = &mut self.phase {
            if !*announced {
                *announced = true;
                out.push(Action::Finished);
            }
        }
        out
    }

    // ---- where the engine stands -------------------------------------------------------------

    /// The round the next or running attempt trains.
    fn training_round(&self) -> Round {
        Round(self.committed.0 + 1)
    }

    /// The open attempt, if the engine is training.
    fn attempt(&self) -> Option<&Attempt> {
        match &self.phase {
            Phase::Training { attempt, .. } => Some(attempt),
            _ => None,
        }
    }

    /// The totals of the round being trained, once its first attempt started (until its commit).
    fn account_mut(&mut self) -> Option<&mut RoundAccount> {
        match &mut self.phase {
            Phase::Training { account, .. } | Phase::WaitingToTrain { account: Some(account) } => Some(account),
            _ => None,
        }
    }

    /// Stops the engine for good with [`Action::Fatal`].
    fn fail(&mut self, e: EngineError, out: &mut Vec<Action>) {
        self.phase = Phase::Failed;
        out.push(Action::Fatal(e));
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
        let refusal = refusal.or_else(|| self.enrollment_refusal(&client));
        if let Some((reason, detail)) = refusal {
            tracing::warn!(%client, ?reason, %detail, "enrollment refused");
            out.push(Action::Reject {
                client: client.clone(),
                reject: Reject { round: None, task_id: None, reason, detail: detail.clone() },
            });
            if reason == RejectReason::Protocol {
                self.strike(&client, reason, &detail, out);
            }
            out.push(Action::Drop { client, reason: format!("enrollment refused: {reason:?}") });
            return;
        }
        // The first declaration is frozen (capped): coming back cannot raise a client's weight.
        let first = ClientState {
            connected: true,
            last_heard: now,
            declared: enroll.examples,
            weight_cap: self.config.trust.frozen_examples(&client.0, enroll.examples),
        };
        let returning = self.clients.contains_key(&client);
        let state = self.clients.entry(client.clone()).or_insert(first);
        state.connected = true;
        state.last_heard = now;
        let (declared, weight_cap) = (state.declared, state.weight_cap);
        if enroll.examples != declared {
            tracing::warn!(
                %client,
                declared,
                claimed = enroll.examples,
                "client declares another example count than at its first enrollment; the first stands"
            );
        }
        tracing::info!(
            %client,
            returning,
            examples = declared,
            weight_cap,
            software = %printable(&enroll.software),
            "client enrolled"
        );
        if let Some(p) = self.ranks.as_mut() {
            p.enrolled(&client.0, &enroll);
        }
        let heartbeat_secs = u32::try_from(self.config.heartbeat.as_secs().max(1)).unwrap_or(u32::MAX);
        out.push(Action::Welcome {
            client: client.clone(),
            welcome: Welcome { client_name: client.0.clone(), round: self.committed, heartbeat_secs },
        });
        // A client that comes back keeps its place: its open evaluation or task is sent again.
        let eval_open = match &self.phase {
            Phase::Evaluating(e) if e.pending.contains(&client) => Some(e.round),
            _ => None,
        };
        if let Some(round) = eval_open {
            tracing::info!(%client, %round, "re-sending the open evaluation task to a returning client");
            self.send_eval(now, client.clone(), out);
        }
        let open = self.attempt().and_then(|a| a.by_client.get(&client).copied());
        if let Some(task_id) = open {
            if self.tasks.get(&task_id).is_some_and(|t| t.state == TaskState::Open) {
                tracing::info!(%client, task = %task_id, "re-sending the open task to a returning client");
                self.send_task(now, client, task_id, out);
            }
        }
    }

    /// Why `client` may not enroll now beyond what its message says: it is quarantined, not on
    /// a `roster_only` roster, or already enrolled on a live connection.
    fn enrollment_refusal(&self, client: &ClientId) -> Option<(RejectReason, String)> {
        if let Some(why) = self.strikes.quarantined().get(&client.0) {
            return Some((RejectReason::Quarantined, format!("client {client} is quarantined for this run: {why}")));
        }
        if self.config.trust.roster_only && !self.config.trust.roster.contains_key(&client.0) {
            return Some((RejectReason::Protocol, format!("client {client} is not on the coordinator's roster")));
        }
        if self.clients.get(client).is_some_and(|c| c.connected) {
            return Some((
                RejectReason::Protocol,
                format!("client {client} is already enrolled on a live connection (a second Enroll)"),
            ));
        }
        None
    }

    /// Counts a strike against `client` for a refusal of `reason`; at the limit the client is
    /// quarantined for the rest of the run (refused, dropped, logged by name).
    pub(super) fn strike(&mut self, client: &ClientId, reason: RejectReason, detail: &str, out: &mut Vec<Action>) {
        if !trust::is_strike(reason) {
            return;
        }
        let t = &self.config.trust;
        let round = self.training_round().0;
        let why = format!("{reason:?}: {detail}");
        if self.strikes.strike(&client.0, round, t.strikes, t.strike_window, &why) {
            let detail = format!(
                "client {client} is quarantined for the rest of the run: {} refusals within {} rounds, the last {why}",
                t.strikes, t.strike_window
            );
            tracing::warn!(%client, strikes = t.strikes, window = t.strike_window, last = %why, "client quarantined");
            if let Some(c) = self.clients.get_mut(client) {
                c.connected = false;
            }
            out.push(Action::Reject {
                client: client.clone(),
                reject: Reject {
                    round: None,
                    task_id: None,
                    reason: RejectReason::Quarantined,
                    detail: detail.clone(),
                },
            });
            out.push(Action::Drop { client: client.clone(), reason: detail });
        }
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

    /// Moves the engine on as far as `now` allows: closes the open attempt or evaluation if it is
    /// due, then starts an attempt or an evaluation if one waits and enough clients are connected.
    ///
    /// One pass is all `now` allows, so there is no loop. Closing leaves the engine waiting (to
    /// train, to evaluate) or finished, none of which can close. What starts stays open until an
    /// event or its deadline, which lies ahead of `now`: an evaluation asks at least one client
    /// (`min_clients_to_start` ≥ 1 are connected), and an attempt commits only on updates. (An
    /// attempt whose every selected client sat out has nothing to wait for; the next call
    /// abandons it and samples again.)
    fn progress(&mut self, now: Time, out: &mut Vec<Action>) {
        self.close_if_due(now, out);
        self.start_if_ready(now, out);
    }

    /// Ends the open evaluation if every asked client reported or its deadline passed, and the
    /// open attempt if it can commit or has to be abandoned.
    fn close_if_due(&mut self, now: Time, out: &mut Vec<Action>) {
        /// What of the open phase is due.
        enum Due {
            Evaluation,
            Attempt(Close),
        }
        let due = match &self.phase {
            Phase::Evaluating(e) if e.is_due(now) => Due::Evaluation,
            Phase::Training { attempt, .. } => match attempt.close(now, &self.config) {
                Some(close) => Due::Attempt(close),
                None => return,
            },
            _ => return,
        };
        // The closing step takes the phase's state and sets the next phase.
        match (std::mem::replace(&mut self.phase, Phase::Failed), due) {
            (Phase::Evaluating(e), Due::Evaluation) => self.finish_evaluation(now, e, out),
            (Phase::Training { account, attempt }, Due::Attempt(Close::Commit)) => {
                self.commit(now, account, attempt, out)
            }
            (Phase::Training { account, attempt }, Due::Attempt(Close::Abandon)) => {
                self.abandon_attempt(now, account, attempt, out)
            }
            (other, _) => self.phase = other,
        }
    }

    /// Starts the next attempt or the owed evaluation once `min_clients_to_start` clients are
    /// connected (after a restart an evaluation waits for them like a round).
    fn start_if_ready(&mut self, now: Time, out: &mut Vec<Action>) {
        if self.connected_clients() < self.config.min_clients_to_start {
            return;
        }
        match &mut self.phase {
            Phase::WaitingToEvaluate => self.start_evaluation(now, out),
            Phase::WaitingToTrain { account } => {
                let account = account.take();
                self.start_attempt(now, account, out);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn a_clients_software_string_is_logged_escaped_and_cut() {
        assert_eq!(printable("fedpool-client 0.1"), "fedpool-client 0.1");
        assert_eq!(printable("a\u{1b}[31mred\nforged line"), "a\\u{1b}[31mred\\nforged line");
        let long = "x".repeat(10_000);
        assert_eq!(printable(&long).chars().count(), 65, "64 characters and an ellipsis");
    }

    #[test]
    fn seeds_differ_per_round_and_attempt() {
        let s = |r: u64, a: u64| mix(7 ^ mix(r ^ mix(a)));
        let all: BTreeSet<u64> = [s(1, 1), s(1, 2), s(2, 1), s(2, 2)].into_iter().collect();
        assert_eq!(all.len(), 4);
    }
}
