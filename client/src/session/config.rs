//! `client.toml`: everything the daemon needs, in one file (docs/design.md, "Configuration").
//! Relative paths are relative to the file's folder. `fedpool-client run --help` prints
//! [`CONFIG_HELP`]; `client/client.example.toml` is a commented example.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpool_common::codec::{CodecSchedule, CodecSettings};
use fedpool_common::Pooling;
use serde::{Deserialize, Serialize};

use crate::device::DeviceChoice;
use crate::spec::{AdapterChoice, AdapterOptions, DEFAULT_LORA_ALPHA, DEFAULT_LORA_RANK};
use crate::train::{LoraVariant, Schedule, TrainConfig};

/// Every field of `client.toml`, for `--help`.
pub const CONFIG_HELP: &str = "\
client.toml fields (relative paths are relative to the file's folder):
  server = \"10.0.0.1:4433\"        The server's UDP address. Or:
  server_addr_file = \"listen.addr\" A file holding it (the server writes state_dir/listen.addr), re-read
                                  before every connection attempt.
  server_name = \"localhost\"       The name on the server's certificate. Default localhost.
  ca_cert = \"certs/ca.pem\"        The federation CA.
  cert = \"certs/clients/a.pem\"    This client's certificate (its subject CN is its identity) and key.
  key = \"certs/clients/a.key\"
  model = \"assets/minilm\"         The frozen backbone: an HF BERT folder (config.json, model.safetensors,
                                   tokenizer.json), or a decoder's .gguf file (causal-LM fine-tuning;
                                   data vader, trec, sms or a file with prompt/response columns).
  data = \"vader:tweets\"           Local data SPEC (a CSV/TSV/JSONL file or a built-in name). It never leaves.
  shard = \"1/4\"                   Keep shard 1 of 4 of the data (disjoint by a hash of the ids). Default: all.
  max_examples = 2000             Keep at most this many examples (after the shard). Default: all.
  text_column / label_column / labels   As for `fedpool-client train` on a data file.
  test_fraction = 0.2             Held out for federated evaluation (stratified). Default 0.2.
  eval_max_examples = 500         Evaluate on at most this many held-out examples. Default: all.
  state_dir = \"state\"             The error-feedback residual and the last update live here.
  device = \"auto\"                 cpu, cuda:N or auto.
  seed = 0                        Seed of the split and the batch order.
  declared_upload_bps = 1000000   Upload bandwidth the operator declares (a prior for rank budgets).
  declared_download_bps = 1000000
  idle_timeout = \"30s\"            A silent connection is given up after this (then reconnected).
  reconnect_initial = \"500ms\" / reconnect_max = \"30s\"   Reconnection backoff (doubling, with jitter).
  [adapter]  kind = \"ssf-pool\" | \"ssf\" | \"lora\" | \"linear-probe\", pool_size, top_k, rank, alpha,
             lora_modules: must give the server's pool spec (enrollment compares them).
  [train]    batch_size = 16, lr (default per adapter), head_lr, max_len = 64, lambda_match.
  [upload_codec]  quantization = \"fp32\" | \"int8\" | \"int4\", top_k = 0.1, block_size = 64, zstd_level,
             dense_small (top-k leaves the head, λ and small tensors whole), rounding = \"stochastic\" |
             \"nearest\", warmup_rounds (top-k keeps top_k^(r/(N+1)) in round r <= N).
";

/// The `[adapter]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// ssf-pool, ssf, lora or linear-probe.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Slots per SSF pool.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Slots mixed per example.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// LoRA rank.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// LoRA alpha.
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    /// LoRA modules within each layer.
    #[serde(default = "default_lora_modules")]
    pub lora_modules: Vec<String>,
    /// The feature the head reads: `mean` or `cls-pooler` (HF's pretrained pooler).
    #[serde(default)]
    pub pooling: Pooling,
}

fn default_kind() -> String {
    "ssf-pool".into()
}
fn default_pool_size() -> usize {
    fedpool_common::adapter::FEDINS_POOL_SIZE
}
fn default_top_k() -> usize {
    fedpool_common::adapter::FEDINS_TOP_K
}
fn default_rank() -> usize {
    DEFAULT_LORA_RANK
}
fn default_alpha() -> f32 {
    DEFAULT_LORA_ALPHA
}
fn default_lora_modules() -> Vec<String> {
    vec!["attention.self.query".into(), "attention.self.value".into()]
}

impl Default for AdapterSection {
    fn default() -> Self {
        Self {
            kind: default_kind(),
            pool_size: default_pool_size(),
            top_k: default_top_k(),
            rank: default_rank(),
            alpha: default_alpha(),
            lora_modules: default_lora_modules(),
            pooling: Pooling::Mean,
        }
    }
}

