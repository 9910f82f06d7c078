//! What one client is to the federation protocol, and nothing else: no sockets, no threads, no
//! clock, no training. As quinn-proto's `Connection` is to QUIC and the server's
//! `round::Engine` is to rounds, a [`Participant`] is the client side's protocol core; the daemon
//! (`session::daemon`, over QUIC) and the simulator (`fedpool-sim`'s driver, on a virtual clock)
//! are its two drivers, so every protocol step a client takes exists once, here.
//!
//! A participant holds the pool spec, the upload codec and the decode limits, the client's seed
//! and local-training settings, and its error-feedback residual (through a [`ResidualStorage`]:
//! the acknowledged residual and at most one staged one).
//!
//! # Methods, by family, in the order a driver calls them
//! - **Joining:** [`Participant::enroll`] → the `Enroll` message, once per connection.
//! - **A training task:** [`Participant::begin`] (decode the task's global pool, the round's
//!   training settings) → the driver trains → [`Participant::finish`] (truncate to the task's
//!   rank grant, encode with the residual, stage the new residual; the `Update` to send) → the
//!   server's answer: [`Participant::on_ack`] (the staged residual becomes the client's: persist
//!   it) or [`Participant::on_reject`] (it is dropped; the values are sent again later). A driver
//!   that trains many clients from one global pool may decode it once with
//!   [`Participant::decode_global`] and take the settings from [`Participant::round_config`].
//! - **An evaluation task:** [`Participant::begin_eval`] (decode the pool to score) → the driver
//!   evaluates → [`Participant::finish_eval`] (the `EvalReport`).
//!
//! **Personal tensors** (FedSA-LoRA's B, [`LoraVariant::keeps_local`]) are the client's own: never
//! uploaded, kept in the residual storage under [`PERSONAL_PREFIX`], staged with the residual by
//! `finish` and promoted or dropped with it, so a refused round leaves the client's model as its
//! last acknowledged one. `begin`, `begin_eval` and [`Participant::personalise`] put them into
//! the global pool the client trains and scores.
//!
//! A new `finish` replaces a staged residual that was never answered (the server gives a client
//! one task at a time; an older task's answer no longer matters); an answer for any other task
//! than the staged one changes nothing.

use fedpool_common::adapter::{AdapterPool, PoolDelta, PoolError, PoolSpec};
use fedpool_common::checkpoint::CheckpointError;
use fedpool_common::codec::{self, CodecError, CodecSchedule, DecodeLimits, EncodedDelta, ErrorFeedback};
use fedpool_common::wire::{
    Enroll, EvalMetrics, EvalReport, EvalTask, RoundTask, TrainMetrics, TripletImportance, Update, PROTOCOL_VERSION,
};
use fedpool_common::{BackboneFingerprint, HostTensor, Round, TaskId};
use std::collections::BTreeMap;

use crate::train::{LoraVariant, TrainConfig};

/// Key prefix of a personal tensor in the residual storage (`personal:<tensor name>`): kept,
/// persisted and staged with the residual, never encoded.
pub const PERSONAL_PREFIX: &str = "personal:";

/// Multiplier that gives each round its own batch order and dropout masks: a round's training
/// seed is `client seed ^ round · ROUND_MIX`.
const ROUND_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// Why a protocol step failed.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// The task's global pool could not be decoded.
    #[error("the server's global pool of round {round} cannot be decoded: {source}")]
    GlobalCodec {
        /// The task's round.
        round: Round,
        /// The decoder's error.
        #[source]
        source: CodecError,
    },
    /// The task's global pool decodes but does not fit the spec.
    #[error("the server's global pool of round {round} does not fit the pool spec: {source}")]
    GlobalPool {
        /// The task's round.
        round: Round,
        /// What does not fit.
        #[source]
        source: PoolError,
    },
    /// The trained delta could not be cut to the task's rank grant.
    #[error("cutting the update of round {round} to its rank grant: {source}")]
    Grant {
        /// The task's round.
        round: Round,
        /// The truncation's error.
        #[source]
        source: PoolError,
    },
    /// The delta could not be encoded.
    #[error("encoding the update of round {round}: {source}")]
    Encode {
        /// The task's round.
        round: Round,
        /// The encoder's error.
        #[source]
        source: CodecError,
    },
    /// A personal tensor does not fit the global pool (another spec's state).
    #[error("the client's personal tensor {name} does not fit the global pool")]
    Personal {
        /// The tensor.
        name: String,
    },
    /// The residual could not be read, kept or persisted.
    #[error(transparent)]
    Residual(#[from] CheckpointError),
}

