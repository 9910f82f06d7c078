//! What a simulation's coordinator and its workers say to each other: [`Request`]s one way,
//! [`Reply`]s the other, each one frame of the project's own format (`MessageKind::SimRequest`
//! and `SimReply`, bincode bodies) carrying the protocol's own messages (`RoundTask`'s fields,
//! `Update`, `Enroll`, `EvalReport`). A round's tasks share one global pool: it travels once per
//! request, not once per client.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedpool_client::train::EvalMetrics;
use fedpool_common::adapter::AdapterPool;
use fedpool_common::codec::EncodedDelta;
use fedpool_common::frame::{self, FrameError, FrameLimits, MessageKind};
use fedpool_common::tensor::HostTensor;
use fedpool_common::wire::{Enroll, EvalReport, EvalTask, RoundTask, TargetBudget};
use fedpool_common::{Nonce, Round, SpecHash, TaskId};
use serde::{Deserialize, Serialize};

use super::coordinator::Sharding;
use crate::clients::{Answer, PopulationInfo, TrainStats, Trained};

/// Memory a decoded request or reply may take per byte of its body (bincode's allocation limit):
/// a batch of tasks or answers is many small structs of varints, up to ~8× their encoding.
const ALLOC_PER_BYTE: usize = 16;

/// Frame caps on the link: every message of it is bulk (a request may carry a pool and many
/// tasks); 1 GiB bounds what a peer can make the other buffer.
pub const LIMITS: FrameLimits = FrameLimits { control: 1 << 20, bulk: 1 << 30 };

/// Coordinator → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Load the experiment and hold these clients (answered by [`Reply::Ready`]).
    Setup(Setup),
    /// Enroll the clients held (answered by [`Reply::Enrolled`]).
    Enroll,
    /// The engine's answers to updates, for the clients' participants (no reply).
    Answers(Vec<(u32, Answer)>),
    /// Train these tasks (answered by a [`Reply::Trained`] per task, then [`Reply::Done`]).
    Train(TaskBatch),
    /// Evaluate these tasks (answered by a [`Reply::Evaluated`] per task, then [`Reply::Done`]).
    Evaluate(EvalBatch),
    /// Score a committed global pool on the global test set ([`Reply::GlobalMetrics`]).
    EvaluateGlobal(PoolTensors),
    /// The run is over: report the residuals ([`Reply::Finished`]) and stop.
    Finish,
}

/// What a worker needs to rebuild the coordinator's population and hold its share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// The experiment as TOML (as the coordinator resolved it).
    pub experiment: String,
    /// Where it came from, for error messages.
    pub origin: String,
    /// The folder its relative paths are taken from (the coordinator's, absolute: a shared
    /// filesystem, or the same paths in the same image).
    pub base_dir: PathBuf,
    /// Workers in the run.
    pub workers: u32,
    /// This worker's place among them (0-based).
    pub index: u32,
    /// How the clients are dealt: the worker holds `sharding.shard(clients, workers, index)`.
    pub sharding: Sharding,
}

/// A [`RoundTask`] without its global pool, which travels once in the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFor {
    /// The item's place in the coordinator's work list.
    pub index: u32,
    /// The client.
    pub client: u32,
    /// Its global pool: an index into [`TaskBatch::globals`].
    pub global: u32,
    /// `RoundTask::round`.
    pub round: Round,
    /// `RoundTask::task_id`.
    pub task_id: TaskId,
    /// `RoundTask::nonce`.
    pub nonce: Nonce,
    /// `RoundTask::rank_budget`.
    pub rank_budget: Vec<TargetBudget>,
    /// `RoundTask::local_steps`.
    pub local_steps: u32,
    /// `RoundTask::deadline_ms`.
    pub deadline_ms: u64,
}

/// Training tasks for one worker's clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskBatch {
    /// The distinct global pools of the tasks.
    pub globals: Vec<EncodedDelta>,
    /// The tasks.
    pub tasks: Vec<TaskFor>,
}

