//! Where a simulation's virtual clients live: the [`ClientSide`] the driver talks to, and
//! [`LocalClients`], the clients of this process (all of them, or a distributed worker's shard).
//!
//! The driver keeps the round engine, the virtual clock and the network model; everything a
//! client does — enroll, decode its task, train (in lockstep over the shared backbone, or one
//! after another), encode its update with its error-feedback residual, answer acks, evaluate —
//! happens behind this trait, in this process ([`LocalClients`]) or on worker processes
//! ([`crate::distributed::RemoteClients`], which runs a `LocalClients` on each worker). Both are
//! this module's code, so a distributed run gives the same rounds as one process.

use std::time::{Duration, Instant};

use fedpool_client::learner::Learner;
use fedpool_client::participant::{LocalResult, Participant, ParticipantConfig};
use fedpool_client::train::{EvalMetrics, QueryCache, TrainConfig, TrainError};
use fedpool_common::adapter::{AdapterKind, AdapterPool, PoolDelta, PoolSpec};
use fedpool_common::codec::EncodedDelta;
use fedpool_common::wire::{Enroll, EvalReport, EvalTask, RoundTask, TrainMetrics, TripletImportance, Update};
use fedpool_common::{BackboneFingerprint, Round, TaskId};
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::experiment::{Experiment, Mode};
use crate::network::NetworkModel;
use crate::population::Population;
use crate::spill::Spill;
use crate::tenancy::{self, VirtualClient};

/// What the driver knows of the population without holding it: the adapter layout, the
/// backbone's fingerprint and the clients' names (in partition order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopulationInfo {
    /// The adapter layout every client trains.
    pub spec: PoolSpec,
    /// The backbone's fingerprint.
    pub fingerprint: BackboneFingerprint,
    /// Every client's name, index = client.
    pub names: Vec<String>,
    /// A line for the log: device, data and partition sizes.
    pub description: String,
}

impl PopulationInfo {
    /// The facts of a loaded population.
    pub fn of(pop: &Population) -> Self {
        PopulationInfo {
            spec: pop.spec.clone(),
            fingerprint: pop.fingerprint,
            names: pop.clients.iter().map(|c| c.name.clone()).collect(),
            description: pop.description.clone(),
        }
    }

    /// True when `other` describes the same clients training the same layout on the same backbone
    /// (the description, which names the device, may differ).
    pub fn same_clients(&self, other: &PopulationInfo) -> bool {
        self.spec == other.spec && self.fingerprint == other.fingerprint && self.names == other.names
    }
}

/// One round task for one client (its index in the population).
#[derive(Debug, Clone)]
pub struct Work {
    /// The client.
    pub client: usize,
    /// Its task, as the engine sent it.
    pub task: Box<RoundTask>,
}

/// A client's update as it leaves the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trained {
    /// The update (encoded with the upload codec and the client's residual).
    pub update: Update,
    /// Training examples processed (each step's rows): the simulated compute.
    pub samples: u64,
}

/// The engine's answer to an update, for the client's participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The update of this task is in a committed round.
    Ack(TaskId),
    /// An update was refused (`None`: whatever was sent).
    Reject(Option<TaskId>),
}

/// Local training done so far, all clients together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    /// Training examples processed (each step's rows).
    pub samples: u64,
    /// Wall-clock seconds spent in local training.
    pub wall_seconds: f64,
}

/// Called with each trained client's update: its index in the work list, and the update.
pub type OnTrained<'f> = dyn FnMut(usize, Trained) -> Result<(), SimError> + 'f;

/// The virtual clients, wherever they run. Every method keeps the order of its input, so the
/// driver feeds the engine the same events in the same order whoever did the work.
pub trait ClientSide {
    /// The population the clients make up.
    fn info(&self) -> &PopulationInfo;

    /// Each client's enrollment, with its index, in client order.
    fn enroll(&mut self) -> Result<Vec<(usize, Enroll)>, SimError>;