impl ParticipantError {
    /// True when the error belongs to the server's task (an unusable global pool): the driver
    /// abandons that task and keeps serving. Anything else is the client's own failure.
    pub fn is_bad_task(&self) -> bool {
        matches!(self, Self::GlobalCodec { .. } | Self::GlobalPool { .. })
    }
}

/// Where a participant keeps its error-feedback residuals: the one its last acknowledged update
/// left, and at most one staged, waiting for its update's answer.
pub trait ResidualStorage: Send {
    /// The residual as of the last acknowledged update (empty before the first).
    fn acknowledged(&mut self) -> Result<ErrorFeedback, CheckpointError>;
    /// Keeps `residual` as the staged one, replacing any staged before.
    fn stage(&mut self, residual: ErrorFeedback) -> Result<(), CheckpointError>;
    /// The staged residual becomes the acknowledged one (persisted, where the storage persists).
    fn promote(&mut self) -> Result<(), CheckpointError>;
    /// The staged residual is dropped; the acknowledged one stays.
    fn discard(&mut self) -> Result<(), CheckpointError>;
}

/// Called with a residual about to become the acknowledged one; an error keeps the old one.
pub type Persist = Box<dyn FnMut(&ErrorFeedback) -> Result<(), CheckpointError> + Send>;

/// Residuals in memory, the acknowledged one optionally persisted on each promotion (the daemon
/// saves it in its state folder: `ResidualStore::into_storage`).
#[derive(Default)]
pub struct MemoryResidual {
    acknowledged: ErrorFeedback,
    staged: Option<ErrorFeedback>,
    persist: Option<Persist>,
}

impl std::fmt::Debug for MemoryResidual {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryResidual")
            .field("acknowledged_l2", &self.acknowledged.l2_norm())
            .field("staged", &self.staged.is_some())
            .field("persisted", &self.persist.is_some())
            .finish()
    }
}

impl MemoryResidual {
    /// Storage starting from `acknowledged`, persisting nothing.
    pub fn new(acknowledged: ErrorFeedback) -> Self {
        Self { acknowledged, staged: None, persist: None }
    }

    /// The same storage, calling `persist` with each residual before it becomes the acknowledged
    /// one (if it fails, the old one stays and the staged one is kept).
    pub fn persisted_by(mut self, persist: Persist) -> Self {
        self.persist = Some(persist);
        self
    }
}

impl ResidualStorage for MemoryResidual {
    fn acknowledged(&mut self) -> Result<ErrorFeedback, CheckpointError> {
        Ok(self.acknowledged.clone())
    }

    fn stage(&mut self, residual: ErrorFeedback) -> Result<(), CheckpointError> {
        self.staged = Some(residual);
        Ok(())
    }

    fn promote(&mut self) -> Result<(), CheckpointError> {
        let Some(staged) = self.staged.take() else { return Ok(()) };
        if let Some(persist) = self.persist.as_mut() {
            if let Err(e) = persist(&staged) {
                self.staged = Some(staged);
                return Err(e);
            }
        }
        self.acknowledged = staged;
        Ok(())
    }

    fn discard(&mut self) -> Result<(), CheckpointError> {
        self.staged = None;
        Ok(())
    }
}

/// Who a participant is and how it trains and uploads.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// The pool layout it trains (its hash is enrolled).
    pub spec: PoolSpec,
    /// The frozen backbone it trains on.
    pub backbone: BackboneFingerprint,
    /// Its training examples (enrolled, and each update's weight).
    pub examples: u64,
    /// The client's own seed: each round's training seed and each upload's rounding seed derive
    /// from it.
    pub seed: u64,
    /// Local-training settings; each task sets the steps, the seed and the LoRA factors trained.
    pub train: TrainConfig,
    /// Which LoRA factors train in which round (FFA-LoRA, RoLoRA).
    pub lora_variant: LoraVariant,
    /// The upload codec (with its warm-up: each round's configuration is `codec.for_round`).
    pub codec: CodecSchedule,
    /// Upload bandwidth told to the server at enrollment (bytes/s).
    pub declared_upload_bps: Option<u64>,
    /// Download bandwidth told to the server at enrollment (bytes/s).
    pub declared_download_bps: Option<u64>,
    /// The software, in words (`fedpool-client 0.1.0`).
    pub software: String,
}

