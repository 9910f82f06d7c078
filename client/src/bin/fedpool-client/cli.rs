//! The `fedpool-client` command line: the argument definitions, the commands (`train`, `eval`,
//! `spec`, `peft`), the progress bar and the query-cache file. Only the binary knows argument
//! parsing (as in ripgrep); the commands call the library with typed options: the backbone and
//! encoded rows from [`fedpool_client::setup`], training from [`fedpool_client::train`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use fedpool_common::adapter::{AdapterKind, AdapterPool, InitOptions, PoolSpec, Pooling};
use fedpool_common::checkpoint::{
    atomic_write, read_pool, read_tensors, write_pool, write_tensors, CheckpointError, CheckpointMeta,
};
use fedpool_common::ids::{BackboneFingerprint, Round, Sha256};
use fedpool_common::tensor::HostTensor;
use fedpool_common::wire::TripletImportance;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use fedpool_client::data::{load_spec, DataError, DataOptions, Dataset};
use fedpool_client::device::DeviceChoice;
use fedpool_client::model::{BertConfig, GgufFile, LlamaConfig, ModelError};
use fedpool_client::setup::{self, default_lr, default_model_dir, Backbone, SetupError};
use fedpool_client::spec::{
    pool_spec, AdapterChoice, AdapterOptions, OptionsError, DEFAULT_LORA_ALPHA, DEFAULT_LORA_RANK,
};
use fedpool_client::train::{
    self, Encoded, EvalMetrics, Observer, Phase, QueryCache, Schedule, SlotReport, TrainConfig, TrainData, TrainError,
    TrainReport,
};

/// fedpool's client: local fine-tuning of adapters on a frozen backbone.
#[derive(Debug, Parser)]
#[command(name = "fedpool-client", version, about)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Fine-tune an adapter locally (no server) and write DIR/adapter.safetensors and
    /// DIR/metrics.json.
    Train(TrainArgs),
    /// Evaluate an adapter checkpoint on a dataset: accuracy, macro-F1, loss.
    Eval(EvalArgs),
    /// Write the pool spec (JSON) that `train` uses for a model and adapter options, e.g. for the
    /// server's spec_file.
    Spec(SpecArgs),
    /// Run the client daemon: join the federation in client.toml, train and evaluate on the
    /// server's tasks, upload compressed deltas; reconnects by itself; stops on SIGINT/SIGTERM.
    Run(RunArgs),
    /// Convert between fedpool checkpoints and HF PEFT adapters (LoRA or AdaLoRA of a BERT
    /// sequence classifier with HF's pooler head, pooling = cls-pooler; LoRA of a Llama causal
    /// LM, from `lm` or a decoder federation).
    #[command(subcommand)]
    Peft(PeftCommand),
    /// Fine-tune adapters of a decoder LLM (a GGUF file, its base kept 4-bit) on prompt/response
    /// pairs, the loss on the responses only; compare exact match and perplexity with the
    /// zero-shot base; write DIR/adapter.safetensors and DIR/metrics.json.
    Lm(crate::lm::LmArgs),
    /// Make this client's private key and a certificate signing request (DIR/client.key, mode
    /// 0600, and DIR/client.csr, subject CN = NAME); the coordinator signs the request with
    /// `fedpool-server certs sign --csr`, so the key never leaves this machine.
    Keygen(crate::keygen::KeygenArgs),
}

/// `fedpool-client peft` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum PeftCommand {
    /// Read a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) and write it
    /// as a fedpool checkpoint (evaluate it with `eval`, or start a federation from it).
    Import(PeftImportArgs),
    /// Write a fedpool checkpoint (`train`'s adapter.safetensors or a server's round file) as a
    /// PEFT adapter folder: `PeftModel.from_pretrained(BertForSequenceClassification...)` loads it.
    Export(PeftExportArgs),
}

/// `fedpool-client peft import` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct PeftImportArgs {
    /// The PEFT adapter folder
    #[arg(long, value_name = "DIR")]
    pub(crate) peft: PathBuf,
    /// HF model folder the adapter was trained on, or a decoder's .gguf file (a CAUSAL_LM
    /// adapter) [default: $FEDPOOL_ASSETS/minilm]
    #[arg(long, value_name = "PATH")]
    pub(crate) model: Option<PathBuf>,
    /// The fedpool checkpoint to write
    #[arg(long, value_name = "FILE")]
    pub(crate) out: PathBuf,
}

