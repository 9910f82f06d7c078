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

use fedpool_client::learner::Learner;
use fedpool_client::participant::{LocalResult, Participant, ParticipantConfig};
use fedpool_client::train::{EvalMetrics, QueryCache, TrainConfig, TrainError};
use fedpool_common::adapter::{AdapterKind, AdapterPool, PoolDelta};
use fedpool_common::codec::{CodecSettings, DecodeLimits, EncodedDelta};
use fedpool_common::frame::{self, HEADER_LEN};
use fedpool_common::wire::{EvalTask, RoundTask, TrainMetrics, TripletImportance, Update};
use fedpool_common::Round;
use fedpool_server::round::{Action, ClientId, Engine, EngineConfig, Event, RoundRecord, Time, TrustConfig};

use crate::error::SimError;
use crate::experiment::{Experiment, Mode};
use crate::network::NetworkModel;
use crate::population::Population;
use crate::report::{RoundRow, Summary};
use crate::spill::{ParkedUpload, Spill};
use crate::tenancy::{self, VirtualClient};

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

/// Runs the experiment on the population: every round of the engine, to the end.
pub fn run(exp: &Experiment, pop: &Population, progress: &mut dyn Progress) -> Result<RunOutput, SimError> {
    let mut sim = Sim::new(exp, pop, progress)?;
    sim.run()?;
    let residual_norms =
        sim.participants.iter_mut().map(|p| p.residual().map(|r| r.l2_norm())).collect::<Result<_, _>>()?;
    let missed = sim.records.iter().map(|r| r.stragglers.len() as u64).sum();
    let examples = sim.records.last().and_then(|r| r.eval.as_ref()).map_or(0, |e| e.examples);
    let summary = Summary::from_rows(&exp.name, &sim.rows, examples, missed);
    Ok(RunOutput {
        rows: sim.rows,
        records: sim.records,
        summary,
        global: sim.engine.global().clone(),
        trained_samples: sim.trained_samples,
        train_wall_seconds: sim.train_wall_seconds,
        residual_norms,
    })
}

/// Ticks in a row at one instant before the driver calls the engine stuck.
const MAX_TICKS_AT_ONE_TIME: u32 = 1000;

struct Sim<'a> {
    exp: &'a Experiment,
    pop: &'a Population,
    progress: &'a mut dyn Progress,
    engine: Engine,
    network: NetworkModel,
    /// Events due, by (time, arrival order).
    queue: BTreeMap<(Time, u64), Queued>,
    seq: u64,
    index: HashMap<String, usize>,
    /// Each client's protocol state (its residuals on disk, in `spill`).
    participants: Vec<Participant>,
    /// Updates in flight (and the participants' residuals), on disk.
    spill: Spill,
    queries: QueryCache,
    train_config: TrainConfig,
    /// Committed rounds waiting for their federated evaluation, with their global test score.
    committed: BTreeMap<u64, (RoundRecord, Option<EvalMetrics>)>,
    round_started: HashMap<u64, Instant>,
    rows: Vec<RoundRow>,
    records: Vec<RoundRecord>,
    finished: bool,
    trained_samples: u64,
    train_wall_seconds: f64,
}

impl<'a> Sim<'a> {
    fn new(exp: &'a Experiment, pop: &'a Population, progress: &'a mut dyn Progress) -> Result<Self, SimError> {
        let spec = pop.spec.clone();
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
            backbone: pop.fingerprint,
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
        let mut engine = Engine::new(config, spec, merge, Round(0), global)?;
        if let Some(planner) = planner {
            engine = engine.with_ranks(planner);
        }
        let network = NetworkModel::new(&exp.network, pop.clients.len(), &exp.base_dir)?;
        let train_config = exp.train_config()?;
        let upload_codec = codec("upload_codec", &exp.upload_codec)?;
        let spill = Spill::new_in(&std::env::temp_dir(), pop.spec.hash()).map_err(SimError::Scratch)?;
        let participants = (0..pop.clients.len())
            .map(|c| {
                let link = network.link(c);
                let config = ParticipantConfig {
                    spec: pop.spec.clone(),
                    backbone: pop.fingerprint,
                    examples: pop.clients[c].train.len() as u64,
                    // Each client's own seed, as each institution sets its own in client.toml.
                    seed: exp.seed.wrapping_add(c as u64),
                    train: train_config.clone(),
                    lora_variant: exp.train.lora_variant,
                    codec: upload_codec,
                    declared_upload_bps: Some(link.upload_bps as u64),
                    declared_download_bps: Some(link.download_bps as u64),
                    software: format!("fedpool-sim {}", env!("CARGO_PKG_VERSION")),
                };
                Participant::new(config, Box::new(spill.residuals(c)))
            })
            .collect();
        Ok(Sim {
            exp,
            pop,
            progress,
            engine,
            network,
            queue: BTreeMap::new(),
            seq: 0,
            index: pop.clients.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect(),
            participants,
            spill,
            queries: QueryCache::new(pop.learner.hidden_size()),
            train_config,
            committed: BTreeMap::new(),
            round_started: HashMap::new(),
            rows: Vec::new(),
            records: Vec::new(),
            finished: false,
            trained_samples: 0,
            train_wall_seconds: 0.0,
        })
    }

