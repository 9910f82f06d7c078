//! The simulation driver: the server's round engine ([`fedpool_server::round::Engine`]) and
//! aggregator, run on a virtual clock, with virtual clients that train with the client's own
//! trainer (in lockstep over the shared backbone, or one after another) and encode with the
//! client's codec. Nothing of the engine, the merge, the codec or the model is re-implemented:
//! the driver only moves messages and advances the clock (docs/design.md, principle 2).
//!
//! **Time.** Every client enrolls at time zero. When the engine sends a round's tasks at time
//! `t`, the selected clients train at once (wall clock) and each client's update is delivered to
//! the engine at `t + download + compute + upload` ([`NetworkModel::round_time`]): the task's and
//! the update's real frame sizes over the client's drawn bandwidth, and `local_steps × batch ×
//! seconds_per_sample / speed` of compute. The engine's timers (the round deadline) fire in
//! between, exactly as in a deployment: an update that arrives after the deadline is refused as
//! late and its client listed as a straggler. A selected client that is unavailable in that round
//! or drops out never answers. Federated evaluation (each client scores the committed global pool
//! on its held-out examples) takes no simulated time and its bytes are not counted in
//! `rounds.csv`: it is the researcher's measurement, not part of the training cost. So is the
//! centralised evaluation on the experiment's global test set (`global_test`): each committed
//! pool, as the server holds it, scored with the clients' own `evaluate_pool` into the round's
//! `global_*` metrics.
//!
//! **Error feedback** works as in the daemon: a client's residual is replaced by the one its
//! update left only when the engine acknowledges the update. Residuals live on disk between
//! rounds ([`Spill`]): in memory they were most of a many-client run's footprint.
//!
//! **Rank budgets** (`[budget]`): the engine's planner sees what a server would — each client's
//! declared bandwidth at enrollment, each upload's bytes and seconds (an `Event::Throughput` when
//! the update arrives) and the compute seconds the client reports (its simulated compute) — and a
//! client uploads only the triplets its task granted.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fedpool_client::train::EvalMetrics;
use fedpool_common::adapter::AdapterPool;
use fedpool_common::codec::{CodecSettings, DecodeLimits};
use fedpool_common::frame::{self, HEADER_LEN};
use fedpool_common::wire::{EvalTask, RoundTask};
use fedpool_common::Round;
use fedpool_server::round::{Action, ClientId, Engine, EngineConfig, Event, RoundRecord, Time, TrustConfig};

use crate::clients::{compute_at_unit_speed, Answer, ClientSide, LocalClients, Trained, Work};
use crate::error::SimError;
use crate::experiment::Experiment;
use crate::network::NetworkModel;
use crate::population::Population;
use crate::report::{RoundRow, Summary};
use crate::spill::{ParkedUpload, Spill};

/// Told about a run's progress (the binary draws a progress bar; tests stay quiet).
pub trait Progress {
    /// Round `round` is now doing `what` (training, evaluating).
    fn phase(&mut self, _round: u64, _what: &str) {}
    /// Round `row.round` is complete (committed and evaluated).
    fn round_done(&mut self, _row: &RoundRow) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {}

/// What a simulation produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// One row per committed round (`rounds.csv`).
    pub rows: Vec<RoundRow>,
    /// The engine's record of every round (`rounds.jsonl` of a server), evaluation included.
    pub records: Vec<RoundRecord>,
    /// The run in one object (`summary.json`).
    pub summary: Summary,
    /// The global pool after the last round.
    pub global: AdapterPool,
    /// Training examples processed by all clients together (each step's rows).
    pub trained_samples: u64,
    /// Wall-clock seconds spent in local training (lockstep or sequential), all rounds.
    pub train_wall_seconds: f64,
    /// Each client's error-feedback residual at the end (L2 norm): what its acknowledged uploads
    /// left out and later ones have not carried yet; 0 for a client never acknowledged, or with
    /// a lossless upload codec.
    pub residual_norms: Vec<f64>,
}

/// Runs the experiment on the population, every client in this process: every round of the
/// engine, to the end.
pub fn run(exp: &Experiment, pop: &Population, progress: &mut dyn Progress) -> Result<RunOutput, SimError> {
    let mut clients = LocalClients::new(exp, pop, None)?;
    run_with(exp, &mut clients, progress)
}