/// `fedpool-client peft export` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct PeftExportArgs {
    /// The fedpool checkpoint
    #[arg(long, value_name = "FILE")]
    pub(crate) adapter: PathBuf,
    /// The base model's name or path written into adapter_config.json
    #[arg(long, default_value = "sentence-transformers/all-MiniLM-L6-v2")]
    pub(crate) base_model: String,
    /// The PEFT adapter folder to write (created)
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
}

/// `fedpool-client run` options.
#[derive(Debug, Clone, Args)]
#[command(after_help = fedpool_client::session::CONFIG_HELP)]
pub(crate) struct RunArgs {
    /// The daemon's configuration file (see client/client.example.toml and below)
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
}

/// `fedpool-client train` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct TrainArgs {
    /// HF model folder (config.json, model.safetensors, tokenizer.json) [default:
    /// $FEDPOOL_ASSETS/minilm, else ./assets/minilm]
    #[arg(long, value_name = "DIR")]
    pub(crate) model: Option<PathBuf>,
    /// Data SPEC: a CSV/TSV/JSONL file with text and label columns, or a built-in name (vader,
    /// vader:tweets,amazonReviewSnippets, trec, trec-fine, sms)
    #[arg(long, value_name = "SPEC")]
    pub(crate) data: String,
    /// The adapter and its sizes.
    #[command(flatten)]
    pub(crate) adapter: AdapterArgs,
    /// Optimizer steps
    #[arg(long, default_value_t = 300)]
    pub(crate) steps: usize,
    /// Examples per step
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    /// Peak learning rate of AdamW [default: 5e-3 for SSF and LoRA, 2e-3 for AdaLoRA, 1e-2 for the linear probe; docs/issue14/defaults.md]
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Peak learning rate of the classification head [default: --lr]
    #[arg(long)]
    pub(crate) head_lr: Option<f64>,
    /// Dropout while training, at HF BERT's hidden-state sites and before the head [default:
    /// the model's hidden_dropout_prob]
    #[arg(long)]
    pub(crate) dropout: Option<f64>,
    /// AdamW's decoupled weight decay of LoRA factors and their head (lora, adalora; SSF adapters
    /// never decay)
    #[arg(long, default_value_t = train::WEIGHT_DECAY)]
    pub(crate) weight_decay: f64,
    /// Also evaluate on the held-out part every N steps (a learning curve in metrics.json)
    #[arg(long, value_name = "N")]
    pub(crate) eval_every: Option<usize>,
    /// Linear warmup steps [default: 10% of --steps]
    #[arg(long)]
    pub(crate) warmup_steps: Option<usize>,
    /// Learning-rate decay after warmup: linear, cosine or constant
    #[arg(long, default_value = "linear")]
    pub(crate) schedule: Schedule,
    /// Longest input in tokens (longer texts are truncated)
    #[arg(long, default_value_t = 64)]
    pub(crate) max_len: usize,
    /// Fraction of the data held out for evaluation (stratified by label)
    #[arg(long, default_value_t = 0.2)]
    pub(crate) test_fraction: f64,
    /// Seed of the split, the initialisation and the batch order
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Device: cpu, cuda:N, or auto (a GPU if built with --features cuda and present)
    #[arg(long, default_value = "auto")]
    pub(crate) device: DeviceChoice,
    /// Weight of the key-matching term in the loss (FedIns' lambda; ssf-pool)
    #[arg(long, default_value_t = train::FEDINS_LAMBDA)]
    pub(crate) lambda_match: f64,
    /// The columns and labels of a data file.
    #[command(flatten)]
    pub(crate) columns: ColumnArgs,
    /// Folder to cache the frozen features (queries) in, keyed by model and data
    #[arg(long, value_name = "DIR")]
    pub(crate) query_cache: Option<PathBuf>,
    /// Output folder (created): adapter.safetensors and metrics.json
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
}

