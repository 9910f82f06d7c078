//! The daemon's local work, as library calls on blocking threads (DESIGN.md principle 1: "local
//! training is a library call; the daemon only moves bytes"): the frozen backbone, the private
//! data (split into training and held-out examples once), the frozen-query cache kept across
//! rounds, and the error-feedback residual. A [`RoundTask`] becomes an [`Update`]; an
//! [`EvalTask`] becomes an [`EvalReport`]. Nothing of the data is in either: only the encoded
//! delta, counts and metrics.

use std::time::Instant;

use fedpool_common::adapter::{AdapterPool, PoolSpec};
use fedpool_common::codec::EncodedDelta;
use fedpool_common::codec::{self, CodecConfig, DecodeLimits, ErrorFeedback};
use fedpool_common::wire::{Enroll, EvalReport, EvalTask, RoundTask, TrainMetrics, Update, PROTOCOL_VERSION};
use fedpool_common::BackboneFingerprint;

use super::config::DaemonConfig;
use super::residual::ResidualStore;
use crate::data::{load_spec, DataOptions};
use crate::device;
use crate::model::BertEncoder;
use crate::spec::pool_spec;
use crate::train::{
    self, encode_examples, tokenizer_for_training, Encoded, LoraVariant, QueryCache, Silent, TrainConfig,
};

/// Why local work failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Setting up (model, data, device, spec) failed.
    #[error("{0}")]
    Setup(String),
    /// The task's global pool could not be decoded or does not fit the spec.
    #[error("the server's global pool of round {round} is unusable: {problem}")]
    BadGlobal {
        /// The round.
        round: fedpool_common::Round,
        /// What was wrong.
        problem: String,
    },
    /// Training or evaluation failed.
    #[error(transparent)]
    Train(#[from] train::TrainError),
    /// The delta could not be encoded.
    #[error("encoding the update: {0}")]
    Encode(String),
    /// The residual could not be read or written.
    #[error(transparent)]
    Residual(#[from] fedpool_common::checkpoint::CheckpointError),
}

/// A trained update, and the residual to keep once the server acknowledges it.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The message to upload.
    pub update: Update,
    /// The error-feedback residual after this update.
    pub residual: ErrorFeedback,
}

/// Everything local: model, data, caches, residual.
pub struct LocalWork {
    model: BertEncoder,
    spec: PoolSpec,
    fingerprint: BackboneFingerprint,
    train_rows: Vec<Encoded>,
    eval_rows: Vec<Encoded>,
    pad_id: u32,
    queries: QueryCache,
    train_config: TrainConfig,
    /// Which LoRA factors train in which round.
    lora_variant: LoraVariant,
    codec: CodecConfig,
    residual: ErrorFeedback,
    residual_store: ResidualStore,
    declared: (Option<u64>, Option<u64>),
    seed: u64,
}

impl std::fmt::Debug for LocalWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWork")
            .field("train", &self.train_rows.len())
            .field("eval", &self.eval_rows.len())
            .finish_non_exhaustive()
    }
}

impl LocalWork {
    /// Loads the backbone and the data, splits it, and reads the saved residual.
    pub fn load(config: &DaemonConfig) -> Result<Self, LocalError> {
        let setup = |e: &dyn std::fmt::Display| LocalError::Setup(e.to_string());
        if !config.model.is_dir() {
            return Err(LocalError::Setup(format!("model folder {} not found", config.model.display())));
        }
        let choice = config.device_choice().map_err(|e| setup(&e))?;
        let (device, said) = device::open(choice).map_err(|e| setup(&e))?;
        tracing::info!("device: {said}");
        let model = BertEncoder::load(&config.model, &device).map_err(|e| setup(&e))?;
        let fingerprint = BackboneFingerprint::of_model_dir(&config.model)
            .map_err(|e| LocalError::Setup(format!("{}: {e}", config.model.display())))?;

        let options = DataOptions {
            text_column: config.text_column.clone(),
            label_column: config.label_column.clone(),
            labels: config.labels.clone(),
            ..DataOptions::default()
        };
        let mut dataset = load_spec(&config.data, &options).map_err(|e| setup(&e))?;
        if let Some((k, n)) = config.shard().map_err(|e| setup(&e))? {
            dataset =
                dataset.shard(k, n, config.seed).ok_or_else(|| LocalError::Setup(format!("bad shard {k}/{n}")))?;
        }
        if let Some(max) = config.max_examples {
            dataset.examples.truncate(max);
        }
        let (train_set, mut test_set) = dataset.split(config.test_fraction, config.seed);
        if train_set.is_empty() {
            return Err(LocalError::Setup(format!("data {} leaves no training example", config.data)));
        }
        if let Some(max) = config.eval_max_examples {
            test_set.examples.truncate(max);
        }
        tracing::info!(
            "data {}: {} training and {} held-out examples, {} labels",
            config.data,
            train_set.len(),
            test_set.len(),
            dataset.num_labels()
        );

        let max_len = config.train.max_len;
        let tokenizer = tokenizer_for_training(&config.model.join("tokenizer.json"), max_len).map_err(|e| setup(&e))?;
        let pad_id = tokenizer.inner().get_padding().map_or(0, |p| p.pad_id);
        let encode = |set: &crate::data::Dataset| {
            encode_examples(&tokenizer, set.examples.iter().map(|e| (e.id, e.text.as_str(), e.label)))
        };
        let train_rows = encode(&train_set).map_err(|e| setup(&e))?;
        let eval_rows = encode(&test_set).map_err(|e| setup(&e))?;

        let options = config.adapter_options().map_err(|e| setup(&e))?;
        let spec = pool_spec(model.config(), &options, dataset.num_labels()).map_err(|e| setup(&e))?;
        let train_config = config.train.round_config(options.choice, config.seed);
        let residual_store = ResidualStore::new(&config.state_dir, spec.hash());
        let residual = residual_store.load()?;
        if !residual.tensors().is_empty() {
            tracing::info!(
                file = %residual_store.path().display(),
                l2 = residual.l2_norm(),
                "error-feedback residual restored"
            );
        }
        let queries = QueryCache::new(model.config().hidden_size);
        Ok(Self {
            model,
            spec,
            fingerprint,
            train_rows,
            eval_rows,
            pad_id,
            queries,
            train_config,
            lora_variant: config.train.lora_variant,
            codec: config.upload_codec().map_err(|e| setup(&e))?,
            residual,
            residual_store,
            declared: (config.declared_upload_bps, config.declared_download_bps),
            seed: config.seed,
        })
    }

