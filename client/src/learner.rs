//! What a client learns with, whichever kind of backbone: a BERT encoder under a classification
//! head ([`crate::train`]) or a Llama decoder fine-tuned as a causal LM ([`crate::lm`]). The daemon
//! and the simulator hold a [`Learner`] and its [`Examples`] and call [`Learner::train`] and
//! [`Learner::evaluate`]: one code path for both drivers, whichever the model.
//!
//! The model path says which: a `.gguf` file is a decoder (its base kept quantized), a folder an
//! HF BERT checkpoint.

use std::path::Path;

use candle_core::Device;
use fedpool_common::adapter::{AdapterPool, PoolSpec};
use fedpool_common::BackboneFingerprint;

use crate::data::{DataOptions, DataSpec, Dataset};
use crate::device::{self, DeviceChoice};
use crate::lm::{evaluate_lm, train_lm, LmExample, LmTask, LmTokenizer};
use crate::model::{GgufFile, GgufWeights, LlamaModel};
use crate::setup::{Backbone, SetupError};
use crate::spec::{decoder_pool_spec, AdapterOptions};
use crate::train::{
    self, AdapterTensors, Encoded, EvalMetrics, QueryCache, Silent, TrainConfig, TrainData, TrainError, TrainOutcome,
};

/// A frozen backbone and what reads text for it.
pub enum Learner {
    /// A BERT encoder with its tokenizer: sequence classification.
    Encoder(Box<Backbone>),
    /// A Llama decoder with its GGUF tokenizer and chat format: causal-LM fine-tuning.
    Decoder(Box<Decoder>),
}

/// A decoder and how its data is asked and answered.
pub struct Decoder {
    /// The model, its base quantized.
    pub model: LlamaModel,
    /// The GGUF's tokenizer and chat format.
    pub tokenizer: LmTokenizer,
    /// How the data's examples become prompts and answers.
    pub task: LmTask,
    /// Longest prompt + response, in tokens.
    pub max_len: usize,
    /// SHA-256 of the GGUF file.
    pub fingerprint: BackboneFingerprint,
    /// The device, in words.
    pub device: String,
}

/// One client's examples, encoded for its learner.
#[derive(Debug, Clone)]
pub enum Examples {
    /// Token ids and labels (a classifier).
    Encoded(Vec<Encoded>),
    /// Prompt and response ids (a decoder).
    Lm(Vec<LmExample>),
}

impl Examples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Self::Encoded(rows) => rows.len(),
            Self::Lm(rows) => rows.len(),
        }
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples' ids, in order.
    pub fn ids(&self) -> Vec<u64> {
        match self {
            Self::Encoded(rows) => rows.iter().map(|e| e.id).collect(),
            Self::Lm(rows) => rows.iter().map(|e| e.id).collect(),
        }
    }

    /// The classifier's rows (an error naming the mismatch for a decoder's).
    pub fn encoded(&self) -> Result<&[Encoded], TrainError> {
        match self {
            Self::Encoded(rows) => Ok(rows),
            Self::Lm(_) => Err(TrainError::Input("a decoder's examples given to a classifier".into())),
        }
    }

    /// The examples of `parts`, one after another (all of one kind).
    pub fn concat<'a>(parts: impl IntoIterator<Item = &'a Examples>) -> Result<Examples, TrainError> {
        let mut out: Option<Examples> = None;
        for part in parts {
            match (&mut out, part) {
                (None, p) => out = Some(p.clone()),
                (Some(Self::Encoded(a)), Self::Encoded(b)) => a.extend(b.iter().cloned()),
                (Some(Self::Lm(a)), Self::Lm(b)) => a.extend(b.iter().cloned()),
                _ => return Err(mismatch()),
            }
        }
        Ok(out.unwrap_or(Self::Encoded(Vec::new())))
    }

    /// The first `n` examples.
    pub fn truncate(&mut self, n: usize) {
        match self {
            Self::Encoded(rows) => rows.truncate(n),
            Self::Lm(rows) => rows.truncate(n),
        }
    }
}