impl AdapterSection {
    /// The adapter options this table describes (an unknown `kind` is an error).
    pub fn to_options(&self) -> Result<AdapterOptions, crate::spec::UnknownAdapter> {
        Ok(AdapterOptions {
            choice: self.kind.parse::<AdapterChoice>()?,
            pool_size: self.pool_size,
            top_k: self.top_k,
            rank: self.rank,
            alpha: self.alpha,
            lora_modules: self.lora_modules.clone(),
            pooling: self.pooling,
        })
    }
}

/// The `[train]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Examples per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Learning rate of the adapters (default per adapter kind).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Learning rate of the head (default: `lr`).
    #[serde(default)]
    pub head_lr: Option<f64>,
    /// Longest input in tokens.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// FedIns' key-matching weight.
    #[serde(default = "default_lambda")]
    pub lambda_match: f64,
    /// Dropout while training (default: the model's `hidden_dropout_prob`).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// AdamW's decoupled weight decay of LoRA factors and their head (SSF adapters never decay).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Which LoRA factors train in which round: `both`, `ffa` (B only; A frozen at its shared
    /// initialisation), `rolora` (B in odd rounds, A in even ones) or `fedsa` (both train, A and
    /// the head uploaded, B kept by the client). Standard LoRA only.
    #[serde(default)]
    pub lora_variant: LoraVariant,
}

impl TrainSection {
    /// The trainer's settings for rounds of federated training with `choice`: each round is a
    /// short continuation of one run, so a constant learning rate and no warm-up (steps and the
    /// per-round seed are set per task).
    pub fn round_config(&self, choice: AdapterChoice, seed: u64) -> TrainConfig {
        TrainConfig {
            batch_size: self.batch_size,
            lr: self.lr.unwrap_or_else(|| crate::setup::default_lr(choice)),
            head_lr: self.head_lr,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            max_len: self.max_len,
            seed,
            lambda_match: self.lambda_match,
            head_only: choice.head_only(),
            dropout: self.dropout,
            weight_decay: self.weight_decay,
            ..TrainConfig::default()
        }
    }
}

fn default_batch() -> usize {
    16
}
fn default_max_len() -> usize {
    64
}
fn default_lambda() -> f64 {
    crate::train::FEDINS_LAMBDA
}
fn default_weight_decay() -> f64 {
    crate::train::WEIGHT_DECAY
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            batch_size: default_batch(),
            lr: None,
            head_lr: None,
            max_len: default_max_len(),
            lambda_match: default_lambda(),
            dropout: None,
            weight_decay: default_weight_decay(),
            lora_variant: LoraVariant::Both,
        }
    }
}

/// `client.toml` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The server's address.
    #[serde(default)]
    pub server: Option<SocketAddr>,
    /// A file holding the server's address (re-read before each attempt).
    #[serde(default)]
    pub server_addr_file: Option<PathBuf>,
    /// The TLS name of the server.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The federation CA.
    pub ca_cert: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// This client's key.
    pub key: PathBuf,
    /// The backbone folder.
    pub model: PathBuf,
    /// The data SPEC.
    pub data: String,
    /// `k/n`: keep shard k of n.
    #[serde(default)]
    pub shard: Option<String>,
    /// Keep at most this many examples.
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// Text column of a data file.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Label column of a data file.
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// Labels of a data file, in index order.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Held-out fraction.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Most held-out examples evaluated.
    #[serde(default)]
    pub eval_max_examples: Option<usize>,
    /// The state folder.
    pub state_dir: PathBuf,
    /// cpu, cuda:N or auto.
    #[serde(default = "default_device")]
    pub device: String,
    /// Seed of the split and the batch order.
    #[serde(default)]
    pub seed: u64,
    /// Declared upload bandwidth, bytes/s.
    #[serde(default)]
    pub declared_upload_bps: Option<u64>,
    /// Declared download bandwidth, bytes/s.
    #[serde(default)]
    pub declared_download_bps: Option<u64>,
    /// A connection silent this long is given up (and re-established).
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// First reconnection delay.
    #[serde(default = "default_reconnect_initial", deserialize_with = "duration")]
    pub reconnect_initial: Duration,
    /// Longest reconnection delay.
    #[serde(default = "default_reconnect_max", deserialize_with = "duration")]
    pub reconnect_max: Duration,
    /// The adapter (must match the server's spec).
    #[serde(default)]
    pub adapter: AdapterSection,
    /// Local training settings.
    #[serde(default)]
    pub train: TrainSection,
    /// How updates are compressed.
    #[serde(default)]
    pub upload_codec: CodecSettings,
}

fn default_server_name() -> String {
    "localhost".into()
}
fn default_text_column() -> String {
    "text".into()
}
fn default_label_column() -> String {
    "label".into()
}
fn default_test_fraction() -> f64 {
    0.2
}
fn default_device() -> String {
    "auto".into()
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_reconnect_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// A `client.toml` that cannot be used, naming the field or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{}: {problem}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words (line and column included).
        problem: String,
    },
    /// A field has a value that cannot work.
    #[error("client config field {field}: {problem}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