    fn push(&mut self, at: Time, event: Event) {
        self.enqueue(at, Queued::Event(event));
    }

    fn enqueue(&mut self, at: Time, item: Queued) {
        self.queue.insert((at, self.seq), item);
        self.seq += 1;
    }

    fn run(&mut self) -> Result<(), SimError> {
        let mut now = Time::ZERO;
        for c in 0..self.pop.clients.len() {
            let enroll = self.participants[c].enroll();
            let client = ClientId(self.pop.clients[c].name.clone());
            let actions = self.engine.handle(now, Event::Enroll { client, enroll });
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
                    self.participants[c].on_ack(ack.task_id)?;
                }
                Action::Reject { client, reject } => {
                    let c = self.client_index(&client)?;
                    self.participants[c].on_reject(reject.task_id)?;
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

    /// The pools of the tasks' globals, decoded by their clients' participants once per distinct
    /// encoding (every task of one send carries the same pool: memory holds one copy), and the
    /// index of each task's pool.
    fn decode_globals<'t>(
        &self,
        tasks: impl Iterator<Item = (usize, Round, &'t EncodedDelta)>,
    ) -> Result<(Vec<AdapterPool>, Vec<usize>), SimError> {
        let mut seen: Vec<(&EncodedDelta, AdapterPool)> = Vec::new();
        let mut index = Vec::new();
        for (c, round, global) in tasks {
            let i = match seen.iter().position(|(g, _)| *g == global) {
                Some(i) => i,
                None => {
                    seen.push((global, self.participants[c].decode_global(round, global)?));
                    seen.len() - 1
                }
            };
            index.push(i);
        }
        Ok((seen.into_iter().map(|(_, p)| p).collect(), index))
    }

    /// Gives each of `clients` (in the order of `pool_of`) its own copy of its pool where its
    /// participant keeps personal tensors (FedSA-LoRA's B), as `Participant::begin` does.
    fn personalise(
        &mut self,
        clients: impl Iterator<Item = usize>,
        pools: &mut Vec<AdapterPool>,
        pool_of: &mut [usize],
    ) -> Result<(), SimError> {
        for (c, index) in clients.zip(pool_of.iter_mut()) {
            if let Some(own) = self.participants[c].personalise(&pools[*index])? {
                pools.push(own);
                *index = pools.len() - 1;
            }
        }
        Ok(())
    }

    fn lockstep_applies(&self) -> bool {
        let spec = &self.pop.spec;
        let pool = spec.kind == AdapterKind::SsfPool && spec.has_keys() && spec.pool_size >= 2;
        // Decoders train one client at a time (no per-row adapters in the decoder yet).
        let encoder = matches!(self.pop.learner, Learner::Encoder(_));
        encoder && self.exp.mode == Mode::Lockstep && !self.train_config.head_only && (pool || spec.kind.is_lora())
    }

    /// Trains the clients that got a task at `now` and schedules their updates' arrivals.
    fn train(&mut self, now: Time, tasks: Vec<(ClientId, Box<RoundTask>)>) -> Result<(), SimError> {
        let round = tasks[0].1.round;
        self.round_started.entry(round.0).or_insert_with(Instant::now);
        let mut work: Vec<(usize, ClientId, Box<RoundTask>)> = Vec::new();
        for (client, task) in tasks {
            let c = self.client_index(&client)?;
            if self.network.available(round.0, c) && !self.network.drops_out(round.0, c) {
                work.push((c, client, task));
            } else {
                tracing::debug!(%client, round = round.0, "unavailable or dropped out: no answer");
            }
        }
        if work.is_empty() {
            return Ok(());
        }
        let lockstep = self.lockstep_applies();
        let mode = if lockstep { "lockstep" } else { "sequential" };
        self.progress.phase(round.0, &format!("training {} clients ({mode})", work.len()));

        let (mut starts, mut start_of) = self.decode_globals(work.iter().map(|(c, _, t)| (*c, t.round, &t.global)))?;
        self.personalise(work.iter().map(|(c, _, _)| *c), &mut starts, &mut start_of)?;
        let configs: Vec<TrainConfig> =
            work.iter().map(|(c, _, task)| self.participants[*c].round_config(task)).collect();

        // Clients train in groups: each group's batches fit one pass (lockstep), or one client at
        // a time (sequential). A group runs all its steps, then its updates are encoded and its
        // adapters and optimizer state freed, so memory holds one group, not every client.
        // Default on a CPU: one client per pass (1 row fits no batch but the client's own).
        let default_rows = if self.pop.learner.device().is_cpu() { 1 } else { crate::experiment::GPU_ROWS_PER_PASS };
        let max_rows = if lockstep { self.exp.max_rows_per_pass.unwrap_or(default_rows) } else { 0 };
        let batches: Vec<usize> = configs.iter().map(|c| c.batch_size).collect();
        for group in tenancy::client_groups(&batches, max_rows) {
            let (begin, end) = (group.start, group.end);
            let t = Instant::now();
            let results = self.train_group(&work[begin..end], &configs[begin..end], &start_of[begin..end], &starts)?;
            let seconds = t.elapsed().as_secs_f64();
            self.train_wall_seconds += seconds;
            for ((c, client, task), trained) in work[begin..end].iter().zip(results) {
                let compute = Duration::from_secs_f64(trained.samples as f64 * self.exp.federation.seconds_per_sample);
                // The client reports its compute time in the simulated world.
                let compute_at_speed = self.network.compute_time(*c, compute);
                let update = self.encode(*c, task, trained, compute_at_speed.as_secs_f64())?;
                let wire_bytes = frame_len(&update)?;
                let task_bytes = frame_len(task.as_ref())?;
                let arrives = now + self.network.round_time(*c, task_bytes, compute, wire_bytes);
                // The server times the upload, as the QUIC server does (bandwidth estimates).
                let upload = self.network.upload_time(*c, wire_bytes).as_secs_f64();
                self.push(arrives, Event::Throughput { client: client.clone(), bytes: wire_bytes, seconds: upload });
                let parked = self.spill.park_upload(*c, &update)?;
                self.enqueue(arrives, Queued::Upload { client: client.clone(), parked, wire_bytes });
            }
        }
        Ok(())
    }

    /// Trains one group of clients: in lockstep, or the one client of a sequential group with the
    /// client's own trainer.
    fn train_group(
        &mut self,
        work: &[(usize, ClientId, Box<RoundTask>)],
        configs: &[TrainConfig],
        start_of: &[usize],
        starts: &[AdapterPool],
    ) -> Result<Vec<Trained>, SimError> {
        let pop = self.pop;
        if let (true, Learner::Encoder(backbone)) = (self.lockstep_applies(), &pop.learner) {
            let clients: Vec<VirtualClient<'_>> = work
                .iter()
                .zip(configs)
                .zip(start_of)
                .map(|(((c, _, _), config), &s)| {
                    Ok(VirtualClient {
                        key: *c as u64,
                        train: pop.clients[*c].train.encoded()?,
                        start: &starts[s],
                        config: config.clone(),
                    })
                })
                .collect::<Result<_, TrainError>>()?;
            let outcomes =
                tenancy::train_lockstep(&backbone.model, &pop.spec, &clients, &mut self.queries, backbone.pad_id)?;
            return Ok(outcomes
                .into_iter()
                .map(|o| Trained {
                    delta: o.delta,
                    loss: o.train_loss,
                    accuracy: o.correct as f64 / o.samples.max(1) as f64,
                    steps: o.steps,
                    samples: o.samples,
                    importance: o.importance,
                })
                .collect());
        }
        let mut results = Vec::with_capacity(work.len());
        for (((c, _, _), config), &s) in work.iter().zip(configs).zip(start_of) {
            let outcome =
                pop.learner.train(&pop.spec, &starts[s], &pop.clients[*c].train, &mut self.queries, config)?;
            results.push(Trained {
                delta: outcome.delta,
                loss: outcome.metrics.train_loss,
                accuracy: outcome.metrics.train_accuracy,
                steps: outcome.metrics.steps,
                samples: config.steps * config.batch_size.min(pop.clients[*c].train.len()),
                importance: outcome.importance,
            });
        }
        Ok(results)
    }

    /// Hands client `c`'s trained delta to its participant, which encodes it for its task with
    /// the upload codec and its residual (staged until the engine answers), as the daemon's does.
    fn encode(&mut self, c: usize, task: &RoundTask, trained: Trained, seconds: f64) -> Result<Update, SimError> {
        self.trained_samples += trained.samples as u64;
        let metrics = TrainMetrics {
            loss: trained.loss as f32,
            accuracy: trained.accuracy as f32,
            steps: trained.steps as u32,
            seconds: seconds as f32,
        };
        let result = LocalResult { delta: trained.delta, metrics, importance: trained.importance };
        Ok(self.participants[c].finish(task, result)?)
    }

    /// Scores the global pool of each evaluation task on its client's held-out examples; the
    /// reports arrive at `now`.
    fn evaluate(&mut self, now: Time, evals: Vec<(ClientId, Box<EvalTask>)>) -> Result<(), SimError> {
        let round = evals[0].1.round;
        self.progress.phase(round.0, &format!("evaluating on {} clients", evals.len()));
        let clients = evals.iter().map(|(client, _)| self.client_index(client)).collect::<Result<Vec<_>, _>>()?;
        let (mut pools, mut pool_of) =
            self.decode_globals(clients.iter().zip(&evals).map(|(&c, (_, t))| (c, t.round, &t.global)))?;
        self.personalise(clients.iter().copied(), &mut pools, &mut pool_of)?;
        for (((client, task), &c), &i) in evals.into_iter().zip(&clients).zip(&pool_of) {
            let pop = self.pop;
            let m = pop.learner.evaluate(
                &pop.spec,
                &pools[i],
                &pop.clients[c].eval,
                &mut self.queries,
                &self.train_config,
            )?;
            let report = self.participants[c].finish_eval(&task, m.to_wire());
            let wire_bytes = frame_len(&report)?;
            self.push(now, Event::EvalReport { client, report, wire_bytes });
        }
        Ok(())
    }

    /// Scores a committed global pool, exactly as the server holds it, on the population's global
    /// test set (Flower's centralised evaluation) with the function, settings and query cache the
    /// clients evaluate with; `None` without a global test set. No simulated time, no bytes.
    fn evaluate_global(&mut self, round: Round, pool: &AdapterPool) -> Result<Option<EvalMetrics>, SimError> {
        let pop = self.pop;
        let Some(examples) = pop.global_test.as_ref() else { return Ok(None) };
        self.progress.phase(round.0, &format!("evaluating on the global test set ({} examples)", examples.len()));
        let metrics = pop.learner.evaluate(&pop.spec, pool, examples, &mut self.queries, &self.train_config)?;
        Ok(Some(metrics))
    }
}

/// Something due at a simulated time.
enum Queued {
    /// An event for the engine.
    Event(Event),
    /// An update in flight, waiting on disk ([`Spill::park_upload`]) until it arrives.
    Upload { client: ClientId, parked: ParkedUpload, wire_bytes: u64 },
}

/// What one client's local training produced, whichever way it ran.
struct Trained {
    delta: PoolDelta,
    loss: f64,
    accuracy: f64,
    steps: usize,
    samples: usize,
    importance: Vec<TripletImportance>,
}

/// Bytes a message takes on the wire: frame header + body.
fn frame_len<T: serde::Serialize + ?Sized>(message: &T) -> Result<u64, SimError> {
    Ok((frame::encoded_len(message)? + HEADER_LEN) as u64)
}