/// Runs the experiment with its clients wherever `clients` keeps them (this process, or
/// distributed workers): the same engine, clock and network model, so the same rounds.
pub fn run_with(
    exp: &Experiment,
    clients: &mut dyn ClientSide,
    progress: &mut dyn Progress,
) -> Result<RunOutput, SimError> {
    let mut sim = Sim::new(exp, clients, progress)?;
    sim.run()?;
    let residual_norms = sim.clients.residual_norms()?;
    let stats = sim.clients.stats();
    let missed = sim.records.iter().map(|r| r.stragglers.len() as u64).sum();
    let examples = sim.records.last().and_then(|r| r.eval.as_ref()).map_or(0, |e| e.examples);
    let summary = Summary::from_rows(&exp.name, &sim.rows, examples, missed);
    Ok(RunOutput {
        rows: sim.rows,
        records: sim.records,
        summary,
        global: sim.engine.global().clone(),
        trained_samples: stats.samples,
        train_wall_seconds: stats.wall_seconds,
        residual_norms,
    })
}

/// Ticks in a row at one instant before the driver calls the engine stuck.
const MAX_TICKS_AT_ONE_TIME: u32 = 1000;

struct Sim<'a> {
    exp: &'a Experiment,
    clients: &'a mut dyn ClientSide,
    progress: &'a mut dyn Progress,
    engine: Engine,
    network: NetworkModel,
    /// Events due, by (time, order). The order of a round's uploads is their clients' place in
    /// the round's work list, whatever order the clients finished in.
    queue: BTreeMap<(Time, u64), Queued>,
    seq: u64,
    index: HashMap<String, usize>,
    /// Updates in flight, on disk.
    spill: Spill,
    /// Committed rounds waiting for their federated evaluation, with their global test score.
    committed: BTreeMap<u64, (RoundRecord, Option<EvalMetrics>)>,
    round_started: HashMap<u64, Instant>,
    rows: Vec<RoundRow>,
    records: Vec<RoundRecord>,
    finished: bool,
}

impl<'a> Sim<'a> {
    fn new(
        exp: &'a Experiment,
        clients: &'a mut dyn ClientSide,
        progress: &'a mut dyn Progress,
    ) -> Result<Self, SimError> {
        let info = clients.info().clone();
        let spec = info.spec.clone();
        let aggregate = exp.aggregate.to_config()?;
        let merge = exp.budget.merge(&spec, aggregate)?;
        let planner = exp.budget.planner(&spec, exp.deadline(), exp.federation.rounds)?;
        // Heartbeats and idle timeouts are a live connection's business: virtual clients stay.
        let forever = Duration::from_secs(u64::from(u32::MAX));
        let codec =
            |table, settings: &CodecSettings| settings.to_codec().map_err(|source| SimError::Codec { table, source });
        let config = EngineConfig {
            total_rounds: exp.federation.rounds,
            clients_per_round: exp.clients_per_round(),
            quorum: exp.quorum(),
            over_selection: exp.federation.over_selection,
            min_clients_to_start: exp.clients,
            deadline: exp.deadline(),
            local_steps: exp.federation.local_steps,
            seed: exp.seed,
            download_codec: codec("download_codec", &exp.download_codec)?,
            decode_limits: DecodeLimits::for_spec(&spec),
            backbone: info.fingerprint,
            heartbeat: forever / 2,
            idle_timeout: forever,
            eval_deadline: Some(exp.deadline()),
            // The server's update bounds; weights as the clients hold (every virtual client is known).
            trust: TrustConfig {
                norm_bound: exp.aggregate.norm_bound()?,
                max_abs_value: exp.aggregate.max_abs_value,
                ..TrustConfig::default()
            },
        };
        let global = AdapterPool::init(&spec, exp.seed)?;
        let mut engine = Engine::new(config, spec.clone(), merge, Round(0), global)?;
        if let Some(planner) = planner {
            engine = engine.with_ranks(planner);
        }
        let network = NetworkModel::new(&exp.network, info.names.len(), &exp.base_dir)?;
        let spill = Spill::new_in(&std::env::temp_dir(), spec.hash()).map_err(SimError::Scratch)?;
        Ok(Sim {
            exp,
            clients,
            progress,
            engine,
            network,
            queue: BTreeMap::new(),
            seq: 0,
            index: info.names.iter().enumerate().map(|(i, name)| (name.clone(), i)).collect(),
            spill,
            committed: BTreeMap::new(),
            round_started: HashMap::new(),
            rows: Vec::new(),
            records: Vec::new(),
            finished: false,
        })
    }

