//! The local trainer: a frozen backbone, a pool of adapters, AdamW, and back a delta with metrics
//! and (for LoRA) AdaLoRA importance scores.
//!
//! ```text
//! train(model, spec, start pool, TrainData, TrainConfig, observer)
//!   → TrainOutcome { pool, delta (vs start, only used slots), metrics, importance, slot_usage }
//! ```
//! Library use is silent: progress goes to the [`Observer`] the caller passes ([`Silent`] for
//! none). The backbone's weights are plain tensors and never reach the optimizer.

mod batches;
mod forward;
mod importance;
mod metrics;
mod params;
mod queries;
mod schedule;
mod trainer;

pub use batches::{encode_examples, length_sorted_chunks, tokenizer_for_training, Batch, BatchOrder, Encoded};
pub use forward::{forward, forward_masked, head_features, Forward};
pub use importance::{orthogonality, ImportanceTracker, ADALORA_BETA1, ADALORA_BETA2, ORTH_REG_WEIGHT};
pub use metrics::{accuracy, macro_f1, EvalMetrics};

pub use params::{AdapterTensors, TrainableParams};
pub use queries::QueryCache;
pub use schedule::{Schedule, UnknownSchedule};
pub use trainer::{dropout_probability, evaluate, evaluate_pool, train, weight_decays};

use fedpool_common::adapter::{AdapterPool, PoolDelta, PoolError, SlotUsage};
use fedpool_common::wire::{TrainMetrics, TripletImportance};

use crate::model::ModelError;
use crate::tokenize::TokenizeError;

/// FedIns' weight of the key-matching surrogate in the loss (Feng et al. 2023, following L2P's
/// `pull_constraint_coeff`): λ = 0.1.
pub const FEDINS_LAMBDA: f64 = 0.1;

/// AdamW's decoupled weight decay of LoRA factors and LoRA heads: PyTorch's `AdamW` default, what
/// a PEFT run uses unless told otherwise. SSF specs never decay (it would pull γ toward 0, away
/// from the identity, and move a pooled head's unused slots).
pub const WEIGHT_DECAY: f64 = 0.01;

/// What went wrong while training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The backbone failed (bad input or hook shapes).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenization failed.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    /// The pool does not fit its spec.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A computation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// No training (or evaluation) examples.
    #[error("the {0} set is empty")]
    EmptyData(&'static str),
    /// An example's label is outside the head's classes.
    #[error("example {id} has label {label}, but the head has {num_labels} classes")]
    UnknownLabel {
        /// The example's id.
        id: u64,
        /// Its label.
        label: usize,
        /// The head's number of classes.
        num_labels: usize,
    },
    /// An example's query was not in the cache.
    #[error("no cached query for example {0}")]
    MissingQuery(u64),
    /// The loss became NaN or infinite.
    #[error("the loss is not finite at step {0} (learning rate too high?)")]
    Diverged(usize),
    /// Anything else malformed in the inputs or the configuration.
    #[error("{0}")]
    Input(String),
}

/// Which LoRA factors a run trains (and uploads): the others stay frozen at the start's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum LoraTrain {
    /// A and B (and AdaLoRA's E).
    #[default]
    Both,
    /// Only B (A frozen).
    BOnly,
    /// Only A (B frozen).
    AOnly,
}

/// The federated LoRA variant: which factors train in which round. Cheap variants of
/// FedAvg-LoRA that keep averaging exact for what moves (averaging one factor while the other is
/// shared and frozen makes avg(B)·A = avg(B·A)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraVariant {
    /// Both factors every round (FedIT / FedAvg-LoRA).
    #[default]
    Both,
    /// FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared random initialisation, only B
    /// trained and uploaded (half the bytes of r·(d_in + d_out) when d_in = d_out).
    Ffa,
    /// RoLoRA (Chen et al. 2024): alternate by round — odd rounds train B (A frozen), even rounds
    /// train A (B frozen); each upload carries only the factor that moved.
    RoLora,
    /// FedSA-LoRA (Guo et al., ICLR 2025): both factors train every round, only A (and the head)
    /// is uploaded and averaged; each client keeps its own B across rounds (personalised: its
    /// model is the global A and head with its own B).
    FedSa,
}

impl LoraTrain {
    /// True when tensor `name` is a LoRA factor this setting keeps frozen.
    pub fn freezes(self, name: &str) -> bool {
        match self {
            LoraTrain::Both => false,
            LoraTrain::BOnly => name.ends_with(".lora_A.weight") || name.ends_with(".lora_E.weight"),
            LoraTrain::AOnly => name.ends_with(".lora_B.weight") || name.ends_with(".lora_E.weight"),
        }
    }