/// The adapter options of `fedpool-client train` and `fedpool-client spec`.
#[derive(Debug, Clone, Args)]
pub(crate) struct AdapterArgs {
    /// Adapter: ssf-pool (FedIns SSF pool, per-instance selection), ssf (plain SSF), lora (PEFT's
    /// standard B·A form), adalora (AdaLoRA's SVD form, for rank budgets) or linear-probe (head
    /// only, frozen backbone)
    #[arg(long = "adapter", value_name = "ADAPTER", default_value = "ssf-pool")]
    pub(crate) choice: AdapterChoice,
    /// Slots per SSF pool (ssf-pool)
    #[arg(long, default_value_t = fedpool_common::adapter::FEDINS_POOL_SIZE)]
    pub(crate) pool_size: usize,
    /// Slots mixed per example (ssf-pool)
    #[arg(long, default_value_t = fedpool_common::adapter::FEDINS_TOP_K)]
    pub(crate) top_k: usize,
    /// LoRA rank r (lora)
    #[arg(long, default_value_t = DEFAULT_LORA_RANK)]
    pub(crate) rank: usize,
    /// LoRA alpha: the update is scaled by alpha / r (lora)
    #[arg(long, default_value_t = DEFAULT_LORA_ALPHA)]
    pub(crate) alpha: f32,
    /// LoRA modules within each layer, comma-separated (lora, adalora)
    #[arg(long, value_delimiter = ',', default_value = "attention.self.query,attention.self.value")]
    pub(crate) lora_modules: Vec<String>,
    /// The feature the head reads: mean (masked mean of the last hidden state) or cls-pooler
    /// (HF BertForSequenceClassification's frozen pretrained pooler on [CLS])
    #[arg(long, default_value = "mean")]
    pub(crate) pooling: Pooling,
}

impl AdapterArgs {
    /// The options [`pool_spec`] takes.
    fn options(&self) -> AdapterOptions {
        AdapterOptions {
            choice: self.choice,
            pool_size: self.pool_size,
            top_k: self.top_k,
            rank: self.rank,
            alpha: self.alpha,
            lora_modules: self.lora_modules.clone(),
            pooling: self.pooling,
        }
    }
}

/// The columns and labels of a data file (`train` and `eval`; the built-in datasets ignore them).
#[derive(Debug, Clone, Args)]
pub(crate) struct ColumnArgs {
    /// Text column of a data file
    #[arg(long, default_value = "text")]
    pub(crate) text_column: String,
    /// Label column of a data file
    #[arg(long, default_value = "label")]
    pub(crate) label_column: String,
    /// The labels of a data file in index order, comma-separated (others are an error)
    #[arg(long, value_delimiter = ',')]
    pub(crate) labels: Option<Vec<String>>,
}

impl ColumnArgs {
    /// The loader options these columns give.
    fn data_options(&self) -> DataOptions {
        DataOptions {
            text_column: self.text_column.clone(),
            label_column: self.label_column.clone(),
            labels: self.labels.clone(),
            ..DataOptions::default()
        }
    }
}

/// `fedpool-client eval` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct EvalArgs {
    /// HF model folder (config.json, model.safetensors, tokenizer.json) [default:
    /// $FEDPOOL_ASSETS/minilm, else ./assets/minilm]
    #[arg(long, value_name = "DIR")]
    pub(crate) model: Option<PathBuf>,
    /// Pool checkpoint to evaluate: a server's state/round-NNNNNN.safetensors or the
    /// adapter.safetensors of `fedpool-client train`
    #[arg(long, value_name = "FILE")]
    pub(crate) adapter: PathBuf,
    /// Data SPEC, as in `train`
    #[arg(long, value_name = "SPEC")]
    pub(crate) data: String,
    /// Longest input in tokens (longer texts are truncated)
    #[arg(long, default_value_t = 64)]
    pub(crate) max_len: usize,
    /// Examples per evaluation batch
    #[arg(long, default_value_t = 64)]
    pub(crate) batch_size: usize,
    /// Device: cpu, cuda:N, or auto (a GPU if built with --features cuda and present)
    #[arg(long, default_value = "auto")]
    pub(crate) device: DeviceChoice,
    /// Evaluate on the part `train` holds out with this fraction and --seed (0: the whole data)
    #[arg(long, default_value_t = 0.0)]
    pub(crate) test_fraction: f64,
    /// Seed of the split (as given to `train`)
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Evaluate at most the first N examples of the set
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<usize>,
    /// The columns and labels of a data file.
    #[command(flatten)]
    pub(crate) columns: ColumnArgs,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub(crate) json: bool,
}