    /// The pool layout this client trains.
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// The residual as last acknowledged.
    pub fn residual(&self) -> &ErrorFeedback {
        &self.residual
    }

    /// Training examples held.
    pub fn training_examples(&self) -> usize {
        self.train_rows.len()
    }

    /// The enrollment message: protocol, backbone fingerprint, spec hash, counts.
    pub fn enroll_message(&self) -> Enroll {
        Enroll {
            protocol_version: PROTOCOL_VERSION,
            backbone: self.fingerprint,
            spec_hash: self.spec.hash(),
            declared_upload_bps: self.declared.0,
            declared_download_bps: self.declared.1,
            examples: self.train_rows.len() as u64,
            software: format!("fedpool-client {}", env!("CARGO_PKG_VERSION")),
        }
    }

    fn decode_global(&self, round: fedpool_common::Round, global: &EncodedDelta) -> Result<AdapterPool, LocalError> {
        let bad = |p: String| LocalError::BadGlobal { round, problem: p };
        let limits = DecodeLimits {
            max_values: self.spec.num_params() as u64,
            max_raw_bytes: self.spec.num_params() as u64 * 8 + (1 << 20),
        };
        let delta = codec::decode(global, &limits).map_err(|e| bad(e.to_string()))?;
        AdapterPool::from_transfer(&delta, &self.spec).map_err(|e| bad(e.to_string()))
    }

    /// Trains on the task's global pool for its local steps and encodes the delta (with the
    /// residual added in and the new residual returned, not yet saved).
    pub fn train_task(&mut self, task: &RoundTask) -> Result<Trained, LocalError> {
        let start = self.decode_global(task.round, &task.global)?;
        let config = TrainConfig {
            steps: task.local_steps.max(1) as usize,
            // A new batch order every round.
            seed: self.seed ^ task.round.0.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            lora_train: self.lora_variant.factors(task.round.0),
            ..self.train_config.clone()
        };
        let data = train::TrainData { train: &self.train_rows, eval: &[], pad_id: self.pad_id };
        let outcome = train::train(&self.model, &self.spec, &start, data, &mut self.queries, &config, &mut Silent)?;
        // Under a rank budget only the granted triplets are sent (the others were not sent to
        // this client either: they are zero and stayed zero in training).
        let delta = if task.rank_budget.is_empty() {
            outcome.delta
        } else {
            outcome
                .delta
                .truncate_lora(&self.spec, &task.granted_ranks())
                .map_err(|e| LocalError::Encode(e.to_string()))?
        };
        let raw_bytes = delta.num_values() * 4;
        let mut residual = self.residual.clone();
        let delta = codec::encode(&delta, &self.codec, Some(&mut residual), task.task_id.0 ^ self.seed)
            .map_err(|e| LocalError::Encode(e.to_string()))?;
        let m = &outcome.metrics;
        tracing::info!(
            round = %task.round,
            steps = m.steps,
            loss = m.train_loss,
            seconds = m.train_seconds,
            raw_bytes,
            encoded_bytes = delta.wire_len(),
            "trained"
        );
        let update = Update {
            round: task.round,
            task_id: task.task_id,
            nonce: task.nonce,
            examples: self.train_rows.len() as u64,
            delta,
            metrics: TrainMetrics {
                loss: m.train_loss as f32,
                accuracy: m.train_accuracy as f32,
                steps: m.steps as u32,
                seconds: m.train_seconds as f32,
            },
            importance: outcome.importance,
        };
        Ok(Trained { update, residual })
    }

    /// The server acknowledged the update that left `residual`: keep it, on disk first.
    pub fn commit_residual(&mut self, residual: ErrorFeedback) -> Result<(), LocalError> {
        self.residual_store.save(&residual)?;
        self.residual = residual;
        Ok(())
    }

    /// Evaluates the task's global pool on the held-out examples.
    pub fn evaluate_task(&mut self, task: &EvalTask) -> Result<EvalReport, LocalError> {
        let t = Instant::now();
        let pool = self.decode_global(task.round, &task.global)?;
        let m = train::evaluate_pool(
            &self.model,
            &self.spec,
            &pool,
            &self.eval_rows,
            &mut self.queries,
            &self.train_config,
            self.pad_id,
        )?;
        tracing::info!(
            round = %task.round,
            accuracy = m.accuracy,
            macro_f1 = m.macro_f1,
            examples = m.examples,
            seconds = t.elapsed().as_secs_f64(),
            "evaluated the global pool"
        );
        Ok(EvalReport { round: task.round, task_id: task.task_id, metrics: m.to_wire() })
    }

    /// True when there are held-out examples to evaluate on.
    pub fn can_evaluate(&self) -> bool {
        !self.eval_rows.is_empty()
    }
}
