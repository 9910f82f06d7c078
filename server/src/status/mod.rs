//! The coordinator's status page: one self-contained HTML page (no external assets, no script;
//! it reloads itself every [`page::REFRESH_SECS`] seconds) served on `GET /` of the metrics
//! listener ([`crate::metrics::serve`]) beside the Prometheus text of `GET /metrics`.
//!
//! [`Status`] is the shared state: the engine task ([`crate::net`]'s driver) updates it where it
//! updates [`Metrics`] — a client connected, was heard, enrolled or lost, a task with a rank grant
//! went out, a round committed or was evaluated, the engine changed phase — each update one short
//! `Mutex` section (a few map writes, never I/O, never a render). A page request copies the
//! [`StatusSnapshot`] out and renders it outside the lock with [`page::render`], a pure function
//! of the snapshot and the time. The rejection counts and byte totals come from [`Metrics`] (the
//! one place that counts them).
//!
//! The committed rounds start from the round log the server resumed with
//! ([`crate::store::Store::rounds`]): a restarted server shows the rounds of its earlier runs.

pub mod page;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use fedpool_common::wire::TargetBudget;
use fedpool_common::Round;

use crate::metrics::Metrics;
use crate::ranks::RankPolicy;
use crate::round::{Engine, EvalRecord, RoundRecord};

pub use page::render;

/// Characters of a client's software string kept (the rest is cut, with `…`).
pub const MAX_SOFTWARE_CHARS: usize = 80;

/// One committed round as the page shows it (from its [`RoundRecord`] and [`EvalRecord`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRow {
    /// The round.
    pub round: Round,
    /// The attempt that committed (1 = the first).
    pub attempt: u32,
    /// Clients whose updates were merged.
    pub clients: usize,
    /// Training examples behind them.
    pub examples: u64,
    /// Wire bytes of the round's updates.
    pub bytes_up: u64,
    /// Bytes of the round's task frames.
    pub bytes_down: u64,
    /// Seconds from the round's start to its commit.
    pub seconds: f64,
    /// The line was recovered after a crash: its numbers are unknown.
    pub recovered: bool,
    /// The federated evaluation of the round's global pool, once the clients reported.
    pub eval: Option<EvalRow>,
}

/// A round's federated evaluation, as the page shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalRow {
    /// Example-weighted accuracy of the global pool (None: no client reported).
    pub accuracy: Option<f64>,
    /// Example-weighted macro-F1.
    pub macro_f1: Option<f64>,
    /// Held-out examples behind the numbers.
    pub examples: u64,
    /// Bytes of the reports received.
    pub bytes_up: u64,
    /// Bytes of the evaluation tasks sent.
    pub bytes_down: u64,
    /// Seconds from the tasks to the last report (or the deadline).
    pub seconds: f64,
}

impl From<&EvalRecord> for EvalRow {
    fn from(e: &EvalRecord) -> Self {
        Self {
            accuracy: e.accuracy,
            macro_f1: e.macro_f1,
            examples: e.examples,
            bytes_up: e.bytes_up,
            bytes_down: e.bytes_down,
            seconds: e.seconds.max(0.0),
        }
    }
}

impl RoundRow {
    /// The row of a round log record (its evaluation included, if it has one).
    pub fn from_record(r: &RoundRecord) -> Self {
        Self {
            round: Round(r.round),
            attempt: r.attempt,
            clients: r.clients.len(),
            examples: r.examples,
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            seconds: (r.committed_at_secs - r.started_at_secs).max(0.0),
            recovered: r.recovered,
            eval: r.eval.as_ref().map(EvalRow::from),
        }
    }

    /// The global pool's federated accuracy, if the round was evaluated and a client reported.
    pub fn accuracy(&self) -> Option<f64> {
        self.eval.and_then(|e| e.accuracy).filter(|a| a.is_finite())
    }

    /// Bytes received for the round: its updates and its evaluation's reports (as
    /// `fedpool-server report` counts them).
    pub fn total_bytes_up(&self) -> u64 {
        self.bytes_up.saturating_add(self.eval.map_or(0, |e| e.bytes_up))
    }

    /// Bytes sent for the round: its tasks and its evaluation's tasks.
    pub fn total_bytes_down(&self) -> u64 {
        self.bytes_down.saturating_add(self.eval.map_or(0, |e| e.bytes_down))
    }

    /// Seconds of the round: training to the commit, then its evaluation.
    pub fn total_seconds(&self) -> f64 {
        self.seconds + self.eval.map_or(0.0, |e| e.seconds)
    }
}

/// The LoRA ranks a client's latest task granted.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// The task's round.
    pub round: Round,
    /// Rank per LoRA target, in the spec's order.
    pub ranks: Vec<(String, u32)>,
    /// The planner's upload estimate for the client when it granted them, bytes per second.
    pub upload_bps: Option<f64>,
}