/// What local training produced for a task, for [`Participant::finish`].
#[derive(Debug, Clone)]
pub struct LocalResult {
    /// The trained pool minus the task's global pool (SSF pools: the used slots).
    pub delta: PoolDelta,
    /// Loss, accuracy, steps and seconds of the training.
    pub metrics: TrainMetrics,
    /// AdaLoRA triplet importance (empty for other adapters).
    pub importance: Vec<TripletImportance>,
}

/// The importance scores of the triplets the task granted (all of them without a grant): an
/// ungranted triplet was not trained (it is zero), so its score of 0 is no measurement.
fn granted_scores(mut importance: Vec<TripletImportance>, task: &RoundTask) -> Vec<TripletImportance> {
    if task.rank_budget.is_empty() {
        return importance;
    }
    let ranks = task.granted_ranks();
    for imp in &mut importance {
        let rank = ranks.get(&imp.target).copied().unwrap_or(0);
        imp.scores.truncate(rank);
    }
    importance
}

/// One client's protocol state (see the module's documentation for the call order).
pub struct Participant {
    config: ParticipantConfig,
    limits: DecodeLimits,
    storage: Box<dyn ResidualStorage>,
    /// The task whose update left the staged residual.
    staged: Option<TaskId>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("spec", &self.config.spec.hash())
            .field("examples", &self.config.examples)
            .field("staged", &self.staged)
            .finish_non_exhaustive()
    }
}

impl Participant {
    /// A participant with `config`, its residuals in `storage`.
    pub fn new(config: ParticipantConfig, storage: Box<dyn ResidualStorage>) -> Self {
        let limits = DecodeLimits::for_spec(&config.spec);
        Self { config, limits, storage, staged: None }
    }

    /// The pool layout it trains.
    pub fn spec(&self) -> &PoolSpec {
        &self.config.spec
    }

    /// Its settings.
    pub fn config(&self) -> &ParticipantConfig {
        &self.config
    }

    /// The task whose residual is staged, waiting for the server's answer.
    pub fn staged(&self) -> Option<TaskId> {
        self.staged
    }

    /// The residual as of its last acknowledged update (without the personal tensors).
    pub fn residual(&mut self) -> Result<ErrorFeedback, ParticipantError> {
        let mut state = self.storage.acknowledged()?.into_tensors();
        state.retain(|key, _| !key.starts_with(PERSONAL_PREFIX));
        Ok(ErrorFeedback::from_tensors(state))
    }

    /// The personal tensors as of its last acknowledged update, by tensor name (empty unless
    /// the LoRA variant keeps some local, and before the first acknowledged update).
    pub fn personal(&mut self) -> Result<BTreeMap<String, HostTensor>, ParticipantError> {
        let state = self.storage.acknowledged()?.into_tensors();
        Ok(state
            .into_iter()
            .filter_map(|(key, t)| key.strip_prefix(PERSONAL_PREFIX).map(|name| (name.to_owned(), t)))
            .collect())
    }

    /// `global` with this client's personal tensors in place of the shared ones: the model it
    /// trains and scores. `None` when it has none (the global as it is).
    pub fn personalise(&mut self, global: &AdapterPool) -> Result<Option<AdapterPool>, ParticipantError> {
        if self.config.lora_variant != LoraVariant::FedSa {
            return Ok(None);
        }
        let personal = self.personal()?;
        if personal.is_empty() {
            return Ok(None);
        }
        let mut pool = global.clone();
        for (name, t) in personal {
            match pool.tensors.get_mut(&name) {
                Some(slot) if slot.shape() == t.shape() => *slot = t,
                _ => return Err(ParticipantError::Personal { name }),
            }
        }
        Ok(Some(pool))
    }

    /// The enrollment message: protocol, backbone, spec hash, declared bandwidths, examples.
    pub fn enroll(&self) -> Enroll {
        let c = &self.config;
        Enroll {
            protocol_version: PROTOCOL_VERSION,
            backbone: c.backbone,
            spec_hash: c.spec.hash(),
            declared_upload_bps: c.declared_upload_bps,
            declared_download_bps: c.declared_download_bps,
            examples: c.examples,
            software: c.software.clone(),
        }
    }