/// `fedpool-client spec` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct SpecArgs {
    /// HF model folder (only config.json is read), or a decoder's .gguf file (only its metadata
    /// is read; no head) [default: $FEDPOOL_ASSETS/minilm, else ./assets/minilm]
    #[arg(long, value_name = "PATH")]
    pub(crate) model: Option<PathBuf>,
    /// The adapter and its sizes.
    #[command(flatten)]
    pub(crate) adapter: AdapterArgs,
    /// Classes of the classification head
    #[arg(long, value_name = "N")]
    pub(crate) num_labels: usize,
    /// Write the spec to FILE instead of stdout
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
}

/// A command that failed; each variant's message is one line naming what and where.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The model folder does not exist.
    #[error("model folder {} not found (pass --model DIR or set FEDPOOL_ASSETS)", .0.display())]
    ModelNotFound(PathBuf),
    /// Loading the backbone, its tokenizer or its fingerprint failed, or a text could not be
    /// encoded.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The model's `config.json` could not be read.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Loading the data failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The data has no example, or no example left for training or evaluation.
    #[error("{0}")]
    EmptyData(String),
    /// The adapter options do not fit the model.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A checkpoint could not be written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A PEFT adapter could not be read or written.
    #[error(transparent)]
    Peft(#[from] fedpool_client::peft::PeftError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// An adapter checkpoint was trained on another backbone than the model given.
    #[error(
        "adapter {} was trained on backbone {checkpoint}, but model {} is backbone {model}",
        adapter.display(),
        model_dir.display()
    )]
    BackboneMismatch {
        /// The checkpoint file.
        adapter: PathBuf,
        /// Its backbone fingerprint (short hex).
        checkpoint: String,
        /// The model folder.
        model_dir: PathBuf,
        /// The model's fingerprint (short hex).
        model: String,
    },
    /// A bad option value.
    #[error("{0}")]
    Input(String),
}

/// What `metrics.json` holds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MetricsFile {
    /// The adapter trained.
    pub(crate) adapter: String,
    /// The data SPEC.
    pub(crate) data: String,
    /// The model folder.
    pub(crate) model: String,
    /// The device, as opened.
    pub(crate) device: String,
    /// Trainable values in the pool.
    pub(crate) trainable_values: usize,
    /// Values in the upload (the delta).
    pub(crate) delta_values: usize,
    /// Accuracy, macro-F1, examples, timing.
    #[serde(flatten)]
    pub(crate) report: TrainReport,
    /// The training configuration.
    pub(crate) config: TrainConfig,
    /// Per-slot usage and its entropy (ssf-pool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) slot_usage: Option<SlotReport>,
    /// AdaLoRA triplet importance per target (lora).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) importance: Vec<ImportanceEntry>,
}

/// One target's triplet scores in `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ImportanceEntry {
    /// The LoRA target.
    pub(crate) target: String,
    /// Score per rank index.
    pub(crate) scores: Vec<f32>,
}

impl From<&TripletImportance> for ImportanceEntry {
    fn from(t: &TripletImportance) -> Self {
        Self { target: t.target.clone(), scores: t.scores.clone() }
    }
}