/// What the page knows of one client (by certificate name).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientRow {
    /// It has an open, authenticated connection.
    pub connected: bool,
    /// The engine welcomed it (this run); a client refused at enrollment stays `false`.
    pub enrolled: bool,
    /// What its `Enroll` said it runs (client-supplied: cut to [`MAX_SOFTWARE_CHARS`], escaped
    /// on the page).
    pub software: Option<String>,
    /// When its last message arrived (or its connection opened).
    pub last_heard: Option<Instant>,
    /// The rank grant of its latest task, with rank budgets on.
    pub grant: Option<Grant>,
}

/// Everything the status page shows, copied out of [`Status`] for one render.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusSnapshot {
    /// When the server started.
    pub started: Instant,
    /// Rounds the federation trains in all.
    pub total_rounds: u64,
    /// Connected clients a round (or an evaluation) waits for.
    pub min_clients_to_start: usize,
    /// The newest committed round.
    pub committed: Round,
    /// The engine's phase in words ([`Engine::phase_name`]).
    pub phase: &'static str,
    /// The round being trained and its attempt, while training.
    pub running: Option<(Round, u32)>,
    /// The round being evaluated, while evaluating.
    pub evaluating: Option<Round>,
    /// The rank policy in words; `None`: rank budgets are off.
    pub rank_policy: Option<String>,
    /// Every client seen this run, by name.
    pub clients: BTreeMap<String, ClientRow>,
    /// Quarantined clients, each with the refusal that put it there.
    pub quarantined: BTreeMap<String, String>,
    /// Committed rounds, by round.
    pub rounds: BTreeMap<Round, RoundRow>,
    /// Refusals sent, by reason ([`Metrics`]).
    pub rejections: BTreeMap<String, u64>,
    /// Frame bytes received from clients ([`Metrics`]).
    pub bytes_in: u64,
    /// Frame bytes sent to clients ([`Metrics`]).
    pub bytes_out: u64,
}