/// True when `path` names a decoder (a `.gguf` file).
pub fn is_decoder_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl Learner {
    /// Loads the backbone at `path` on `device` for the data `data` (whose task a decoder
    /// needs): a `.gguf` file as a decoder, an HF folder as an encoder; `max_len` bounds the rows.
    pub fn load(path: &Path, data: &DataSpec, device: DeviceChoice, max_len: usize) -> Result<Self, SetupError> {
        if !is_decoder_path(path) {
            return Ok(Self::Encoder(Box::new(Backbone::load(path, device, max_len)?)));
        }
        if !path.is_file() {
            return Err(SetupError::ModelNotFound(path.to_path_buf()));
        }
        let task = LmTask::for_spec(data).ok_or_else(|| {
            SetupError::Tokenize(TrainError::Input(format!(
                "data {data} has no generation task (use vader, trec, sms or a prompt/response file)"
            )))
        })?;
        let (opened, said) = device::open(device)?;
        let gguf = GgufFile::open(path)?;
        let tokenizer = LmTokenizer::from_gguf(&gguf)?;
        let model = LlamaModel::load_gguf(path, GgufWeights::Quantized, &opened)?;
        let fingerprint = BackboneFingerprint::of_model_path(path)
            .map_err(|source| SetupError::Fingerprint { dir: path.to_path_buf(), source })?;
        Ok(Self::Decoder(Box::new(Decoder { model, tokenizer, task, max_len, fingerprint, device: said })))
    }

    /// The loader options a data file of this learner needs beyond `given`: a decoder reads a
    /// file's `prompt` and `response` columns unless told otherwise.
    pub fn data_options(&self, given: &DataOptions) -> DataOptions {
        match self {
            Self::Decoder(d) if d.task == LmTask::Columns && *given == DataOptions::default() => LmTask::file_options(),
            _ => given.clone(),
        }
    }

    /// The backbone's fingerprint (what a client enrolls with).
    pub fn fingerprint(&self) -> BackboneFingerprint {
        match self {
            Self::Encoder(b) => b.fingerprint,
            Self::Decoder(d) => d.fingerprint,
        }
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Encoder(b) => b.model.device(),
            Self::Decoder(d) => d.model.device(),
        }
    }

    /// The device, in words.
    pub fn device_name(&self) -> &str {
        match self {
            Self::Encoder(b) => &b.device,
            Self::Decoder(d) => &d.device,
        }
    }

    /// Width of the hidden states (FedIns' query).
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Encoder(b) => b.model.config().hidden_size,
            Self::Decoder(d) => d.model.config().hidden_size,
        }
    }

    /// `set`'s examples encoded for this learner, in their order.
    pub fn encode(&self, set: &Dataset) -> Result<Examples, SetupError> {
        match self {
            Self::Encoder(b) => Ok(Examples::Encoded(b.encode(&set.examples)?)),
            Self::Decoder(d) => {
                let rows: Result<Vec<LmExample>, TrainError> =
                    d.task.pairs(set).iter().map(|p| d.tokenizer.encode_pair(p, d.max_len)).collect();
                Ok(Examples::Lm(rows.map_err(SetupError::Tokenize)?))
            }
        }
    }

    /// The pool layout of `options` on this backbone: a classifier's with a head of `num_labels`
    /// classes; a decoder's without a head (its LoRA modules default to q_proj, v_proj when
    /// `options` carry the encoder's default).
    pub fn pool_spec(&self, options: &AdapterOptions, num_labels: usize) -> Result<PoolSpec, SetupError> {
        match self {
            Self::Encoder(b) => b.pool_spec(options, num_labels),
            Self::Decoder(d) => Ok(decoder_pool_spec(d.model.config(), options)?),
        }
    }

    /// Trains `start` on `rows` with `config` (no held-out evaluation).
    pub fn train(
        &self,
        spec: &PoolSpec,
        start: &AdapterPool,
        rows: &Examples,
        queries: &mut QueryCache,
        config: &TrainConfig,
    ) -> Result<TrainOutcome, TrainError> {
        match (self, rows) {
            (Self::Encoder(b), Examples::Encoded(train)) => {
                let data = TrainData { train, eval: &[], pad_id: b.pad_id };
                train::train(&b.model, spec, start, data, queries, config, &mut Silent)
            }
            (Self::Decoder(d), Examples::Lm(train)) => {
                train_lm(&d.model, spec, start, train, &[], &d.tokenizer, config, &mut Silent)
            }
            _ => Err(mismatch()),
        }
    }

    /// Accuracy (a decoder's: exact match of the generated answers), macro-F1 and mean loss of
    /// `pool` on `rows`.
    pub fn evaluate(
        &self,
        spec: &PoolSpec,
        pool: &AdapterPool,
        rows: &Examples,
        queries: &mut QueryCache,
        config: &TrainConfig,
    ) -> Result<EvalMetrics, TrainError> {
        match (self, rows) {
            (Self::Encoder(b), Examples::Encoded(eval)) => {
                train::evaluate_pool(&b.model, spec, pool, eval, queries, config, b.pad_id)
            }
            (Self::Decoder(d), Examples::Lm(eval)) => {
                pool.validate(spec)?;
                let adapters = AdapterTensors::from_pool(spec, pool, false, d.model.device())?;
                let m = evaluate_lm(&d.model, &adapters, eval, &d.tokenizer, config.eval_batch_size, &mut Silent)?;
                Ok(EvalMetrics { accuracy: m.exact_match, macro_f1: m.macro_f1, loss: m.loss, examples: m.examples })
            }
            _ => Err(mismatch()),
        }
    }
}

fn mismatch() -> TrainError {
    TrainError::Input("the examples were encoded for another kind of backbone".into())
}