/// An [`EvalTask`] without its global pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalFor {
    /// The item's place in the coordinator's list.
    pub index: u32,
    /// The client.
    pub client: u32,
    /// Its global pool: an index into [`EvalBatch::globals`].
    pub global: u32,
    /// `EvalTask::round`.
    pub round: Round,
    /// `EvalTask::task_id`.
    pub task_id: TaskId,
    /// `EvalTask::deadline_ms`.
    pub deadline_ms: u64,
}

/// Evaluation tasks for one worker's clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalBatch {
    /// The distinct global pools of the tasks.
    pub globals: Vec<EncodedDelta>,
    /// The tasks.
    pub tasks: Vec<EvalFor>,
}

/// A pool's tensors, exactly (the coordinator's committed global).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolTensors {
    /// The spec the tensors follow.
    pub spec_hash: SpecHash,
    /// The tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl From<&AdapterPool> for PoolTensors {
    fn from(pool: &AdapterPool) -> Self {
        PoolTensors { spec_hash: pool.spec_hash, tensors: pool.tensors.clone() }
    }
}

impl From<PoolTensors> for AdapterPool {
    fn from(p: PoolTensors) -> Self {
        AdapterPool { spec_hash: p.spec_hash, tensors: p.tensors }
    }
}

/// Worker → coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The first frame on a new link: who the worker is.
    Hello {
        /// Its software, in words.
        software: String,
    },
    /// Set up: the population as the worker loaded it, and the clients it holds.
    Ready {
        /// The population.
        info: PopulationInfo,
        /// The clients it holds.
        held: Vec<u32>,
    },
    /// Its clients' enrollments.
    Enrolled(Vec<(u32, Enroll)>),
    /// One task's update.
    Trained {
        /// The task's place in the coordinator's work list.
        index: u32,
        /// The update.
        trained: Trained,
    },
    /// One evaluation task's report.
    Evaluated {
        /// The task's place in the coordinator's list.
        index: u32,
        /// The report.
        report: EvalReport,
    },
    /// The global test set's metrics (`None`: the experiment has none).
    GlobalMetrics(Option<EvalMetrics>),
    /// Every item of the request was answered.
    Done,
    /// The residual norm of each client held, and the training done.
    Finished {
        /// (client, L2 norm of its residual).
        residuals: Vec<(u32, f64)>,
        /// Local training done on this worker.
        stats: TrainStats,
        /// The worker's peak resident memory, MiB (`None` where the system does not say).
        peak_rss_mib: Option<f64>,
    },
    /// The request failed on the worker (its error, in words); the run cannot go on.
    Failed(String),
}

impl Request {
    /// The request as one frame.
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        frame::frame(MessageKind::SimRequest, &frame::to_bytes(self)?)
    }

    /// A request from a frame of `kind`.
    pub fn decode(kind: MessageKind, body: &[u8]) -> Result<Self, FrameError> {
        match kind {
            MessageKind::SimRequest => frame::from_bytes_within(body, body.len().saturating_mul(ALLOC_PER_BYTE)),
            other => Err(FrameError::UnexpectedKind(other)),
        }
    }
}

impl Reply {
    /// The reply as one frame.
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        frame::frame(MessageKind::SimReply, &frame::to_bytes(self)?)
    }

    /// A reply from a frame of `kind`.
    pub fn decode(kind: MessageKind, body: &[u8]) -> Result<Self, FrameError> {
        match kind {
            MessageKind::SimReply => frame::from_bytes_within(body, body.len().saturating_mul(ALLOC_PER_BYTE)),
            other => Err(FrameError::UnexpectedKind(other)),
        }
    }
}

/// Splits round tasks into a batch: each distinct global once, each task without it.
pub fn task_batch<'t>(tasks: impl Iterator<Item = (usize, usize, &'t RoundTask)>) -> TaskBatch {
    let mut globals: Vec<EncodedDelta> = Vec::new();
    let tasks = tasks
        .map(|(index, client, t)| TaskFor {
            index: index as u32,
            client: client as u32,
            global: global_index(&mut globals, &t.global),
            round: t.round,
            task_id: t.task_id,
            nonce: t.nonce,
            rank_budget: t.rank_budget.clone(),
            local_steps: t.local_steps,
            deadline_ms: t.deadline_ms,
        })
        .collect();
    TaskBatch { globals, tasks }
}