    fn push(&mut self, at: Time, event: Event) {
        self.enqueue(at, Queued::Event(event));
    }

    fn enqueue(&mut self, at: Time, item: Queued) {
        self.queue.insert((at, self.seq), item);
        self.seq += 1;
    }

    fn name(&self, c: usize) -> ClientId {
        ClientId(self.clients.info().names[c].clone())
    }

    fn run(&mut self) -> Result<(), SimError> {
        let mut now = Time::ZERO;
        for (c, enroll) in self.clients.enroll()? {
            let actions = self.engine.handle(now, Event::Enroll { client: self.name(c), enroll });
            self.apply(now, actions)?;
        }
        let mut ticks_at_now = 0u32;
        while !self.finished {
            let due = self.queue.keys().next().map(|k| k.0);
            let (at, event) = match (due, self.engine.next_wakeup()) {
                (Some(d), Some(w)) if w < d => (w, Event::Tick),
                (Some(_), _) => match self.queue.pop_first() {
                    Some(((at, _), Queued::Event(event))) => (at, event),
                    Some(((at, _), Queued::Upload { client, parked, wire_bytes })) => {
                        let update = self.spill.take_upload(&parked)?;
                        (at, Event::Update { client, update, wire_bytes })
                    }
                    None => unreachable!("the queue held an event a moment ago"),
                },
                (None, Some(w)) => (w, Event::Tick),
                (None, None) => return Err(self.stalled(now)),
            };
            ticks_at_now = if at <= now && event == Event::Tick { ticks_at_now + 1 } else { 0 };
            if ticks_at_now > MAX_TICKS_AT_ONE_TIME {
                return Err(self.stalled(now));
            }
            now = now.max(at);
            let actions = self.engine.handle(now, event);
            self.apply(now, actions)?;
        }
        Ok(())
    }

    fn stalled(&self, now: Time) -> SimError {
        SimError::Stalled { seconds: now.as_secs_f64(), round: self.engine.round().0 }
    }

    /// Carries out the engine's actions at `now`; tasks train and evaluation tasks are scored
    /// after the whole batch of actions has been seen, so the clients of one round train together.
    fn apply(&mut self, now: Time, actions: Vec<Action>) -> Result<(), SimError> {
        let mut tasks = Vec::new();
        let mut evals = Vec::new();
        for action in actions {
            match action {
                Action::Welcome { .. } => {}
                Action::SendTask { client, task } => tasks.push((client, task)),
                Action::SendEval { client, task } => evals.push((client, task)),
                Action::Ack { client, ack } => {
                    let c = self.client_index(&client)?;
                    self.clients.answer(c, Answer::Ack(ack.task_id))?;
                }
                Action::Reject { client, reject } => {
                    let c = self.client_index(&client)?;
                    self.clients.answer(c, Answer::Reject(reject.task_id))?;
                    tracing::debug!(%client, reason = ?reject.reason, "{}", reject.detail);
                }
                Action::Drop { client, reason } => tracing::warn!(%client, "dropped by the engine: {reason}"),
                Action::Commit(commit) => {
                    tracing::debug!(round = commit.round.0, clients = commit.record.clients.len(), "committed");
                    let global = self.evaluate_global(commit.round, &commit.pool)?;
                    self.committed.insert(commit.round.0, (commit.record, global));
                }
                Action::RecordEval { round, eval } => {
                    let (mut record, global) =
                        self.committed.remove(&round.0).ok_or(SimError::UncommittedEval(round.0))?;
                    let wall = self.round_started.remove(&round.0).map_or(0.0, |t| t.elapsed().as_secs_f64());
                    let row = RoundRow {
                        round: round.0,
                        accuracy: eval.accuracy,
                        macro_f1: eval.macro_f1,
                        loss: eval.loss,
                        bytes_up: record.bytes_up,
                        bytes_down: record.bytes_down,
                        sim_seconds: record.committed_at_secs,
                        wall_seconds: wall,
                        global_accuracy: global.as_ref().map(|m| m.accuracy),
                        global_macro_f1: global.as_ref().map(|m| m.macro_f1),
                        global_loss: global.as_ref().map(|m| m.loss),
                    };
                    record.eval = Some(eval);
                    self.progress.round_done(&row);
                    self.rows.push(row);
                    self.records.push(record);
                }
                Action::Finished => self.finished = true,
                Action::Fatal(e) => return Err(SimError::Engine(e)),
            }
        }
        if !tasks.is_empty() {
            self.train(now, tasks)?;
        }
        if !evals.is_empty() {
            self.evaluate(now, evals)?;
        }
        Ok(())
    }