    /// Trains each work item's client on its task; `done` gets each update (any order, with its
    /// index in `work`). A client that cannot answer (its worker is gone) never does.
    fn train(&mut self, work: &[Work], done: &mut OnTrained<'_>) -> Result<(), SimError>;

    /// Hands the engine's answer to `client`'s participant.
    fn answer(&mut self, client: usize, answer: Answer) -> Result<(), SimError>;

    /// Scores each task's global pool on its client's held-out examples: a report per task, in
    /// order (`None`: the client cannot answer).
    fn evaluate(&mut self, evals: &[(usize, Box<EvalTask>)]) -> Result<Vec<Option<EvalReport>>, SimError>;

    /// Scores a committed global pool on the experiment's global test set (`None` without one).
    fn evaluate_global(&mut self, pool: &AdapterPool) -> Result<Option<EvalMetrics>, SimError>;

    /// Each client's error-feedback residual's L2 norm (0 for one never acknowledged, or whose
    /// worker is gone).
    fn residual_norms(&mut self) -> Result<Vec<f64>, SimError>;

    /// Local training done so far.
    fn stats(&self) -> TrainStats;
}

/// Simulated compute seconds of `samples` training examples at speed 1 (the experiment's
/// `seconds_per_sample`).
pub fn compute_at_unit_speed(exp: &Experiment, samples: u64) -> Duration {
    Duration::from_secs_f64(samples as f64 * exp.federation.seconds_per_sample)
}

/// The clients of this process: the population's backbone and data, a participant per client
/// it holds, and their residuals on disk.
pub struct LocalClients<'a> {
    exp: &'a Experiment,
    pop: &'a Population,
    info: PopulationInfo,
    network: NetworkModel,
    /// Index = client; `None` for a client another process holds.
    participants: Vec<Option<Participant>>,
    /// The participants' residuals (removed when this is dropped).
    _spill: Spill,
    queries: QueryCache,
    train_config: TrainConfig,
    stats: TrainStats,
}

impl std::fmt::Debug for LocalClients<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.participants.iter().filter(|p| p.is_some()).count();
        f.debug_struct("LocalClients").field("clients", &held).finish_non_exhaustive()
    }
}