    /// `delta` without the frozen factors (they did not move: nothing to upload).
    pub fn drop_frozen(self, delta: &mut PoolDelta) {
        delta.tensors.retain(|name, _| !self.freezes(name));
    }
}

impl LoraVariant {
    /// The variant's name in configuration files: `both`, `ffa`, `rolora`, `fedsa`.
    pub fn name(self) -> &'static str {
        match self {
            LoraVariant::Both => "both",
            LoraVariant::Ffa => "ffa",
            LoraVariant::RoLora => "rolora",
            LoraVariant::FedSa => "fedsa",
        }
    }

    /// Refuses a variant the adapter cannot train: every variant but `both` works on standard
    /// LoRA's two factors only (`adapter` is the configured choice).
    pub fn check_adapter(self, adapter: crate::spec::AdapterChoice) -> Result<(), String> {
        if self == LoraVariant::Both || adapter == crate::spec::AdapterChoice::Lora {
            return Ok(());
        }
        Err(format!("lora_variant {:?} needs standard LoRA (adapter lora), not {adapter:?}", self.name()))
    }

    /// True when tensor `name` stays with the client and is never uploaded (FedSA-LoRA's B).
    pub fn keeps_local(self, name: &str) -> bool {
        self == LoraVariant::FedSa && name.ends_with(".lora_B.weight")
    }

    /// The factors trained in `round` (1 is the first).
    pub fn factors(self, round: u64) -> LoraTrain {
        match self {
            LoraVariant::Both | LoraVariant::FedSa => LoraTrain::Both,
            LoraVariant::Ffa => LoraTrain::BOnly,
            LoraVariant::RoLora if round % 2 == 1 => LoraTrain::BOnly,
            LoraVariant::RoLora => LoraTrain::AOnly,
        }
    }
}

impl std::str::FromStr for LoraVariant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [LoraVariant::Both, LoraVariant::Ffa, LoraVariant::RoLora, LoraVariant::FedSa]
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("unknown LoRA variant {s:?}: expected both, ffa, rolora or fedsa"))
    }
}

/// How to train.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate of AdamW for the adapters.
    pub lr: f64,
    /// Peak learning rate of the classification head (None: `lr`). A head learns at its own pace
    /// whatever the adapter, so comparisons between adapters can hold it fixed.
    pub head_lr: Option<f64>,
    /// Steps of linear warmup from 0.
    pub warmup_steps: usize,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// Longest input in tokens (truncation; every example must fit).
    pub max_len: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// FedIns' λ for the key-matching term (SSF pools with selection).
    pub lambda_match: f64,
    /// Weight of AdaLoRA's orthogonality regulariser (LoRA).
    pub orth_reg_weight: f64,
    /// Examples per evaluation batch (and per query-cache batch).
    pub eval_batch_size: usize,
    /// Train the head only (the linear probe): the backbone runs without adapters.
    pub head_only: bool,
    /// Dropout probability while training (None: the model's `hidden_dropout_prob`).
    pub dropout: Option<f64>,
    /// AdamW's decoupled weight decay of LoRA factors and their head ([`WEIGHT_DECAY`]; none in
    /// SSF specs).
    pub weight_decay: f64,
    /// Evaluate on the held-out examples every this many steps as well as at the end (a learning
    /// curve in [`TrainReport::curve`]); None: only at the end.
    pub eval_every: Option<usize>,
    /// Which LoRA factors train and are uploaded (LoRA specs; the round's [`LoraVariant`]).
    pub lora_train: LoraTrain,
    /// Gradient checkpointing (decoders): keep only each layer's input from the forward pass and
    /// recompute the layer in the backward, one layer's activations alive at a time, for about
    /// one more forward pass of compute.
    pub checkpoint_layers: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            batch_size: 32,
            lr: 5e-3,
            head_lr: None,
            warmup_steps: 30,
            schedule: Schedule::Linear,
            max_len: 64,
            seed: 0,
            lambda_match: FEDINS_LAMBDA,
            orth_reg_weight: ORTH_REG_WEIGHT,
            eval_batch_size: 64,
            head_only: false,
            dropout: None,
            weight_decay: WEIGHT_DECAY,
            eval_every: None,
            lora_train: LoraTrain::Both,
            checkpoint_layers: false,
        }
    }
}

/// The examples to train and evaluate on.
#[derive(Debug, Clone, Copy)]
pub struct TrainData<'a> {
    /// Training examples.
    pub train: &'a [Encoded],
    /// Held-out examples (may be empty: no evaluation).
    pub eval: &'a [Encoded],
    /// The token id padding uses (masked, so any valid id works).
    pub pad_id: u32,
}