fn field(field: &'static str, problem: impl ToString) -> ConfigError {
    ConfigError::Field { field, problem: problem.to_string() }
}

impl DaemonConfig {
    /// Reads and checks `path`; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { problem, .. } => ConfigError::Parse { path: path.into(), problem },
            other => other,
        })
    }

    /// Parses TOML text; relative paths are joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut c: DaemonConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::from("(text)"), problem: e.to_string() })?;
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut c.ca_cert);
        rebase(&mut c.cert);
        rebase(&mut c.key);
        rebase(&mut c.model);
        rebase(&mut c.state_dir);
        if let Some(p) = c.server_addr_file.as_mut() {
            rebase(p);
        }
        // A data SPEC that names an existing relative file is rebased too; built-in names stay.
        let data_path = base.join(&c.data);
        if Path::new(&c.data).is_relative() && data_path.is_file() {
            c.data = data_path.display().to_string();
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the values can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.is_none() == self.server_addr_file.is_none() {
            return Err(field("server", "give exactly one of server and server_addr_file"));
        }
        if !(0.0..1.0).contains(&self.test_fraction) {
            return Err(field("test_fraction", format!("{} must be in [0, 1)", self.test_fraction)));
        }
        self.shard()?;
        self.device_choice()?;
        let adapter = self.adapter_options()?;
        self.train.lora_variant.check_adapter(adapter.choice).map_err(|e| field("train.lora_variant", e))?;
        self.upload_codec()?;
        if self.train.batch_size == 0 {
            return Err(field("train.batch_size", "must be at least 1"));
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return Err(field("idle_timeout", "must be at least 100ms"));
        }
        if self.reconnect_initial.is_zero() || self.reconnect_max < self.reconnect_initial {
            return Err(field("reconnect_initial", "must be positive and at most reconnect_max"));
        }
        Ok(())
    }

    /// `shard = "k/n"` as (k, n).
    pub fn shard(&self) -> Result<Option<(usize, usize)>, ConfigError> {
        let Some(s) = &self.shard else { return Ok(None) };
        let bad = || field("shard", format!("{s:?} is not k/n with 0 <= k < n"));
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if k >= n {
            return Err(bad());
        }
        Ok(Some((k, n)))
    }

    /// The device to train on.
    pub fn device_choice(&self) -> Result<DeviceChoice, ConfigError> {
        self.device.parse().map_err(|e| field("device", e))
    }

    /// The adapter options (their spec must equal the server's).
    pub fn adapter_options(&self) -> Result<AdapterOptions, ConfigError> {
        self.adapter.to_options().map_err(|e| field("adapter.kind", e))
    }

    /// The upload codec, with its warm-up.
    pub fn upload_codec(&self) -> Result<CodecSchedule, ConfigError> {
        self.upload_codec.to_schedule().map_err(|e| field("upload_codec", e))
    }

    /// The server's address now: `server`, or the content of `server_addr_file`.
    pub fn server_addr(&self) -> Result<SocketAddr, ConfigError> {
        if let Some(a) = self.server {
            return Ok(a);
        }
        let path = self.server_addr_file.as_ref().ok_or_else(|| field("server", "no address"))?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        text.trim().parse().map_err(|e| field("server_addr_file", format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../client.example.toml");

    #[test]
    fn the_example_parses_with_paths_rebased() {
        let c = DaemonConfig::parse(EXAMPLE, Path::new("/srv/fedpool")).unwrap();
        assert_eq!(c.ca_cert, Path::new("/srv/fedpool/certs/ca.pem"));
        assert_eq!(c.state_dir, Path::new("/srv/fedpool/client-state"));
        assert_eq!(c.shard().unwrap(), Some((0, 4)));
        assert_eq!(c.upload_codec().unwrap().codec.top_k, Some(0.1));
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let base = "ca_cert='a'\ncert='b'\nkey='c'\nmodel='m'\ndata='vader'\nstate_dir='s'\n";
        let parse = |extra: &str| DaemonConfig::parse(&format!("{base}{extra}"), Path::new("."));
        assert!(parse("server='127.0.0.1:1'\n").is_ok());
        for (extra, needle) in [
            ("", "server"),
            ("server='127.0.0.1:1'\nshard='4/4'\n", "shard"),
            ("server='127.0.0.1:1'\ntest_fraction=1.0\n", "test_fraction"),
            ("server='127.0.0.1:1'\ndevice='tpu'\n", "device"),
            ("server='127.0.0.1:1'\n[adapter]\nkind='prefix'\n", "adapter.kind"),
            ("server='127.0.0.1:1'\n[upload_codec]\nquantization='int3'\n", "upload_codec"),
            ("server='127.0.0.1:1'\nsurprise=1\n", "surprise"),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra:?}: {e}");
        }
    }
}