    /// Decodes a global pool sent for `round` (with the spec's [`DecodeLimits::for_spec`]) and
    /// checks it against the spec. A rank-truncated global rebuilds a pool whose missing LoRA
    /// triplets are zero.
    pub fn decode_global(&self, round: Round, global: &EncodedDelta) -> Result<AdapterPool, ParticipantError> {
        let delta =
            codec::decode(global, &self.limits).map_err(|source| ParticipantError::GlobalCodec { round, source })?;
        AdapterPool::from_transfer(&delta, &self.config.spec)
            .map_err(|source| ParticipantError::GlobalPool { round, source })
    }

    /// The local-training settings of `task`: its steps, a batch order of its round's own, and
    /// the LoRA factors its round trains.
    pub fn round_config(&self, task: &RoundTask) -> TrainConfig {
        TrainConfig {
            steps: task.local_steps.max(1) as usize,
            seed: self.config.seed ^ task.round.0.wrapping_mul(ROUND_MIX),
            lora_train: self.config.lora_variant.factors(task.round.0),
            ..self.config.train.clone()
        }
    }

    /// The start of a training task: the pool to train from (the global, personalised) and the
    /// settings to train with.
    pub fn begin(&mut self, task: &RoundTask) -> Result<(AdapterPool, TrainConfig), ParticipantError> {
        let global = self.decode_global(task.round, &task.global)?;
        let start = self.personalise(&global)?.unwrap_or(global);
        Ok((start, self.round_config(task)))
    }

    /// The end of a training task: the delta cut to the task's rank grant (if it has one: the
    /// triplets it did not grant were not sent and stayed zero), encoded with the residual added
    /// in; the new residual is staged until the server answers. Returns the `Update` to send.
    pub fn finish(&mut self, task: &RoundTask, trained: LocalResult) -> Result<Update, ParticipantError> {
        let round = task.round;
        let delta = if task.rank_budget.is_empty() {
            trained.delta
        } else {
            trained
                .delta
                .truncate_lora(&self.config.spec, &task.granted_ranks())
                .map_err(|source| ParticipantError::Grant { round, source })?
        };
        let mut residual = self.storage.acknowledged()?;
        let (delta, personal) = self.split_personal(task, delta, &residual)?;
        let config = self.config.codec.for_round(round.0);
        let encoded = codec::encode(&delta, &config, Some(&mut residual), task.task_id.0 ^ self.config.seed)
            .map_err(|source| ParticipantError::Encode { round, source })?;
        if !personal.is_empty() {
            let mut state = residual.into_tensors();
            state.extend(personal.into_iter().map(|(name, t)| (format!("{PERSONAL_PREFIX}{name}"), t)));
            residual = ErrorFeedback::from_tensors(state);
        }
        self.storage.stage(residual)?;
        self.staged = Some(task.task_id);
        Ok(Update {
            round,
            task_id: task.task_id,
            nonce: task.nonce,
            examples: self.config.examples,
            delta: encoded,
            metrics: trained.metrics,
            importance: granted_scores(trained.importance, task),
        })
    }

    /// `delta` without the tensors the client keeps, and those tensors' new values (where the
    /// round started, from `state`'s personal tensors or else the task's global, plus their
    /// trained change).
    fn split_personal(
        &self,
        task: &RoundTask,
        mut delta: PoolDelta,
        state: &ErrorFeedback,
    ) -> Result<(PoolDelta, BTreeMap<String, HostTensor>), ParticipantError> {
        let variant = self.config.lora_variant;
        let kept: Vec<String> = delta.tensors.keys().filter(|name| variant.keeps_local(name)).cloned().collect();
        if kept.is_empty() {
            return Ok((delta, BTreeMap::new()));
        }
        let key = |name: &str| format!("{PERSONAL_PREFIX}{name}");
        // The first round a client keeps a tensor it started from the global's.
        let global = match kept.iter().all(|name| state.tensors().contains_key(&key(name))) {
            true => None,
            false => Some(self.decode_global(task.round, &task.global)?),
        };
        let mut personal = BTreeMap::new();
        for name in kept {
            let Some(change) = delta.tensors.remove(&name) else { continue };
            let base = state
                .tensors()
                .get(&key(&name))
                .or_else(|| global.as_ref().and_then(|pool| pool.tensors.get(&name)))
                .cloned()
                .ok_or_else(|| ParticipantError::Personal { name: name.clone() })?;
            if base.shape() != change.shape() {
                return Err(ParticipantError::Personal { name });
            }
            let mut value = base;
            value.data_mut().iter_mut().zip(change.data()).for_each(|(v, d)| *v += d);
            personal.insert(name, value);
        }
        Ok((delta, personal))
    }