/// Runs `fedpool-client train`: loads model and data, trains, writes `adapter.safetensors` and
/// `metrics.json` into `args.out`, and returns what it wrote to `metrics.json`.
pub(crate) fn run_train(args: &TrainArgs, observer: &mut dyn Observer) -> Result<MetricsFile, CliError> {
    if !(0.0..1.0).contains(&args.test_fraction) {
        return Err(CliError::Input(format!("--test-fraction {} must be in [0, 1)", args.test_fraction)));
    }
    let model_dir = model_dir(args.model.as_deref())?;
    let backbone = Backbone::load(&model_dir, args.device, args.max_len)?;
    tracing::info!("device: {}", backbone.device);

    let dataset = load_spec(&args.data, &args.columns.data_options())?;
    if dataset.is_empty() {
        return Err(CliError::EmptyData(format!("dataset {} has no examples", args.data)));
    }
    let (train_set, test_set) = dataset.split(args.test_fraction, args.seed);
    if train_set.is_empty() {
        return Err(CliError::EmptyData(format!("dataset {} leaves no training example", args.data)));
    }
    tracing::info!(
        "data {}: {} train, {} held out, {} labels",
        args.data,
        train_set.len(),
        test_set.len(),
        dataset.num_labels()
    );

    let encode = |set: &Dataset| backbone.encode(&set.examples);
    let (train_rows, eval_rows) = (encode(&train_set)?, encode(&test_set)?);

    let choice = args.adapter.choice;
    let spec = backbone.pool_spec(&args.adapter.options(), dataset.num_labels())?;
    let init =
        if choice.head_only() { InitOptions { ssf_std: 0.0, ..Default::default() } } else { InitOptions::default() };
    let start = AdapterPool::init_with(&spec, args.seed, &init).map_err(TrainError::from)?;

    let config = TrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr.unwrap_or_else(|| default_lr(choice)),
        head_lr: args.head_lr,
        warmup_steps: args.warmup_steps.unwrap_or(args.steps / 10),
        schedule: args.schedule,
        max_len: args.max_len,
        seed: args.seed,
        lambda_match: args.lambda_match,
        head_only: choice.head_only(),
        dropout: args.dropout,
        weight_decay: args.weight_decay,
        eval_every: args.eval_every,
        ..TrainConfig::default()
    };
    let needs_queries = spec.has_keys() || config.head_only;
    let cache_file = match (&args.query_cache, needs_queries) {
        (Some(dir), true) => {
            Some(dir.join(query_cache_name(&backbone.fingerprint, args.max_len, &train_rows, &eval_rows)))
        }
        _ => None,
    };
    let dim = backbone.model.config().hidden_size;
    let mut queries = match &cache_file {
        Some(path) if path.is_file() => read_query_cache(path, dim)?,
        _ => QueryCache::new(dim),
    };
    let cached_before = queries.len();

    let data = TrainData { train: &train_rows, eval: &eval_rows, pad_id: backbone.pad_id };
    let outcome = train::train(&backbone.model, &spec, &start, data, &mut queries, &config, observer)?;
    if let Some(path) = &cache_file {
        if queries.len() > cached_before {
            write_query_cache(path, &queries)?;
        }
    }

    std::fs::create_dir_all(&args.out).map_err(|source| CliError::Io { path: args.out.clone(), source })?;
    let meta = CheckpointMeta::now(Round(0), spec.clone(), backbone.fingerprint);
    write_pool(&args.out.join("adapter.safetensors"), &outcome.pool, &meta)?;
    let metrics = MetricsFile {
        adapter: choice.name().to_string(),
        data: args.data.clone(),
        model: model_dir.display().to_string(),
        device: backbone.device,
        trainable_values: trainable_values(&spec, choice),
        delta_values: outcome.delta.num_values(),
        report: outcome.metrics.clone(),
        config,
        slot_usage: outcome.slot_usage.clone(),
        importance: outcome.importance.iter().map(ImportanceEntry::from).collect(),
    };
    let path = args.out.join("metrics.json");
    let json = serde_json::to_vec_pretty(&metrics).map_err(|e| CliError::Input(format!("metrics.json: {e}")))?;
    atomic_write(&path, &json).map_err(|source| CliError::Io { path, source })?;
    Ok(metrics)
}

/// What `fedpool-client eval` reports (the JSON object of `--json`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EvalFile {
    /// The adapter checkpoint evaluated.
    pub(crate) adapter: String,
    /// The adapter as `train` names it: ssf-pool, ssf, lora, or linear-probe (SSF at the identity).
    pub(crate) kind: String,
    /// The round the checkpoint holds (0 for the output of `train`).
    pub(crate) round: u64,
    /// The hash of the checkpoint's pool spec (hex).
    pub(crate) spec_hash: String,
    /// The data SPEC.
    pub(crate) data: String,
    /// The model folder.
    pub(crate) model: String,
    /// The device, as opened.
    pub(crate) device: String,
    /// The held-out fraction evaluated (0: the whole data).
    pub(crate) test_fraction: f64,
    /// The seed of the split.
    pub(crate) seed: u64,
    /// Accuracy, macro-F1, mean cross-entropy and the number of examples.
    #[serde(flatten)]
    pub(crate) metrics: EvalMetrics,
    /// Seconds of the evaluation itself (frozen queries and forward passes; loading excluded).
    pub(crate) wall_seconds: f64,
}