impl<'a> LocalClients<'a> {
    /// The clients `shard` of `pop` (every client with `None`), as `exp` sets them up.
    pub fn new(exp: &'a Experiment, pop: &'a Population, shard: Option<&[usize]>) -> Result<Self, SimError> {
        let n = pop.clients.len();
        let network = NetworkModel::new(&exp.network, n, &exp.base_dir)?;
        let train_config = exp.train_config()?;
        let upload_codec =
            exp.upload_codec.to_schedule().map_err(|source| SimError::Codec { table: "upload_codec", source })?;
        let spill = Spill::new_in(&std::env::temp_dir(), pop.spec.hash()).map_err(SimError::Scratch)?;
        let mut held = vec![shard.is_none(); n];
        for &c in shard.unwrap_or(&[]) {
            *held.get_mut(c).ok_or(SimError::UnknownClientIndex(c))? = true;
        }
        let participants = (0..n)
            .map(|c| {
                held[c].then(|| {
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
            })
            .collect();
        Ok(LocalClients {
            exp,
            pop,
            info: PopulationInfo::of(pop),
            network,
            participants,
            _spill: spill,
            queries: QueryCache::new(pop.learner.hidden_size()),
            train_config,
            stats: TrainStats::default(),
        })
    }

    /// The clients this process holds, in order.
    pub fn held(&self) -> Vec<usize> {
        self.participants.iter().enumerate().filter(|(_, p)| p.is_some()).map(|(c, _)| c).collect()
    }

    fn participant(&mut self, c: usize) -> Result<&mut Participant, SimError> {
        self.participants.get_mut(c).and_then(Option::as_mut).ok_or(SimError::UnknownClientIndex(c))
    }

    /// True when the clients train in lockstep (one batched pass per step for many clients).
    pub fn lockstep_applies(&self) -> bool {
        let spec = &self.pop.spec;
        let pool = spec.kind == AdapterKind::SsfPool && spec.has_keys() && spec.pool_size >= 2;
        // Decoders train one client at a time (no per-row adapters in the decoder yet).
        let encoder = matches!(self.pop.learner, Learner::Encoder(_));
        encoder && self.exp.mode == Mode::Lockstep && !self.train_config.head_only && (pool || spec.kind.is_lora())
    }

    /// The pools of the tasks' globals, decoded by their clients' participants once per distinct
    /// encoding (every task of one send carries the same pool: memory holds one copy), and the
    /// index of each task's pool.
    fn decode_globals<'t>(
        &mut self,
        tasks: impl Iterator<Item = (usize, Round, &'t EncodedDelta)>,
    ) -> Result<(Vec<AdapterPool>, Vec<usize>), SimError> {
        let mut seen: Vec<(&EncodedDelta, AdapterPool)> = Vec::new();
        let mut index = Vec::new();
        for (c, round, global) in tasks {
            let i = match seen.iter().position(|(g, _)| *g == global) {
                Some(i) => i,
                None => {
                    let pool = self.participant(c)?.decode_global(round, global)?;
                    seen.push((global, pool));
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
            if let Some(own) = self.participant(c)?.personalise(&pools[*index])? {
                pools.push(own);
                *index = pools.len() - 1;
            }
        }
        Ok(())
    }

    /// Trains one group of clients: in lockstep, or the one client of a sequential group with the
    /// client's own trainer.
    fn train_group(
        &mut self,
        work: &[Work],
        configs: &[TrainConfig],
        start_of: &[usize],
        starts: &[AdapterPool],
    ) -> Result<Vec<Outcome>, SimError> {
        let pop = self.pop;
        if let (true, Learner::Encoder(backbone)) = (self.lockstep_applies(), &pop.learner) {
            let clients: Vec<VirtualClient<'_>> = work
                .iter()
                .zip(configs)
                .zip(start_of)
                .map(|((w, config), &s)| {
                    Ok(VirtualClient {
                        key: w.client as u64,
                        train: pop.clients[w.client].train.encoded()?,
                        start: &starts[s],
                        config: config.clone(),
                    })
                })
                .collect::<Result<_, TrainError>>()?;
            let outcomes =
                tenancy::train_lockstep(&backbone.model, &pop.spec, &clients, &mut self.queries, backbone.pad_id)?;
            return Ok(outcomes
                .into_iter()
                .map(|o| Outcome {
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
        for ((w, config), &s) in work.iter().zip(configs).zip(start_of) {
            let data = &pop.clients[w.client].train;
            let outcome = pop.learner.train(&pop.spec, &starts[s], data, &mut self.queries, config)?;
            results.push(Outcome {
                delta: outcome.delta,
                loss: outcome.metrics.train_loss,
                accuracy: outcome.metrics.train_accuracy,
                steps: outcome.metrics.steps,
                samples: config.steps * config.batch_size.min(data.len()),
                importance: outcome.importance,
            });
        }
        Ok(results)
    }

    /// Hands client `c`'s trained delta to its participant, which encodes it for its task with
    /// the upload codec and its residual (staged until the engine answers), as the daemon's does.
    /// The client reports its compute time in the simulated world.
    fn encode(&mut self, c: usize, task: &RoundTask, trained: Outcome) -> Result<Trained, SimError> {
        let samples = trained.samples as u64;
        let seconds = self.network.compute_time(c, compute_at_unit_speed(self.exp, samples)).as_secs_f64();
        let metrics = TrainMetrics {
            loss: trained.loss as f32,
            accuracy: trained.accuracy as f32,
            steps: trained.steps as u32,
            seconds: seconds as f32,
        };
        let result = LocalResult { delta: trained.delta, metrics, importance: trained.importance };
        let update = self.participant(c)?.finish(task, result)?;
        self.stats.samples += samples;
        Ok(Trained { update, samples })
    }
}

impl ClientSide for LocalClients<'_> {
    fn info(&self) -> &PopulationInfo {
        &self.info
    }

    fn enroll(&mut self) -> Result<Vec<(usize, Enroll)>, SimError> {
        Ok(self.participants.iter().enumerate().filter_map(|(c, p)| Some((c, p.as_ref()?.enroll()))).collect())
    }

    fn train(&mut self, work: &[Work], done: &mut OnTrained<'_>) -> Result<(), SimError> {
        let (mut starts, mut start_of) =
            self.decode_globals(work.iter().map(|w| (w.client, w.task.round, &w.task.global)))?;
        self.personalise(work.iter().map(|w| w.client), &mut starts, &mut start_of)?;
        let configs: Vec<TrainConfig> = work
            .iter()
            .map(|w| self.participant(w.client).map(|p| p.round_config(&w.task)))
            .collect::<Result<_, _>>()?;

        // Clients train in groups: each group's batches fit one pass (lockstep), or one client at
        // a time (sequential). A group runs all its steps, then its updates are encoded and its
        // adapters and optimizer state freed, so memory holds one group, not every client.
        // Default on a CPU: one client per pass (1 row fits no batch but the client's own).
        let lockstep = self.lockstep_applies();
        let default_rows = if self.pop.learner.device().is_cpu() { 1 } else { crate::experiment::GPU_ROWS_PER_PASS };
        let max_rows = if lockstep { self.exp.max_rows_per_pass.unwrap_or(default_rows) } else { 0 };
        let batches: Vec<usize> = configs.iter().map(|c| c.batch_size).collect();
        for group in tenancy::client_groups(&batches, max_rows) {
            let t = Instant::now();
            let outcomes =
                self.train_group(&work[group.clone()], &configs[group.clone()], &start_of[group.clone()], &starts)?;
            self.stats.wall_seconds += t.elapsed().as_secs_f64();
            for (i, outcome) in group.zip(outcomes) {
                let trained = self.encode(work[i].client, &work[i].task, outcome)?;
                done(i, trained)?;
            }
        }
        Ok(())
    }

    fn answer(&mut self, client: usize, answer: Answer) -> Result<(), SimError> {
        let p = self.participant(client)?;
        match answer {
            Answer::Ack(task) => {
                p.on_ack(task)?;
            }
            Answer::Reject(task) => p.on_reject(task)?,
        }
        Ok(())
    }

    fn evaluate(&mut self, evals: &[(usize, Box<EvalTask>)]) -> Result<Vec<Option<EvalReport>>, SimError> {
        let (mut pools, mut pool_of) = self.decode_globals(evals.iter().map(|(c, t)| (*c, t.round, &t.global)))?;
        self.personalise(evals.iter().map(|(c, _)| *c), &mut pools, &mut pool_of)?;
        let pop = self.pop;
        let mut reports = Vec::with_capacity(evals.len());
        for ((c, task), &i) in evals.iter().zip(&pool_of) {
            let m = pop.learner.evaluate(
                &pop.spec,
                &pools[i],
                &pop.clients[*c].eval,
                &mut self.queries,
                &self.train_config,
            )?;
            reports.push(Some(self.participant(*c)?.finish_eval(task, m.to_wire())));
        }
        Ok(reports)
    }

    fn evaluate_global(&mut self, pool: &AdapterPool) -> Result<Option<EvalMetrics>, SimError> {
        let pop = self.pop;
        let Some(examples) = pop.global_test.as_ref() else { return Ok(None) };
        let metrics = pop.learner.evaluate(&pop.spec, pool, examples, &mut self.queries, &self.train_config)?;
        Ok(Some(metrics))
    }

    fn residual_norms(&mut self) -> Result<Vec<f64>, SimError> {
        self.participants
            .iter_mut()
            .map(|p| match p {
                Some(p) => Ok(p.residual()?.l2_norm()),
                None => Ok(0.0),
            })
            .collect()
    }

    fn stats(&self) -> TrainStats {
        self.stats
    }
}

/// What one client's local training produced, whichever way it ran.
struct Outcome {
    delta: PoolDelta,
    loss: f64,
    accuracy: f64,
    steps: usize,
    samples: usize,
    importance: Vec<TripletImportance>,
}