    fn client_index(&self, client: &ClientId) -> Result<usize, SimError> {
        self.index.get(&client.0).copied().ok_or_else(|| SimError::UnknownClient(client.0.clone()))
    }

    /// Trains the clients that got a task at `now` and schedules their updates' arrivals.
    fn train(&mut self, now: Time, tasks: Vec<(ClientId, Box<RoundTask>)>) -> Result<(), SimError> {
        let round = tasks[0].1.round;
        self.round_started.entry(round.0).or_insert_with(Instant::now);
        let mut work = Vec::new();
        for (client, task) in tasks {
            let c = self.client_index(&client)?;
            if self.network.available(round.0, c) && !self.network.drops_out(round.0, c) {
                work.push(Work { client: c, task });
            } else {
                tracing::debug!(%client, round = round.0, "unavailable or dropped out: no answer");
            }
        }
        if work.is_empty() {
            return Ok(());
        }
        self.progress.phase(round.0, &format!("training {} clients", work.len()));
        // Two places in the queue per work item (its throughput sample, then its upload), in
        // work order: the engine sees arrivals at one instant in the same order however the
        // clients were trained.
        let first = self.seq;
        self.seq += 2 * work.len() as u64;
        let names = self.clients.info().names.clone();
        let (exp, network, spill, queue) = (self.exp, &self.network, &self.spill, &mut self.queue);
        let mut arrived = |i: usize, trained: Trained| -> Result<(), SimError> {
            let Work { client: c, task } = &work[i];
            let client = ClientId(names[*c].clone());
            let wire_bytes = frame_len(&trained.update)?;
            let task_bytes = frame_len(task.as_ref())?;
            let compute = compute_at_unit_speed(exp, trained.samples);
            let arrives = now + network.round_time(*c, task_bytes, compute, wire_bytes);
            // The server times the upload, as the QUIC server does (bandwidth estimates).
            let upload = network.upload_time(*c, wire_bytes).as_secs_f64();
            let order = first + 2 * i as u64;
            queue.insert(
                (arrives, order),
                Queued::Event(Event::Throughput { client: client.clone(), bytes: wire_bytes, seconds: upload }),
            );
            let parked = spill.park_upload(*c, &trained.update)?;
            queue.insert((arrives, order + 1), Queued::Upload { client, parked, wire_bytes });
            Ok(())
        };
        self.clients.train(&work, &mut arrived)
    }

    /// Scores the global pool of each evaluation task on its client's held-out examples; the
    /// reports arrive at `now`.
    fn evaluate(&mut self, now: Time, evals: Vec<(ClientId, Box<EvalTask>)>) -> Result<(), SimError> {
        let round = evals[0].1.round;
        self.progress.phase(round.0, &format!("evaluating on {} clients", evals.len()));
        let mut indexed = Vec::with_capacity(evals.len());
        for (client, task) in evals {
            indexed.push((self.client_index(&client)?, task));
        }
        let reports = self.clients.evaluate(&indexed)?;
        for ((c, _), report) in indexed.iter().zip(reports) {
            let Some(report) = report else { continue };
            let wire_bytes = frame_len(&report)?;
            self.push(now, Event::EvalReport { client: self.name(*c), report, wire_bytes });
        }
        Ok(())
    }

    /// Scores a committed global pool, exactly as the server holds it, on the population's global
    /// test set (Flower's centralised evaluation) with the function, settings and query cache the
    /// clients evaluate with; `None` without a global test set. No simulated time, no bytes.
    fn evaluate_global(&mut self, round: Round, pool: &AdapterPool) -> Result<Option<EvalMetrics>, SimError> {
        if self.exp.global_test.is_none() {
            return Ok(None);
        }
        self.progress.phase(round.0, "evaluating on the global test set");
        self.clients.evaluate_global(pool)
    }
}

/// Something due at a simulated time.
enum Queued {
    /// An event for the engine.
    Event(Event),
    /// An update in flight, waiting on disk ([`Spill::park_upload`]) until it arrives.
    Upload { client: ClientId, parked: ParkedUpload, wire_bytes: u64 },
}

/// Bytes a message takes on the wire: frame header + body.
fn frame_len<T: serde::Serialize + ?Sized>(message: &T) -> Result<u64, SimError> {
    Ok((frame::encoded_len(message)? + HEADER_LEN) as u64)
}