impl StatusSnapshot {
    /// A federation of `total_rounds` rounds that has done nothing yet, started at `started`.
    pub fn new(started: Instant, total_rounds: u64) -> Self {
        Self {
            started,
            total_rounds,
            min_clients_to_start: 1,
            committed: Round(0),
            phase: "waiting to train",
            running: None,
            evaluating: None,
            rank_policy: None,
            clients: BTreeMap::new(),
            quarantined: BTreeMap::new(),
            rounds: BTreeMap::new(),
            rejections: BTreeMap::new(),
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// The round the phase is about: the one being trained or evaluated, the next one while
    /// waiting to train, the newest committed one otherwise.
    pub fn current_round(&self) -> Round {
        if let Some((round, _)) = self.running {
            return round;
        }
        if let Some(round) = self.evaluating {
            return round;
        }
        match self.phase {
            "waiting to train" => Round(self.committed.0 + 1),
            _ => self.committed,
        }
    }

    /// Clients with an open connection.
    pub fn connected(&self) -> usize {
        self.clients.values().filter(|c| c.connected).count()
    }

    /// Clients the engine welcomed this run.
    pub fn enrolled(&self) -> usize {
        self.clients.values().filter(|c| c.enrolled).count()
    }
}

/// The rank policy in words.
pub fn describe_policy(policy: &RankPolicy) -> String {
    match policy {
        RankPolicy::Fixed { rank } => format!("fixed rank {rank}"),
        RankPolicy::Classes { classes } => format!("{} classes by upload bandwidth", classes.len()),
        RankPolicy::Importance(s) => format!(
            "importance budgets (rank {} → {}, safety margin {:.2})",
            s.init_rank, s.target_rank, s.safety_margin
        ),
        RankPolicy::Knapsack(s) => {
            format!("knapsack budgets (rank {} → {}, safety margin {:.2})", s.init_rank, s.target_rank, s.safety_margin)
        }
    }
}

/// The rows of a round log for a server resuming after `committed`: one per round up to it, the
/// later line of a round logged twice (re-committed after a crash); lines of later rounds are
/// left out (those rounds run again).
pub fn rows_of_log(log: &[RoundRecord], committed: Round) -> BTreeMap<Round, RoundRow> {
    log.iter().filter(|r| r.round <= committed.0).map(|r| (Round(r.round), RoundRow::from_record(r))).collect()
}

/// A client-supplied software string cut to [`MAX_SOFTWARE_CHARS`], control characters dropped.
fn tidy_software(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(MAX_SOFTWARE_CHARS).collect();
    if s.chars().filter(|c| !c.is_control()).count() > MAX_SOFTWARE_CHARS {
        out.push('…');
    }
    out
}

/// The status page's shared state: updated by the engine task, read by page requests.
#[derive(Debug)]
pub struct Status {
    state: Mutex<StatusSnapshot>,
}

impl Status {
    /// The state of a server about to run `engine`, with the committed rounds of `log` (the round
    /// log the store resumed with; lines of rounds after the engine's newest commit are left out,
    /// as those rounds run again). `started` is the server's start.
    pub fn new(engine: &Engine, log: &[RoundRecord], started: Instant) -> Arc<Self> {
        let mut s = StatusSnapshot::new(started, engine.config().total_rounds);
        s.min_clients_to_start = engine.config().min_clients_to_start;
        s.rank_policy = engine.rank_planner().map(|p| describe_policy(p.policy()));
        s.rounds = rows_of_log(log, engine.round());
        let status = Self::from_snapshot(s);
        status.engine(engine);
        status
    }

    /// The state starting from `snapshot` (a test's, or a driver without an [`Engine`] at hand).
    pub fn from_snapshot(snapshot: StatusSnapshot) -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(snapshot) })
    }

    /// The state for one render, with the rejection counts and byte totals of `metrics`.
    pub fn snapshot(&self, metrics: &Metrics) -> StatusSnapshot {
        let mut s = self.lock().clone();
        s.rejections = metrics.rejections().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        s.bytes_in = metrics.bytes_in();
        s.bytes_out = metrics.bytes_out();
        s
    }

    /// The page as it stands now.
    pub fn page(&self, metrics: &Metrics) -> String {
        render(&self.snapshot(metrics), Instant::now())
    }

    fn lock(&self) -> MutexGuard<'_, StatusSnapshot> {
        // The state is plain data: a panic elsewhere while it was held leaves nothing half-done
        // that a page could not show.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's phase, rounds and quarantined clients after it handled events.
    pub fn engine(&self, engine: &Engine) {
        let mut s = self.lock();
        s.phase = engine.phase_name();
        s.committed = engine.round();
        s.running = engine.running();
        s.evaluating = engine.evaluating();
        let quarantined = engine.quarantined();
        // Copied only when it changed (it only grows).
        if quarantined.len() != s.quarantined.len() {
            s.quarantined = quarantined.clone();
        }
    }

    /// `client` opened an authenticated connection at `at`.
    pub fn connected(&self, client: &str, at: Instant) {
        let mut s = self.lock();
        let row = s.clients.entry(client.to_string()).or_default();
        row.connected = true;
        row.last_heard = Some(at);
    }

    /// A message of `client` arrived at `at`.
    pub fn heard(&self, client: &str, at: Instant) {
        if let Some(row) = self.lock().clients.get_mut(client) {
            row.last_heard = Some(row.last_heard.map_or(at, |t| t.max(at)));
        }
    }

    /// `client` says it runs `software` (its `Enroll`).
    pub fn software(&self, client: &str, software: &str) {
        if let Some(row) = self.lock().clients.get_mut(client) {
            row.software = Some(tidy_software(software));
        }
    }

    /// The engine welcomed `client`.
    pub fn enrolled(&self, client: &str) {
        self.lock().clients.entry(client.to_string()).or_default().enrolled = true;
    }

    /// `client`'s connection ended (closed, lost or dropped).
    pub fn disconnected(&self, client: &str) {
        if let Some(row) = self.lock().clients.get_mut(client) {
            row.connected = false;
        }
    }

    /// Every connection is being closed.
    pub fn all_disconnected(&self) {
        for row in self.lock().clients.values_mut() {
            row.connected = false;
        }
    }

    /// `client`'s task for `round` grants `budget` (nothing for an empty one: no budget), with the
    /// planner's upload estimate `upload_bps`.
    pub fn granted(&self, client: &str, round: Round, budget: &[TargetBudget], upload_bps: Option<f64>) {
        if budget.is_empty() {
            return;
        }
        let ranks = budget.iter().map(|b| (b.target.clone(), b.rank)).collect();
        self.lock().clients.entry(client.to_string()).or_default().grant = Some(Grant { round, ranks, upload_bps });
    }

    /// A round committed (it is on disk).
    pub fn committed(&self, record: &RoundRecord) {
        let row = RoundRow::from_record(record);
        let mut s = self.lock();
        s.committed = s.committed.max(row.round);
        s.rounds.insert(row.round, row);
    }

    /// A committed round's federated evaluation was logged.
    pub fn evaluated(&self, round: Round, eval: &EvalRecord) {
        if let Some(row) = self.lock().rounds.get_mut(&round) {
            // A later evaluation of the same round replaces the earlier (as the log reads).
            row.eval = Some(EvalRow::from(eval));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u64, bytes_up: u64, eval: Option<EvalRecord>) -> RoundRecord {
        RoundRecord {
            round,
            attempt: 1,
            clients: vec!["a".into(), "b".into()],
            examples: 20,
            bytes_up,
            bytes_down: 4_000,
            rejected: BTreeMap::new(),
            stragglers: Vec::new(),
            train_loss: None,
            train_accuracy: None,
            started_at_secs: 10.0,
            committed_at_secs: 12.5,
            recovered: false,
            median_update_norm: None,
            eval,
        }
    }

    fn eval(accuracy: f64) -> EvalRecord {
        EvalRecord {
            accuracy: Some(accuracy),
            macro_f1: Some(0.5),
            loss: Some(0.4),
            examples: 64,
            clients: vec!["a".into(), "b".into()],
            missing: Vec::new(),
            bytes_down: 4_000,
            bytes_up: 100,
            seconds: 1.5,
        }
    }

    #[test]
    fn a_resumed_server_shows_the_logged_rounds_up_to_its_checkpoint() {
        // Round 2 was committed twice (a crash after its first line), round 3's line is newer than
        // the checkpoint the server resumes from (round 2): it runs again.
        let log = [
            record(1, 1_000, Some(eval(0.6))),
            record(2, 1_000, None),
            record(2, 2_000, Some(eval(0.7))),
            record(3, 1_000, None),
        ];
        let rows = rows_of_log(&log, Round(2));
        assert_eq!(rows.keys().copied().collect::<Vec<_>>(), [Round(1), Round(2)]);
        assert_eq!(rows[&Round(2)].bytes_up, 2_000, "the later line of round 2");
        assert_eq!(rows[&Round(2)].accuracy(), Some(0.7));
        assert_eq!(rows[&Round(1)].total_bytes_up(), 1_100, "with the evaluation's bytes");
        assert_eq!(rows[&Round(1)].total_seconds(), 4.0);
    }

    #[test]
    fn commits_evaluations_and_grants_reach_the_snapshot() {
        let status = Status::from_snapshot(StatusSnapshot::new(Instant::now(), 3));
        let metrics = Metrics::new();
        let at = Instant::now();
        status.connected("a", at);
        status.software("a", "fedpool-client <0.1>");
        status.enrolled("a");
        status.heard("a", at + std::time::Duration::from_secs(2));
        status.heard("a", at + std::time::Duration::from_secs(1));
        status.granted("a", Round(1), &[], None);
        assert_eq!(status.snapshot(&metrics).clients["a"].grant, None, "an empty budget is no grant");
        let budget = [TargetBudget { target: "q".into(), rank: 2 }];
        status.granted("a", Round(1), &budget, Some(1e3));
        status.committed(&record(1, 500, None));
        status.evaluated(Round(1), &eval(0.5));
        status.evaluated(Round(1), &eval(0.55));
        status.evaluated(Round(9), &eval(0.9));
        metrics.count_reject(fedpool_common::wire::RejectReason::Late);
        let s = status.snapshot(&metrics);
        let a = &s.clients["a"];
        assert!(a.connected && a.enrolled);
        assert_eq!(a.software.as_deref(), Some("fedpool-client <0.1>"));
        assert_eq!(a.last_heard, Some(at + std::time::Duration::from_secs(2)), "the latest message counts");
        assert_eq!(a.grant.as_ref().map(|g| (g.round, g.ranks.clone())), Some((Round(1), vec![("q".to_string(), 2)])));
        assert_eq!(s.committed, Round(1));
        assert_eq!(s.rounds.len(), 1, "an evaluation of an unknown round adds nothing");
        assert_eq!(s.rounds[&Round(1)].accuracy(), Some(0.55), "a later evaluation replaces the earlier");
        assert_eq!(s.rounds[&Round(1)].total_bytes_up(), 600, "its bytes counted once");
        assert_eq!(s.rejections, BTreeMap::from([("late".to_string(), 1)]));
        status.disconnected("a");
        assert!(!status.snapshot(&metrics).clients["a"].connected);
    }

    #[test]
    fn a_long_software_string_is_cut_and_loses_its_control_characters() {
        assert_eq!(tidy_software("fedpool-client 0.1.0"), "fedpool-client 0.1.0");
        assert_eq!(tidy_software("a\u{1b}[31mb\n"), "a[31mb");
        let long = "x".repeat(200);
        let cut = tidy_software(&long);
        assert_eq!(cut.chars().count(), MAX_SOFTWARE_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_current_round_is_the_one_trained_evaluated_or_next() {
        let mut s = StatusSnapshot::new(Instant::now(), 5);
        s.committed = Round(2);
        assert_eq!(s.current_round(), Round(3), "waiting to train round 3");
        s.phase = "training";
        s.running = Some((Round(3), 2));
        assert_eq!(s.current_round(), Round(3));
        s.phase = "evaluating";
        s.running = None;
        s.evaluating = Some(Round(2));
        assert_eq!(s.current_round(), Round(2));
        s.phase = "finished";
        s.evaluating = None;
        assert_eq!(s.current_round(), Round(2));
    }
}