impl EvalFile {
    /// A short human-readable table, one quantity a line.
    pub(crate) fn table(&self) -> String {
        let m = &self.metrics;
        let set = if self.test_fraction > 0.0 {
            format!("{} (held out: fraction {}, seed {})", self.data, self.test_fraction, self.seed)
        } else {
            self.data.clone()
        };
        [
            format!("adapter   {} ({}, round {})", self.adapter, self.kind, self.round),
            format!("data      {set}"),
            format!("accuracy  {:.4}", m.accuracy),
            format!("macro-F1  {:.4}", m.macro_f1),
            format!("loss      {:.4}", m.loss),
            format!("examples  {}", m.examples),
            format!("seconds   {:.2}", self.wall_seconds),
        ]
        .join("\n")
    }
}

/// Runs `fedpool-client eval`: checks the adapter checkpoint against the model's backbone, loads
/// the data (the held-out part of `train`'s split when `--test-fraction` > 0, at most `--limit`
/// examples) and evaluates the pool on it.
pub(crate) fn run_eval(args: &EvalArgs) -> Result<EvalFile, CliError> {
    if !(0.0..1.0).contains(&args.test_fraction) {
        return Err(CliError::Input(format!("--test-fraction {} must be in [0, 1)", args.test_fraction)));
    }
    if args.batch_size == 0 || args.limit == Some(0) {
        return Err(CliError::Input("--batch-size and --limit must be positive".into()));
    }
    let model_dir = model_dir(args.model.as_deref())?;
    let (pool, meta) = read_pool(&args.adapter)?;
    let backbone = Backbone::load(&model_dir, args.device, args.max_len)?;
    tracing::info!("device: {}", backbone.device);
    if backbone.fingerprint != meta.backbone {
        return Err(CliError::BackboneMismatch {
            adapter: args.adapter.clone(),
            checkpoint: short_hex(&meta.backbone),
            model_dir,
            model: short_hex(&backbone.fingerprint),
        });
    }
    let spec = &meta.spec;
    let head = spec.head.ok_or_else(|| {
        CliError::Input(format!("adapter {}: the pool has no classification head", args.adapter.display()))
    })?;

    let dataset = load_spec(&args.data, &args.columns.data_options())?;
    if dataset.num_labels() > head.num_labels {
        return Err(CliError::Input(format!(
            "dataset {} has {} labels, but the head of adapter {} has {} classes",
            args.data,
            dataset.num_labels(),
            args.adapter.display(),
            head.num_labels
        )));
    }
    let mut examples = if args.test_fraction > 0.0 {
        dataset.split(args.test_fraction, args.seed).1.examples
    } else {
        dataset.examples
    };
    examples.truncate(args.limit.unwrap_or(usize::MAX));
    if examples.is_empty() {
        return Err(CliError::EmptyData(format!(
            "dataset {} leaves no example to evaluate (--test-fraction {})",
            args.data, args.test_fraction
        )));
    }

    let rows = backbone.encode(&examples)?;
    let head_only = is_identity_ssf(spec, &pool);
    let config = TrainConfig {
        max_len: args.max_len,
        eval_batch_size: args.batch_size,
        seed: args.seed,
        head_only,
        ..TrainConfig::default()
    };
    let t0 = Instant::now();
    let mut queries = QueryCache::new(backbone.model.config().hidden_size);
    let metrics = train::evaluate_pool(&backbone.model, spec, &pool, &rows, &mut queries, &config, backbone.pad_id)?;
    let kind = match spec.kind {
        AdapterKind::Lora => AdapterChoice::Lora,
        AdapterKind::AdaLora => AdapterChoice::AdaLora,
        AdapterKind::SsfPool if spec.pool_size > 1 => AdapterChoice::SsfPool,
        AdapterKind::SsfPool if head_only => AdapterChoice::LinearProbe,
        AdapterKind::SsfPool => AdapterChoice::Ssf,
    };
    Ok(EvalFile {
        adapter: args.adapter.display().to_string(),
        kind: kind.name().to_string(),
        round: meta.round.0,
        spec_hash: pool.spec_hash.to_string(),
        data: args.data.clone(),
        model: model_dir.display().to_string(),
        device: backbone.device,
        test_fraction: args.test_fraction,
        seed: args.seed,
        metrics,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Runs `fedpool-client peft import`: the PEFT adapter as a fedpool checkpoint for the model in
/// `--model` (its fingerprint recorded, as `train` does); returns the spec.
pub(crate) fn run_peft_import(args: &PeftImportArgs) -> Result<PoolSpec, CliError> {
    if let Some(gguf) = args.model.as_deref().filter(|p| fedpool_client::learner::is_decoder_path(p)) {
        // A decoder's CAUSAL_LM adapter, for the GGUF it was trained on.
        let config = LlamaConfig::from_gguf(&GgufFile::open(gguf)?)?;
        let (spec, pool) = fedpool_client::peft::import(&args.peft, &config)?;
        let fingerprint = BackboneFingerprint::of_model_path(gguf)
            .map_err(|source| CliError::Io { path: gguf.to_path_buf(), source })?;
        write_pool(&args.out, &pool, &CheckpointMeta::now(Round(0), spec.clone(), fingerprint))?;
        return Ok(spec);
    }
    let model_dir = model_dir(args.model.as_deref())?;
    let config = BertConfig::from_file(model_dir.join("config.json"))?;
    let (spec, pool) = fedpool_client::peft::import(&args.peft, &config)?;
    let fingerprint = setup::fingerprint(&model_dir)?;
    write_pool(&args.out, &pool, &CheckpointMeta::now(Round(0), spec.clone(), fingerprint))?;
    Ok(spec)
}

/// Runs `fedpool-client peft export`.
pub(crate) fn run_peft_export(args: &PeftExportArgs) -> Result<(), CliError> {
    let (pool, meta) = read_pool(&args.adapter)?;
    fedpool_client::peft::export(&args.out, &meta.spec, &pool, &args.base_model)?;
    Ok(())
}

/// Runs `fedpool-client spec`: the pool spec `train` would use for this model (only its
/// `config.json` is read), these adapter options and `--num-labels` classes, written to `--out`
/// when given (as [`spec_json`]).
pub(crate) fn run_spec(args: &SpecArgs) -> Result<PoolSpec, CliError> {
    let spec = match args.model.as_deref().filter(|p| fedpool_client::learner::is_decoder_path(p)) {
        // A decoder: no head (--num-labels is not used); LoRA on q_proj, v_proj unless told.
        Some(gguf) => {
            let config = LlamaConfig::from_gguf(&GgufFile::open(gguf)?)?;
            fedpool_client::spec::decoder_pool_spec(&config, &args.adapter.options())?
        }
        None => {
            let model_dir = model_dir(args.model.as_deref())?;
            let config = BertConfig::from_file(model_dir.join("config.json"))?;
            pool_spec(&config, &args.adapter.options(), args.num_labels)?
        }
    };
    if let Some(path) = &args.out {
        let json = spec_json(&spec)?;
        atomic_write(path, json.as_bytes()).map_err(|source| CliError::Io { path: path.clone(), source })?;
    }
    Ok(spec)
}

/// `spec` as pretty JSON with a final newline: what `fedpool-client spec` writes and the server's
/// `spec_file` reads.
pub(crate) fn spec_json(spec: &PoolSpec) -> Result<String, CliError> {
    let json = serde_json::to_string_pretty(spec).map_err(|e| CliError::Input(format!("pool spec: {e}")))?;
    Ok(json + "\n")
}

/// The first 16 hex digits of a fingerprint (enough to tell two backbones apart in a message).
fn short_hex(fingerprint: &BackboneFingerprint) -> String {
    fingerprint.0.to_hex()[..16].to_string()
}

/// True for a plain SSF pool whose every scale is 1 and every shift 0: the linear probe, which
/// then runs head only on the frozen features (the same numbers, without a second backbone pass).
fn is_identity_ssf(spec: &PoolSpec, pool: &AdapterPool) -> bool {
    let all = |name: String, value: f32| pool.tensors.get(&name).is_some_and(|t| t.data().iter().all(|&x| x == value));
    spec.kind == AdapterKind::SsfPool
        && spec.pool_size == 1
        && spec
            .targets
            .iter()
            .all(|t| all(format!("{}.ssf_scale", t.name), 1.0) && all(format!("{}.ssf_shift", t.name), 0.0))
}

/// The model folder of `--model` (else [`default_model_dir`]), refused with a hint about
/// `--model` and `FEDPOOL_ASSETS` when it does not exist.
fn model_dir(given: Option<&Path>) -> Result<PathBuf, CliError> {
    let dir = given.map_or_else(default_model_dir, Path::to_path_buf);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(CliError::ModelNotFound(dir))
    }
}

/// The number of values the optimizer updates.
fn trainable_values(spec: &PoolSpec, adapter: AdapterChoice) -> usize {
    spec.layout()
        .iter()
        .filter(|l| !adapter.head_only() || l.name.starts_with("classifier."))
        .map(|l| l.shape.iter().product::<usize>())
        .sum()
}

/// The cache file name for these examples on this backbone: a digest of the fingerprint, the
/// truncation and every example's id and token ids.
fn query_cache_name(fingerprint: &BackboneFingerprint, max_len: usize, a: &[Encoded], b: &[Encoded]) -> String {
    let mut rows: Vec<&Encoded> = a.iter().chain(b).collect();
    rows.sort_by_key(|e| e.id);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&fingerprint.0 .0);
    bytes.extend_from_slice(&(max_len as u64).to_le_bytes());
    for e in rows {
        bytes.extend_from_slice(&e.id.to_le_bytes());
        bytes.extend_from_slice(&(e.tokens.len() as u64).to_le_bytes());
        e.tokens.iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
    }
    format!("queries-{}.safetensors", &Sha256::of(&bytes).to_hex()[..16])
}

/// Reads a query cache written by [`write_query_cache`].
fn read_query_cache(path: &Path, dim: usize) -> Result<QueryCache, CliError> {
    let (tensors, meta) = read_tensors(path)?;
    let bad = |m: &str| CliError::Input(format!("query cache {}: {m}", path.display()));
    let ids: Vec<u64> =
        serde_json::from_str(meta.get("ids").ok_or_else(|| bad("no ids"))?).map_err(|_| bad("bad ids"))?;
    let features = tensors.get("queries").ok_or_else(|| bad("no queries tensor"))?;
    if features.shape() != [ids.len(), dim] {
        return Err(bad("shape does not match the ids and the model"));
    }
    let mut cache = QueryCache::new(dim);
    for (i, id) in ids.iter().enumerate() {
        cache.insert(*id, features.row(i).to_vec())?;
    }
    tracing::info!("read {} cached queries from {}", ids.len(), path.display());
    Ok(cache)
}

/// Writes the whole cache to `path` (ids in the metadata).
fn write_query_cache(path: &Path, cache: &QueryCache) -> Result<(), CliError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CliError::Io { path: dir.to_path_buf(), source })?;
    }
    let mut ids: Vec<u64> = cache.ids().collect();
    ids.sort_unstable();
    let mut data = Vec::with_capacity(ids.len() * cache.dim());
    for id in &ids {
        data.extend_from_slice(cache.get(*id).unwrap_or_default());
    }
    let tensor = HostTensor::new(vec![ids.len(), cache.dim()], data).map_err(|e| CliError::Input(e.to_string()))?;
    let tensors = BTreeMap::from([("queries".to_string(), tensor)]);
    let ids_json = serde_json::to_string(&ids).map_err(|e| CliError::Input(e.to_string()))?;
    write_tensors(path, &tensors, BTreeMap::from([("ids".to_string(), ids_json)]))?;
    Ok(())
}

/// An [`Observer`] that draws an indicatif progress bar on stderr (for the binary).
#[derive(Default)]
pub(crate) struct ProgressObserver {
    bar: Option<ProgressBar>,
}

impl ProgressObserver {
    /// No bar until the first phase starts.
    pub(crate) fn new() -> Self {
        Self::default()
    }
}

impl Observer for ProgressObserver {
    fn phase(&mut self, phase: Phase, total: usize) {
        let (name, unit) = match phase {
            Phase::Queries => ("queries", "examples"),
            Phase::Train => ("train", "steps"),
            Phase::Eval => ("eval", "examples"),
        };
        let bar = ProgressBar::new(total as u64);
        let template = format!("{{prefix:>7}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}}<{{eta}} {{msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(name);
        self.bar = Some(bar);
    }

    fn progress(&mut self, done: usize, loss: Option<f32>) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            if let Some(loss) = loss {
                bar.set_message(format!("loss {loss:.4}"));
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