/// Splits evaluation tasks into a batch: each distinct global once.
pub fn eval_batch<'t>(tasks: impl Iterator<Item = (usize, usize, &'t EvalTask)>) -> EvalBatch {
    let mut globals: Vec<EncodedDelta> = Vec::new();
    let tasks = tasks
        .map(|(index, client, t)| EvalFor {
            index: index as u32,
            client: client as u32,
            global: global_index(&mut globals, &t.global),
            round: t.round,
            task_id: t.task_id,
            deadline_ms: t.deadline_ms,
        })
        .collect();
    EvalBatch { globals, tasks }
}

fn global_index(globals: &mut Vec<EncodedDelta>, global: &EncodedDelta) -> u32 {
    let i = globals.iter().position(|g| g == global).unwrap_or_else(|| {
        globals.push(global.clone());
        globals.len() - 1
    });
    i as u32
}

/// Why a batch could not be turned back into tasks.
#[derive(Debug, thiserror::Error)]
#[error("task {index} names global pool {global}, but the request carries {globals}")]
pub struct BadGlobalIndex {
    /// The task.
    pub index: u32,
    /// The index it names.
    pub global: u32,
    /// Globals in the request.
    pub globals: usize,
}

/// The global pool a task names, or why it names none.
fn pick(globals: &[EncodedDelta], index: u32, global: u32) -> Result<EncodedDelta, BadGlobalIndex> {
    globals.get(global as usize).cloned().ok_or(BadGlobalIndex { index, global, globals: globals.len() })
}

impl TaskBatch {
    /// The tasks, whole again: (index, client, task).
    pub fn into_tasks(self) -> Result<Vec<(usize, usize, RoundTask)>, BadGlobalIndex> {
        let globals = self.globals;
        let whole = |t: TaskFor| {
            let task = RoundTask {
                round: t.round,
                task_id: t.task_id,
                nonce: t.nonce,
                global: pick(&globals, t.index, t.global)?,
                rank_budget: t.rank_budget,
                local_steps: t.local_steps,
                deadline_ms: t.deadline_ms,
            };
            Ok((t.index as usize, t.client as usize, task))
        };
        self.tasks.into_iter().map(whole).collect()
    }
}

impl EvalBatch {
    /// The tasks, whole again: (index, client, task).
    pub fn into_tasks(self) -> Result<Vec<(usize, usize, EvalTask)>, BadGlobalIndex> {
        let globals = self.globals;
        let whole = |t: EvalFor| {
            let global = pick(&globals, t.index, t.global)?;
            let task = EvalTask { round: t.round, task_id: t.task_id, global, deadline_ms: t.deadline_ms };
            Ok((t.index as usize, t.client as usize, task))
        };
        self.tasks.into_iter().map(whole).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_of_acks_decodes_although_it_takes_more_memory_than_wire_bytes() {
        // A round's acks: small task ids, 2–3 wire bytes each, 24 bytes each in memory.
        let req = Request::Answers((0..256).map(|c| (c, Answer::Ack(TaskId(u64::from(c) + 1)))).collect());
        let bytes = req.to_frame().unwrap();
        let (kind, body) = frame::read_frame(&mut bytes.as_slice(), &LIMITS).unwrap();
        // The federation's 2× limit refuses it (this stopped a 256-client run) ...
        assert!(frame::from_bytes::<Request>(&body).is_err(), "{} bytes", body.len());
        // ... the link's does not.
        assert_eq!(Request::decode(kind, &body).unwrap(), req);
    }

    #[test]
    fn a_request_survives_its_frame_and_a_reply_frame_is_not_a_request() {
        let req = Request::Answers(vec![(3, Answer::Ack(TaskId(9))), (4, Answer::Reject(None))]);
        let bytes = req.to_frame().unwrap();
        let (kind, body) = frame::read_frame(&mut bytes.as_slice(), &LIMITS).unwrap();
        assert_eq!(Request::decode(kind, &body).unwrap(), req);
        let reply = Reply::Done.to_frame().unwrap();
        let (kind, body) = frame::read_frame(&mut reply.as_slice(), &LIMITS).unwrap();
        assert!(matches!(Request::decode(kind, &body), Err(FrameError::UnexpectedKind(MessageKind::SimReply))));
    }
}