/// A phase of a training run, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Computing the frozen queries (features) of examples not cached yet.
    Queries,
    /// Optimizer steps.
    Train,
    /// Evaluation on the held-out examples.
    Eval,
}

/// Receives progress; every method has an empty default.
pub trait Observer {
    /// A phase starts with `total` units of work (examples or steps).
    fn phase(&mut self, _phase: Phase, _total: usize) {}
    /// `done` units of the current phase are finished; `loss` is the last step's loss in training.
    fn progress(&mut self, _done: usize, _loss: Option<f32>) {}
    /// The current phase is finished.
    fn finish(&mut self) {}
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Observer for Silent {}

/// Which slots an SSF pool used and how evenly.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SlotReport {
    /// Selections per slot over training (all slots, unused ones 0); sums to samples seen × k.
    pub counts: Vec<u64>,
    /// Entropy of the usage distribution in bits (log2 P if even; log2 k if collapsed).
    pub entropy_bits: f64,
    /// log2 P, the entropy of perfectly even use.
    pub max_entropy_bits: f64,
    /// Slots used at least once.
    pub used_slots: usize,
    /// Selections per slot over the held-out set with the trained keys.
    pub eval_counts: Vec<u64>,
}

impl SlotReport {
    /// The report of a run's training selections (`counter`) over `pool_size` slots, with the
    /// held-out set's `eval_counts`.
    pub fn new(counter: &crate::select::SlotCounter, pool_size: usize, eval_counts: Vec<u64>) -> Self {
        Self {
            counts: counter.counts().to_vec(),
            entropy_bits: counter.entropy_bits(),
            max_entropy_bits: (pool_size as f64).log2(),
            used_slots: counter.counts().iter().filter(|&&c| c > 0).count(),
            eval_counts,
        }
    }
}

/// One point of a learning curve: the held-out metrics after `step` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    /// Optimizer steps taken.
    pub step: usize,
    /// Held-out accuracy.
    pub accuracy: f64,
    /// Held-out macro-F1.
    pub macro_f1: f64,
    /// Held-out mean cross-entropy.
    pub loss: f64,
}

/// Numbers from one training run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainReport {
    /// Held-out accuracy (0 when there is no held-out set).
    pub accuracy: f64,
    /// Held-out macro-F1.
    pub macro_f1: f64,
    /// Held-out mean cross-entropy.
    pub eval_loss: f64,
    /// Held-out examples.
    pub eval_examples: usize,
    /// Training examples available.
    pub examples: usize,
    /// Mean training loss over the steps.
    pub train_loss: f64,
    /// Training accuracy over the steps (on the batches as they were trained).
    pub train_accuracy: f64,
    /// Optimizer steps run.
    pub steps: usize,
    /// Training rows processed (steps × batch).
    pub samples_seen: usize,
    /// Seconds of the whole call (queries, training, evaluation).
    pub wall_seconds: f64,
    /// Seconds computing frozen queries (held-out ones before training, new training rows' during it).
    pub query_seconds: f64,
    /// Seconds of the training loop (batches, the queries of new rows, forward, backward, update).
    pub train_seconds: f64,
    /// Seconds of evaluation.
    pub eval_seconds: f64,
    /// Training rows per second of `train_seconds`.
    pub samples_per_second: f64,
    /// Held-out metrics every `eval_every` steps (empty without it); the last point is the end.
    pub curve: Vec<CurvePoint>,
}

impl TrainReport {
    /// The metrics a client reports with its update.
    pub fn to_wire(&self) -> TrainMetrics {
        TrainMetrics {
            loss: self.train_loss as f32,
            accuracy: self.train_accuracy as f32,
            steps: self.steps as u32,
            seconds: self.train_seconds as f32,
        }
    }
}

/// Everything a training run produces.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The trained pool (all slots, full ranks).
    pub pool: AdapterPool,
    /// `pool − start`, restricted to the used slots in SSF pools (ready to encode and send).
    pub delta: PoolDelta,
    /// Loss, accuracy, timing.
    pub metrics: TrainReport,
    /// AdaLoRA triplet scores, one entry per LoRA target (empty for SSF).
    pub importance: Vec<TripletImportance>,
    /// Slot usage of SSF pools with selection.
    pub slot_usage: Option<SlotReport>,
    /// The used slots and their counts as the delta carries them (SSF specs).
    pub usage: Option<SlotUsage>,
}