    /// The server acknowledged the update for `task`: if its residual is the staged one, it
    /// becomes the client's (persisted by the storage before this returns). Returns whether it
    /// did.
    pub fn on_ack(&mut self, task: TaskId) -> Result<bool, ParticipantError> {
        if self.staged != Some(task) {
            return Ok(false);
        }
        self.storage.promote()?;
        self.staged = None;
        Ok(true)
    }

    /// The server refused the update for `task` (`None`: whatever was sent): the staged residual
    /// is dropped and the acknowledged one stays, so the values it carried are sent again later.
    pub fn on_reject(&mut self, task: Option<TaskId>) -> Result<(), ParticipantError> {
        let Some(staged) = self.staged else { return Ok(()) };
        if task.is_some_and(|t| t != staged) {
            return Ok(());
        }
        self.storage.discard()?;
        self.staged = None;
        Ok(())
    }

    /// The start of an evaluation task: the pool to score (the global, personalised).
    pub fn begin_eval(&mut self, task: &EvalTask) -> Result<AdapterPool, ParticipantError> {
        let global = self.decode_global(task.round, &task.global)?;
        Ok(self.personalise(&global)?.unwrap_or(global))
    }

    /// The end of an evaluation task: the report to send.
    pub fn finish_eval(&self, task: &EvalTask, metrics: EvalMetrics) -> EvalReport {
        EvalReport { round: task.round, task_id: task.task_id, metrics }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::LoraTrain;
    use fedpool_common::adapter::{HeadSpec, TargetSpec};
    use fedpool_common::codec::{CodecConfig, Quantization};
    use fedpool_common::wire::TargetBudget;
    use fedpool_common::{Nonce, Sha256};

    fn spec() -> PoolSpec {
        let targets = vec![TargetSpec { name: "layer.0.attention.query".into(), dim_in: 4, dim_out: 4 }];
        PoolSpec::lora(targets, 2, 4.0, Some(HeadSpec::new(4, 2)))
    }

    fn participant(storage: MemoryResidual) -> Participant {
        let config = ParticipantConfig {
            spec: spec(),
            backbone: BackboneFingerprint(Sha256::of(b"b")),
            examples: 7,
            seed: 5,
            train: TrainConfig::default(),
            lora_variant: LoraVariant::RoLora,
            codec: CodecConfig { top_k: Some(0.25), quantization: Quantization::F32, ..CodecConfig::default() }.into(),
            declared_upload_bps: None,
            declared_download_bps: None,
            software: "test".into(),
        };
        Participant::new(config, Box::new(storage))
    }

    fn task(id: u64, round: u64, pool: &AdapterPool) -> RoundTask {
        let global = codec::encode(&pool.to_transfer(&spec()).unwrap(), &CodecConfig::default(), None, 0).unwrap();
        RoundTask {
            round: Round(round),
            task_id: TaskId(id),
            nonce: Nonce([id as u8; 16]),
            global,
            local_steps: 3,
            rank_budget: Vec::new(),
            deadline_ms: 60_000,
        }
    }

    fn result(start: &AdapterPool, scale: f32) -> LocalResult {
        let mut trained = start.clone();
        for t in trained.tensors.values_mut() {
            for (i, v) in t.data_mut().iter_mut().enumerate() {
                *v += scale * (i as f32 + 1.0);
            }
        }
        let delta = trained.delta_from(start).unwrap();
        LocalResult { delta, metrics: TrainMetrics::default(), importance: Vec::new() }
    }

    #[test]
    fn only_the_staged_tasks_answer_counts_and_a_new_finish_replaces_the_staged_residual() {
        let pool = AdapterPool::init(&spec(), 1).unwrap();
        let mut p = participant(MemoryResidual::default());
        let t1 = task(1, 1, &pool);
        let (start, config) = p.begin(&t1).unwrap();
        assert_eq!(start, pool, "the global decodes to what was sent");
        assert_eq!((config.steps, config.seed), (3, 5 ^ 0x9e37_79b9_7f4a_7c15), "the round's own batch order");
        assert_eq!(config.lora_train, LoraVariant::RoLora.factors(1));
        let update = p.finish(&t1, result(&start, 0.01)).unwrap();
        assert_eq!((update.round, update.task_id, update.nonce, update.examples), (t1.round, t1.task_id, t1.nonce, 7));

        assert!(!p.on_ack(TaskId(99)).unwrap(), "another task's ack");
        p.on_reject(Some(TaskId(98))).unwrap();
        assert_eq!(p.staged(), Some(TaskId(1)), "answers for other tasks change nothing");
        assert!(p.residual().unwrap().tensors().is_empty());

        // A newer task's result replaces the unanswered one; the old task's ack is now stale.
        let t2 = task(2, 2, &pool);
        p.finish(&t2, result(&start, 0.02)).unwrap();
        assert!(!p.on_ack(TaskId(1)).unwrap());
        assert!(p.on_ack(TaskId(2)).unwrap());
        let kept = p.residual().unwrap();
        assert!(kept.l2_norm() > 0.0, "top-25% left a residual");

        // A refused update leaves the acknowledged residual as it was.
        let t3 = task(3, 3, &pool);
        p.finish(&t3, result(&start, 0.5)).unwrap();
        p.on_reject(None).unwrap();
        assert_eq!(p.staged(), None);
        assert_eq!(p.residual().unwrap(), kept);
    }

    #[test]
    fn each_round_is_encoded_with_its_round_of_the_warm_up() {
        // Top-25% with a 2-round warm-up: round 1 keeps 0.25^(1/3) = 63%, round 2 40%, round 3
        // on 25% of each tensor (counted on the decoded upload's non-zero values).
        let pool = AdapterPool::init(&spec(), 1).unwrap();
        let mut p = participant(MemoryResidual::default());
        let codec = CodecConfig { top_k: Some(0.25), quantization: Quantization::F32, ..CodecConfig::default() };
        p.config.codec = CodecSchedule { codec, warmup_rounds: 2 };
        let mut kept = Vec::new();
        for round in 1..=4 {
            let t = task(round, round, &pool);
            let (start, _) = p.begin(&t).unwrap();
            let update = p.finish(&t, result(&start, 0.01)).unwrap();
            p.on_ack(t.task_id).unwrap();
            let sent = codec::decode(&update.delta, &DecodeLimits::for_spec(&spec())).unwrap();
            let total: usize = sent.tensors.values().map(|t| t.numel()).sum();
            let nonzero: usize = sent.tensors.values().map(|t| t.data().iter().filter(|v| **v != 0.0).count()).sum();
            kept.push(nonzero as f64 / total as f64);
        }
        assert!(kept[0] > kept[1] && kept[1] > kept[2], "the warm-up keeps less each round: {kept:?}");
        assert!((kept[2] - kept[3]).abs() < 0.05 && kept[2] < 0.35, "then top-k itself: {kept:?}");
    }

    #[test]
    fn an_update_under_a_grant_carries_the_granted_triplets_scores_only() {
        let pool = AdapterPool::init(&spec(), 1).unwrap();
        let mut p = participant(MemoryResidual::default());
        let mut t = task(1, 1, &pool);
        let target = "layer.0.attention.query";
        t.rank_budget = vec![TargetBudget { target: target.into(), rank: 1 }];
        let (start, _) = p.begin(&t).unwrap();
        let mut trained = result(&start, 0.01);
        trained.importance = vec![TripletImportance { target: target.into(), scores: vec![0.7, 0.0] }];
        let update = p.finish(&t, trained).unwrap();
        assert_eq!(update.importance[0].scores, vec![0.7], "the ungranted triplet's 0 is no score");
    }

    #[test]
    fn fedsa_keeps_b_with_the_client_and_uploads_the_rest() {
        let pool = AdapterPool::init(&spec(), 1).unwrap();
        let mut p = participant(MemoryResidual::default());
        p.config.lora_variant = LoraVariant::FedSa;
        p.config.codec = CodecConfig { top_k: None, quantization: Quantization::F32, ..CodecConfig::default() }.into();
        let b = "layer.0.attention.query.lora_B.weight";
        let t1 = task(1, 1, &pool);
        let (start, config) = p.begin(&t1).unwrap();
        assert_eq!(start, pool, "no personal B before the first round: the global's");
        assert_eq!(config.lora_train, LoraTrain::Both, "FedSA-LoRA trains both factors");
        let trained = result(&start, 0.01);
        let update = p.finish(&t1, trained.clone()).unwrap();
        let sent = codec::decode(&update.delta, &DecodeLimits::for_spec(&spec())).unwrap();
        assert!(!sent.tensors.contains_key(b), "B is never uploaded");
        assert_eq!(sent.tensors.len(), trained.delta.tensors.len() - 1, "A and the head are");
        assert!(p.personal().unwrap().is_empty(), "staged, not yet the client's");
        assert!(p.on_ack(t1.task_id).unwrap());
        let own = &p.personal().unwrap()[b];
        let expected: Vec<f32> =
            pool.tensors[b].data().iter().zip(trained.delta.tensors[b].data()).map(|(g, d)| g + d).collect();
        assert_eq!(own.data(), &expected[..], "the global's B plus its trained change");
        let residual = p.residual().unwrap();
        assert_eq!(residual.l2_norm(), 0.0, "a lossless upload leaves no residual");
        assert!(
            residual.tensors().keys().all(|k| !k.starts_with(PERSONAL_PREFIX)),
            "personal tensors are not residual"
        );

        // The next round, and its evaluation, start from the client's own B.
        let t2 = task(2, 2, &pool);
        let (start2, _) = p.begin(&t2).unwrap();
        assert_eq!(&start2.tensors[b], own);
        assert_eq!(start2.tensors.len(), pool.tensors.len());
        let eval = EvalTask { round: Round(2), task_id: TaskId(9), global: t2.global.clone(), deadline_ms: 1 };
        assert_eq!(&p.begin_eval(&eval).unwrap().tensors[b], own);
        // A refused round leaves the acknowledged B.
        p.finish(&t2, result(&start2, 0.5)).unwrap();
        p.on_reject(Some(t2.task_id)).unwrap();
        assert_eq!(&p.personal().unwrap()[b], own);
        // A second acknowledged round adds its change to the client's B, not the global's.
        let second = result(&start2, 0.02);
        p.finish(&t2, second.clone()).unwrap();
        assert!(p.on_ack(t2.task_id).unwrap());
        let expected: Vec<f32> = own.data().iter().zip(second.delta.tensors[b].data()).map(|(o, d)| o + d).collect();
        assert_eq!(p.personal().unwrap()[b].data(), &expected[..]);
    }

    #[test]
    fn a_failed_persist_keeps_both_residuals_and_the_ack_can_be_retried() {
        let pool = AdapterPool::init(&spec(), 1).unwrap();
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = fail.clone();
        let storage = MemoryResidual::default().persisted_by(Box::new(move |_| {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                Err(CheckpointError { path: "state/residual.safetensors".into(), problem: "disk full".into() })
            } else {
                Ok(())
            }
        }));
        let mut p = participant(storage);
        let t = task(1, 1, &pool);
        p.finish(&t, result(&pool, 0.01)).unwrap();
        assert!(p.on_ack(t.task_id).is_err(), "the persist error reaches the driver");
        assert!(p.residual().unwrap().tensors().is_empty(), "nothing unsaved became the residual");
        assert_eq!(p.staged(), Some(t.task_id));
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(p.on_ack(t.task_id).unwrap());
        assert!(p.residual().unwrap().l2_norm() > 0.0);
    }

    #[test]
    fn a_global_of_another_spec_is_the_tasks_fault() {
        let other = PoolSpec::lora(spec().targets, 1, 4.0, None);
        let global = codec::encode(
            &AdapterPool::init(&other, 1).unwrap().to_transfer(&other).unwrap(),
            &CodecConfig::default(),
            None,
            0,
        )
        .unwrap();
        let p = participant(MemoryResidual::default());
        let err = p.decode_global(Round(4), &global).unwrap_err();
        assert!(err.is_bad_task(), "{err}");
        assert!(err.to_string().contains("round 4"), "{err}");
    }
}
