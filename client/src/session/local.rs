//! The daemon's local work, as library calls on blocking threads (docs/design.md, principle 1: "local
//! training is a library call; the daemon only moves bytes"): the frozen backbone, the private
//! data (split into training and held-out examples once), the frozen-query cache kept across
//! rounds, and the error-feedback residual. A [`RoundTask`] becomes an [`Update`]; an
//! [`EvalTask`] becomes an [`EvalReport`]. Nothing of the data is in either: only the encoded
//! delta, counts and metrics. The protocol steps (decoding the global, the grant, encoding with
//! the residual, the `Update`, the residual's ack) are the [`Participant`]'s; this module trains.

use std::time::Instant;

use fedpool_common::checkpoint::CheckpointError;
use fedpool_common::wire::{EvalReport, EvalTask, RoundTask, TrainMetrics, Update};
use fedpool_common::TaskId;

use super::config::{ConfigError, DaemonConfig};
use super::residual::ResidualStore;
use crate::data::{load_spec, parse_spec, DataError, DataOptions};
use crate::learner::{Examples, Learner};
use crate::participant::{LocalResult, Participant, ParticipantConfig, ParticipantError};
use crate::setup::SetupError;
use crate::train::{self, QueryCache, TrainConfig};

/// Why local work failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A field of `client.toml` is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model, the device or the tokenizer could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The private data could not be loaded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The data leaves nothing to train on.
    #[error("data {data} leaves no training example{}", shard.as_ref().map_or(String::new(), |s| format!(" in shard {s}")))]
    NoTrainingData {
        /// The data source.
        data: String,
        /// The shard, if one was asked for.
        shard: Option<String>,
    },
    /// A protocol step failed (an unusable global pool, encoding, the residual).
    #[error(transparent)]
    Protocol(#[from] ParticipantError),
    /// Training or evaluation failed.
    #[error(transparent)]
    Train(#[from] train::TrainError),
    /// The saved residual could not be read.
    #[error(transparent)]
    Residual(#[from] CheckpointError),
}

impl LocalError {
    /// True when the error belongs to the server's task (an unusable global pool): the daemon
    /// abandons the task and keeps serving.
    pub fn is_bad_task(&self) -> bool {
        matches!(self, Self::Protocol(e) if e.is_bad_task())
    }
}

/// Everything local: model, data, caches, and the client's protocol state.
pub struct LocalWork {
    learner: Learner,
    train_rows: Examples,
    eval_rows: Examples,
    queries: QueryCache,
    participant: Participant,
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
        let data_spec = parse_spec(&config.data)?;
        let learner = Learner::load(&config.model, &data_spec, config.device_choice()?, config.train.max_len)?;
        tracing::info!("device: {}", learner.device_name());

        let options = DataOptions {
            text_column: config.text_column.clone(),
            label_column: config.label_column.clone(),
            labels: config.labels.clone(),
            ..DataOptions::default()
        };
        let mut dataset = load_spec(&config.data, &learner.data_options(&options))?;
        if let Some((k, n)) = config.shard()? {
            // `shard()` checked 0 <= k < n, so `Dataset::shard` (None only otherwise) gives one.
            if let Some(shard) = dataset.shard(k, n, config.seed) {
                dataset = shard;
            }
        }
        if let Some(max) = config.max_examples {
            dataset.examples.truncate(max);
        }
        let (train_set, mut test_set) = dataset.split(config.test_fraction, config.seed);
        if train_set.is_empty() {
            return Err(LocalError::NoTrainingData { data: config.data.clone(), shard: config.shard.clone() });
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
        let train_rows = learner.encode(&train_set)?;
        let eval_rows = learner.encode(&test_set)?;

        let options = config.adapter_options()?;
        let spec = learner.pool_spec(&options, dataset.num_labels())?;
        let residual_store = ResidualStore::new(&config.state_dir, spec.hash());
        let residual = residual_store.load()?;
        if !residual.tensors().is_empty() {
            tracing::info!(
                file = %residual_store.path().display(),
                l2 = residual.l2_norm(),
                "error-feedback residual restored"
            );
        }
        let participant = Participant::new(
            ParticipantConfig {
                spec,
                backbone: learner.fingerprint(),
                examples: train_rows.len() as u64,
                seed: config.seed,
                train: config.train.round_config(options.choice, config.seed),
                lora_variant: config.train.lora_variant,
                codec: config.upload_codec()?,
                declared_upload_bps: config.declared_upload_bps,
                declared_download_bps: config.declared_download_bps,
                software: format!("fedpool-client {}", env!("CARGO_PKG_VERSION")),
            },
            Box::new(residual_store.into_storage(residual)),
        );
        let queries = QueryCache::new(learner.hidden_size());
        Ok(Self { learner, train_rows, eval_rows, queries, participant })
    }

    /// The client's protocol state (spec, enrollment, staged residual).
    pub fn participant(&self) -> &Participant {
        &self.participant
    }

    /// Trains on the task's global pool for its local steps and returns the encoded update (its
    /// residual staged until the server answers: [`LocalWork::on_ack`]).
    pub fn train_task(&mut self, task: &RoundTask) -> Result<Update, LocalError> {
        let (start, config): (_, TrainConfig) = self.participant.begin(task)?;
        let spec = self.participant.spec();
        let outcome = self.learner.train(spec, &start, &self.train_rows, &mut self.queries, &config)?;
        let m = &outcome.metrics;
        let metrics = TrainMetrics {
            loss: m.train_loss as f32,
            accuracy: m.train_accuracy as f32,
            steps: m.steps as u32,
            seconds: m.train_seconds as f32,
        };
        let raw_bytes = outcome.delta.num_values() * 4;
        let update = self
            .participant
            .finish(task, LocalResult { delta: outcome.delta, metrics, importance: outcome.importance })?;
        tracing::info!(
            round = %task.round,
            steps = metrics.steps,
            loss = metrics.loss,
            seconds = metrics.seconds,
            raw_bytes,
            encoded_bytes = update.delta.wire_len(),
            "trained"
        );
        Ok(update)
    }

    /// The server acknowledged the update for `task`: its residual becomes the client's, on
    /// disk first. False when that update's residual is no longer the staged one.
    pub fn on_ack(&mut self, task: TaskId) -> Result<bool, LocalError> {
        Ok(self.participant.on_ack(task)?)
    }

    /// The server refused the update for `task`: its residual is dropped, the saved one stays.
    pub fn on_reject(&mut self, task: Option<TaskId>) -> Result<(), LocalError> {
        Ok(self.participant.on_reject(task)?)
    }

    /// Evaluates the task's global pool on the held-out examples.
    pub fn evaluate_task(&mut self, task: &EvalTask) -> Result<EvalReport, LocalError> {
        let t = Instant::now();
        let pool = self.participant.begin_eval(task)?;
        let config = &self.participant.config().train;
        let m = self.learner.evaluate(self.participant.spec(), &pool, &self.eval_rows, &mut self.queries, config)?;
        tracing::info!(
            round = %task.round,
            accuracy = m.accuracy,
            macro_f1 = m.macro_f1,
            examples = m.examples,
            seconds = t.elapsed().as_secs_f64(),
            "evaluated the global pool"
        );
        Ok(self.participant.finish_eval(task, m.to_wire()))
    }

    /// True when there are held-out examples to evaluate on.
    pub fn can_evaluate(&self) -> bool {
        !self.eval_rows.is_empty()
    }
}
