//! The server's configuration file (TOML) and how it becomes a running server's parts: the
//! network setup, the round engine (resumed from the store or starting from a fresh pool) and the
//! store.
//!
//! Relative paths in the file are relative to the folder of the file itself. See
//! [`CONFIG_REFERENCE`] (printed by `fedpool-server run --help`) and `server/server.example.toml`
//! for every field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpool_common::codec::DecodeLimits;
use fedpool_common::frame::FrameLimits;
use fedpool_common::{AdapterPool, BackboneFingerprint, PoolSpec, Round, Sha256};
use serde::{Deserialize, Deserializer, Serialize};

use crate::aggregate::{AggregateConfig, FedAdamConfig, LoraMerge, Rule, ServerOpt};
use crate::net::{NetBounds, NetSetup};
use crate::ranks::BudgetSection;
use crate::round::{Engine, EngineConfig, EngineError, NormBound, RosterEntry, TrustConfig};
use crate::store::{Retention, Store};

/// Every field of the configuration file, for `--help`.
pub const CONFIG_REFERENCE: &str = "\
CONFIGURATION FILE (TOML; relative paths are relative to the file's folder)

Network and files:
  listen = \"0.0.0.0:4433\"        UDP address for QUIC (port 0: any free port). Default 0.0.0.0:4433.
  state_dir = \"state\"            Checkpoints (round-NNNNNN.safetensors, pruned by [store]), rounds.jsonl
                                 (append-only), listen.addr (the bound address, written at start) and
                                 LOCK (one server per folder: a second one refuses to start, naming the
                                 holder). Files 0600, the folder 0700. Required.
  ca_cert = \"certs/ca.pem\"       The federation CA; clients must present a certificate it signed. Required.
  server_cert = \"certs/server.pem\"  The server's certificate (PEM). Required.
  server_key = \"certs/server.key\"   The server's private key (PEM). Required.
  revocation_list = \"certs/revoked.txt\"  Revoked certificates (serial:HEX lines, as `certs revoke`
                                 writes; a bare name revokes every certificate of that name), checked
                                 at every new connection and polled every 0.5 s: a live connection
                                 whose certificate is revoked is closed. A missing file revokes nobody.
                                 Default: revoked.txt beside ca_cert (where `certs revoke` writes).
  metrics_listen = \"127.0.0.1:9464\"  Serve Prometheus text on GET /metrics there, and the status page
                                 on GET / (round, phase, clients, each round's accuracy, bytes and
                                 duration with a chart, rejections, rank grants; plain HTML that
                                 reloads every 5 s). The bound address goes to metrics.addr in
                                 state_dir. Default: off.
  max_connections = 10000        Most connections open at once; more are refused before any handshake
                                 work. Default 10000.
  max_handshakes = 256           Most QUIC handshakes in progress at once; more are refused. Default 256.
  retry_above_handshakes = 64    From this many handshakes in progress on, a client whose address is not
                                 yet validated is sent a QUIC Retry first (0: always). Default 64.
  enroll_timeout = \"30s\"         A connection with no Enroll frame this long after admission is closed.
                                 Default 30s.
  control_timeout = \"10s\"        Most time for a control frame (Enroll, Heartbeat, EvalReport) from its
                                 stream's opening, and for any frame's header. Default 10s.
  upload_stall_timeout = \"60s\"   An upload (or a push) with no 64 KiB chunk moving for this long is cut and
                                 its connection closed. Default 60s.
  max_upload_bytes_in_flight = 1073741824  Bytes of upload bodies all connections hold at once (read,
                                 decoded, waiting for the engine); beyond it uploads wait (back-pressure).
                                 Default: the larger of 1 GiB and 4 x max_frame_bytes.
  max_queued_pushes = 8          Pushes (tasks, evaluation tasks) waiting behind the one being written, per
                                 connection; one more closes the connection. Default 8.

Model and pool (exactly one of each pair):
  backbone_dir = \"assets/model\"  The frozen backbone (config.json + model.safetensors), or a decoder's
                                 .gguf file; clients must enroll with its fingerprint.
  backbone_fingerprint = \"<64 hex>\"  The fingerprint itself, instead of backbone_dir.
  [pool]                         The pool spec inline (fedpool_common::PoolSpec: kind = \"SsfPool\" or
                                 \"Lora\", pool_size, top_k, key_dim, max_rank, lora_alpha,
                                 [[pool.targets]] name / dim_in / dim_out, optional [pool.head]
                                 dim_in / num_labels).
  spec_file = \"spec.json\"        The pool spec as JSON, instead of [pool].

Rounds:
  rounds = 20                    Rounds to run in total (a resumed server runs the remaining ones). Required.
  clients_per_round = 4          Clients whose updates a round aims for. Required.
  quorum = 3                     Fewest accepted updates that commit a round at its deadline. Required.
  over_selection = 1.3           Factor >= 1: ceil(clients_per_round x this) clients get a task, the round
                                 commits at clients_per_round updates (stragglers are not waited for). Default 1.
  min_clients_to_start = 4       Connected clients needed before a round starts (>= quorum). Default
                                 clients_per_round.
  deadline = \"5m\"                How long a round waits for updates (humantime: 500ms, 30s, 5m). Required.
  local_steps = 100              Local optimisation steps each client runs. Required.
  evaluate = true                Federated evaluation: after each commit every connected client evaluates
                                 the new global pool on its held-out data; the example-weighted accuracy,
                                 macro-F1 and loss go into rounds.jsonl as a line of their own
                                 ({\"eval_of\": N, ...}, merged into round N by `report`). Default true.
  eval_deadline = \"2m\"           How long an evaluation waits for reports. Default: deadline.
  seed = 0                       Seed of the initial pool and of client selection. Default 0.
  heartbeat = \"10s\"              Heartbeat interval clients are told. Default 10s.
  idle_timeout = \"60s\"           A connection silent this long is closed and its client lost. Default 60s.
  keep_alive = \"5s\"              QUIC keep-alive interval sent by the server. Default idle_timeout / 4.
  request_timeout = \"10m\"        Most time for an upload's whole body (or a whole push). Default 10m.
  max_frame_bytes = 268435456    Cap on an update (or task) frame's body. Default 256 MiB.

[download_codec]                 How tasks carry the global pool. Default lossless fp32.
  quantization = \"fp32\"          fp32 | int8 | int4.
  top_k = 0.1                    Keep this fraction of values (default: all).
  block_size = 64                Values per quantization block. Default 64.
  zstd_level = 3                 zstd the payload at this level (1..=22). Default: no zstd.
  rounding = \"stochastic\"        stochastic | nearest (int8/int4 levels). Default stochastic.

[aggregate]
  strategy = \"fedavg\"            fedavg | trimmed-mean | median | krum | fedadam. Default fedavg (streaming:
                                 memory O(model) whatever the number of clients). trimmed-mean, median
                                 (coordinate-wise) and krum (Multi-Krum) are Byzantine-robust but need
                                 every update of a round at once: they buffer up to max_updates decoded
                                 deltas (memory max_updates x the pool's size; krum also O(n^2) time).
  clip_norm = 10.0               Clip each update to this L2 norm in the merge. Default: no clipping.
  trim_fraction = 0.1            trimmed-mean: fraction trimmed at each end. Default 0.1.
  krum_byzantine = 1             krum: f, the attackers tolerated (its guarantee needs n >= 2f + 3). Default 1.
  krum_select = 1                krum: m, the best-scored updates averaged (1: Krum). Default 1.
  max_updates = 1024             trimmed-mean, median, krum: most updates buffered per round. Default 1024.
  norm_bound = \"median\"          median | absolute | off: before folding, scale each update down to
                                 norm_factor x the median L2 norm of the previous round's accepted
                                 updates (median; the first round of a federation uses max_update_norm
                                 if set), or to max_update_norm (absolute). Default median.
  norm_factor = 3.0              median: the multiple of the median. Default 3.
  max_update_norm = 100.0        absolute: the bound; median: the first round's bound. Default: none.
  max_abs_value = 1e4            An update with any value of larger magnitude is refused. Default 1e4.
  server_lr = 0.01               fedadam: server learning rate. Default 0.01.
  beta1 = 0.9                    fedadam: first-moment decay. Default 0.9.
  beta2 = 0.99                   fedadam: second-moment decay. Default 0.99.
  tau = 0.001                    fedadam: adaptivity. Default 0.001.
  lora_merge = \"fedavg\"          standard LoRA (adapter lora): fedavg (A and B averaged, FedIT) |
                                 exact (the mean product B·A, SVD to rank r: FlexLoRA) |
                                 fair (LoRA-FAIR: Ā, and the B closest to the mean product). Default fedavg.
  lora_fair_lambda = 0.01        fair: ridge weight, relative to the mean squared row norm of Ā. Default 0.01.

Trust (what a client's word is worth; the coordinator decides what an update weighs):
  max_examples_per_update = 1000000  The most examples an update or evaluation report weighs. A client's
                                 first declared count is capped to it and frozen for its life (a later
                                 enrollment cannot raise it). Default 1000000.
  roster_only = false            Refuse clients that are not in [clients]. Default false.
  strikes = 3                    Refusals (a broken or forged update, a replayed nonce, a protocol error;
                                 not lateness) within strike_window rounds that quarantine a client for
                                 the rest of the run (0: never). Default 3.
  strike_window = 10             Rounds a strike counts for. Default 10.
[clients]                        The roster: per certificate name, the most examples its updates weigh,
  \"hospital-a\" = { max_examples = 5000 }   or a fixed weight whatever it claims:
  \"lab-b\" = { weight = 1000 }              Default: empty (every client capped at max_examples_per_update).

[store]                          Which checkpoints stay in state_dir (the newest and round 0 always do).
  keep_last = 5                  The newest checkpoints kept. Default 5.
  keep_every = 10                Also every round that is a multiple of this (0: none). Default 10.

[budget]                         Per-client LoRA rank budgets (LoRA pools only). Default: none.
  policy = \"importance\"          none | fixed | classes | importance.
  merge = \"exact\"                exact (product merge; FlexLoRA with classes) | zero-pad (HetLoRA's average).
  rank = 8                       fixed: every client's rank on every target.
  classes = [{ min_upload_bps = 2e6, rank = 8 }, { min_upload_bps = 0, rank = 2 }]
                                 classes: the rank of the highest upload-bandwidth class a client reaches.
  safety_margin = 0.8            importance: fraction of bandwidth x (deadline - compute) planned for.
  init_rank = 8                  importance: triplets per target at first (AdaLoRA's cubic schedule).
  target_rank = 4                importance: triplets per target at the end.
  warmup_rounds = 1              importance: rounds at init_rank.
  final_rounds = 1               importance: last rounds at target_rank.
  smoothing = 0.5                importance: weight of the past in the global triplet importance.
  expected_compute_s = 30        A client's training seconds before it reports its own.
  [budget.upload_codec]          importance: the codec clients upload with (sizes measured with it).
";

/// A configuration that cannot be used, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("config {}: {problem}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's error (with line and column).
        problem: String,
    },
    /// A field's value is unusable.
    #[error("config field {field}: {problem}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The checkpoint store could not be opened.
    #[error("state folder {}: {problem}", dir.display())]
    Store {
        /// The state folder.
        dir: PathBuf,
        /// The store's error.
        problem: String,
    },
    /// The round engine refused the configuration.
    #[error("round engine: {0}")]
    Engine(#[from] EngineError),
}

fn field(field: &'static str, problem: impl ToString) -> ConfigError {
    ConfigError::Field { field, problem: problem.to_string() }
}

/// `[download_codec]`: how tasks carry the global pool (the same settings as the client's
/// `[upload_codec]`).
pub use fedpool_common::codec::CodecSettings as CodecSection;

/// `[aggregate]`: how a round's updates are merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSection {
    /// `fedavg`, `trimmed-mean` or `fedadam`.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Clip each update to this L2 norm.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// trimmed-mean: the fraction trimmed at each end.
    #[serde(default = "default_trim")]
    pub trim_fraction: f64,
    /// trimmed-mean: most updates buffered per round.
    #[serde(default = "default_max_updates")]
    pub max_updates: usize,
    /// fedadam: server learning rate.
    #[serde(default)]
    pub server_lr: Option<f64>,
    /// fedadam: first-moment decay.
    #[serde(default)]
    pub beta1: Option<f64>,
    /// fedadam: second-moment decay.
    #[serde(default)]
    pub beta2: Option<f64>,
    /// fedadam: adaptivity τ.
    #[serde(default)]
    pub tau: Option<f64>,
    /// Standard LoRA's factor merge: `fedavg`, `exact` or `fair`.
    #[serde(default = "default_lora_merge")]
    pub lora_merge: String,
    /// LoRA-FAIR's relative ridge weight.
    #[serde(default = "default_fair_lambda")]
    pub lora_fair_lambda: f64,
    /// krum: the attackers tolerated.
    #[serde(default = "default_one")]
    pub krum_byzantine: usize,
    /// krum: the updates averaged.
    #[serde(default = "default_one")]
    pub krum_select: usize,
    /// `median`, `absolute` or `off`.
    #[serde(default = "default_norm_bound")]
    pub norm_bound: String,
    /// median: the multiple of the previous round's median norm.
    #[serde(default = "default_norm_factor")]
    pub norm_factor: f64,
    /// absolute: the bound; median: the first round's bound.
    #[serde(default)]
    pub max_update_norm: Option<f64>,
    /// The largest magnitude of an update's value.
    #[serde(default = "default_max_abs_value")]
    pub max_abs_value: f32,
}

fn default_one() -> usize {
    1
}
fn default_norm_bound() -> String {
    "median".into()
}
fn default_norm_factor() -> f64 {
    crate::round::DEFAULT_NORM_FACTOR
}
fn default_max_abs_value() -> f32 {
    crate::round::DEFAULT_MAX_ABS_VALUE
}

/// One entry of the `[clients]` roster: exactly one of the two.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RosterSection {
    /// The most examples the client's updates weigh.
    #[serde(default)]
    pub max_examples: Option<u64>,
    /// A fixed weight for every update of the client.
    #[serde(default)]
    pub weight: Option<u64>,
}

fn default_lora_merge() -> String {
    "fedavg".into()
}
fn default_fair_lambda() -> f64 {
    0.01
}

fn default_strategy() -> String {
    "fedavg".into()
}
fn default_trim() -> f64 {
    0.1
}
fn default_max_updates() -> usize {
    1024
}

impl Default for AggregateSection {
    fn default() -> Self {
        Self {
            strategy: default_strategy(),
            clip_norm: None,
            trim_fraction: default_trim(),
            max_updates: default_max_updates(),
            server_lr: None,
            beta1: None,
            beta2: None,
            tau: None,
            lora_merge: default_lora_merge(),
            lora_fair_lambda: default_fair_lambda(),
            krum_byzantine: default_one(),
            krum_select: default_one(),
            norm_bound: default_norm_bound(),
            norm_factor: default_norm_factor(),
            max_update_norm: None,
            max_abs_value: default_max_abs_value(),
        }
    }
}

impl AggregateSection {
    /// The aggregator's configuration.
    pub fn to_config(&self) -> Result<AggregateConfig, ConfigError> {
        let adam_fields =
            self.server_lr.is_some() || self.beta1.is_some() || self.beta2.is_some() || self.tau.is_some();
        let (rule, server_opt) = match self.strategy.as_str() {
            "fedavg" => (Rule::Mean, ServerOpt::Plain),
            "trimmed-mean" => (
                Rule::TrimmedMean { trim_fraction: self.trim_fraction, max_updates: self.max_updates },
                ServerOpt::Plain,
            ),
            "median" => (Rule::Median { max_updates: self.max_updates }, ServerOpt::Plain),
            "krum" => (
                Rule::Krum { byzantine: self.krum_byzantine, select: self.krum_select, max_updates: self.max_updates },
                ServerOpt::Plain,
            ),
            "fedadam" => {
                let d = FedAdamConfig::default();
                let adam = FedAdamConfig {
                    lr: self.server_lr.unwrap_or(d.lr),
                    beta1: self.beta1.unwrap_or(d.beta1),
                    beta2: self.beta2.unwrap_or(d.beta2),
                    tau: self.tau.unwrap_or(d.tau),
                };
                adam.validate().map_err(|e| field("aggregate", e))?;
                (Rule::Mean, ServerOpt::FedAdam(adam))
            }
            other => {
                return Err(field(
                    "aggregate.strategy",
                    format!("{other:?} is not fedavg, trimmed-mean, median, krum or fedadam"),
                ))
            }
        };
        if adam_fields && self.strategy != "fedadam" {
            return Err(field("aggregate", "server_lr, beta1, beta2 and tau apply to strategy = \"fedadam\" only"));
        }
        let lora_merge = match self.lora_merge.as_str() {
            "fedavg" => LoraMerge::FactorMean,
            "exact" => LoraMerge::Exact,
            "fair" => LoraMerge::Fair { lambda: self.lora_fair_lambda },
            other => {
                return Err(field("aggregate.lora_merge", format!("{other:?} is not fedavg, exact or fair")));
            }
        };
        Ok(AggregateConfig { clip_norm: self.clip_norm, rule, server_opt, lora_merge })
    }

    /// The engine's bound on an update's norm.
    pub fn norm_bound(&self) -> Result<NormBound, ConfigError> {
        match (self.norm_bound.as_str(), self.max_update_norm) {
            ("off", _) => Ok(NormBound::Off),
            ("absolute", Some(b)) => Ok(NormBound::Absolute(b)),
            ("absolute", None) => Err(field("aggregate.max_update_norm", "norm_bound = \"absolute\" needs it")),
            ("median", first_round) => Ok(NormBound::Median { factor: self.norm_factor, first_round }),
            (other, _) => Err(field("aggregate.norm_bound", format!("{other:?} is not median, absolute or off"))),
        }
    }
}

/// The configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address for QUIC.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Checkpoints, the round log, `listen.addr`.
    pub state_dir: PathBuf,
    /// The federation CA.
    pub ca_cert: PathBuf,
    /// The server's certificate.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// Revoked client names (default: `revoked.txt` beside `ca_cert`).
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
    /// Prometheus endpoint (`GET /metrics`) and status page (`GET /`) address (off by default).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The backbone's folder.
    #[serde(default)]
    pub backbone_dir: Option<PathBuf>,
    /// The backbone's fingerprint, hex.
    #[serde(default)]
    pub backbone_fingerprint: Option<String>,
    /// The pool spec, inline.
    #[serde(default)]
    pub pool: Option<PoolSpec>,
    /// The pool spec, as a JSON file.
    #[serde(default)]
    pub spec_file: Option<PathBuf>,
    /// Total rounds.
    pub rounds: u64,
    /// Updates a round aims for.
    pub clients_per_round: usize,
    /// Fewest updates that commit a round at its deadline.
    pub quorum: usize,
    /// Over-selection factor (≥ 1): ⌈`clients_per_round` × this⌉ clients get a task.
    #[serde(default = "default_over_selection")]
    pub over_selection: f64,
    /// Enrolled clients needed before a round starts.
    #[serde(default)]
    pub min_clients_to_start: Option<usize>,
    /// Round deadline.
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
    /// Local steps per task.
    pub local_steps: u32,
    /// Federated evaluation after each commit.
    #[serde(default = "default_true")]
    pub evaluate: bool,
    /// How long an evaluation waits for reports (default: `deadline`).
    #[serde(default, deserialize_with = "opt_duration")]
    pub eval_deadline: Option<Duration>,
    /// Seed of the initial pool and of selection.
    #[serde(default)]
    pub seed: u64,
    /// Heartbeat interval told to clients.
    #[serde(default = "default_heartbeat", deserialize_with = "duration")]
    pub heartbeat: Duration,
    /// Connection idle timeout.
    #[serde(default = "default_idle", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval (default idle_timeout / 4).
    #[serde(default, deserialize_with = "opt_duration")]
    pub keep_alive: Option<Duration>,
    /// Most time for an upload's whole body (or a whole push).
    #[serde(default = "default_request_timeout", deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// Most time from admission to a client's Enroll frame.
    #[serde(default = "default_enroll_timeout", deserialize_with = "duration")]
    pub enroll_timeout: Duration,
    /// Most time for a control frame (and any frame's header).
    #[serde(default = "default_control_timeout", deserialize_with = "duration")]
    pub control_timeout: Duration,
    /// Most time without a 64 KiB chunk of an upload (or a push) moving.
    #[serde(default = "default_upload_stall_timeout", deserialize_with = "duration")]
    pub upload_stall_timeout: Duration,
    /// Bytes of upload bodies held at once, all connections together (default: the larger of
    /// 1 GiB and 4 × the bulk frame cap).
    #[serde(default)]
    pub max_upload_bytes_in_flight: Option<u64>,
    /// Most connections open at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most QUIC handshakes in progress at once.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Handshakes in progress from which unvalidated clients get a QUIC Retry (0: always).
    #[serde(default = "default_retry_above_handshakes")]
    pub retry_above_handshakes: usize,
    /// Pushes waiting per connection beyond which it is closed.
    #[serde(default = "default_max_queued_pushes")]
    pub max_queued_pushes: usize,
    /// Cap on a bulk frame's body.
    #[serde(default)]
    pub max_frame_bytes: Option<u32>,
    /// How tasks carry the global pool.
    #[serde(default)]
    pub download_codec: CodecSection,
    /// How updates are merged.
    #[serde(default)]
    pub aggregate: AggregateSection,
    /// Per-client LoRA rank budgets (default: none).
    #[serde(default)]
    pub budget: BudgetSection,
    /// The most examples an update or evaluation report weighs.
    #[serde(default = "default_max_examples")]
    pub max_examples_per_update: u64,
    /// Refuse clients not in the roster.
    #[serde(default)]
    pub roster_only: bool,
    /// Refusals within `strike_window` rounds that quarantine a client (0: never).
    #[serde(default = "default_strikes")]
    pub strikes: u32,
    /// Rounds a strike counts for.
    #[serde(default = "default_strike_window")]
    pub strike_window: u64,
    /// The roster: per certificate name, what its updates weigh.
    #[serde(default)]
    pub clients: std::collections::BTreeMap<String, RosterSection>,
    /// Which checkpoints stay on disk.
    #[serde(default)]
    pub store: StoreSection,
}

/// `[store]`: which older checkpoints stay on disk (the newest and round 0 always do).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// The newest checkpoints kept.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Every round that is a multiple of this is kept too (0: none).
    #[serde(default = "default_keep_every")]
    pub keep_every: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self { keep_last: default_keep_last(), keep_every: default_keep_every() }
    }
}

fn default_keep_last() -> usize {
    Retention::DEFAULT_KEEP_LAST
}
fn default_keep_every() -> u64 {
    Retention::DEFAULT_KEEP_EVERY
}

fn default_max_examples() -> u64 {
    crate::round::DEFAULT_MAX_EXAMPLES_PER_UPDATE
}
fn default_strikes() -> u32 {
    crate::round::DEFAULT_STRIKES
}
fn default_strike_window() -> u64 {
    crate::round::DEFAULT_STRIKE_WINDOW
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}

fn default_true() -> bool {
    true
}

fn default_over_selection() -> f64 {
    1.0
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_request_timeout() -> Duration {
    NetBounds::default().request_timeout
}
fn default_enroll_timeout() -> Duration {
    NetBounds::default().enroll_timeout
}
fn default_control_timeout() -> Duration {
    NetBounds::default().control_timeout
}
fn default_upload_stall_timeout() -> Duration {
    NetBounds::default().upload_stall_timeout
}
fn default_max_connections() -> usize {
    NetBounds::default().max_connections
}
fn default_max_handshakes() -> usize {
    NetBounds::default().max_handshakes
}
fn default_retry_above_handshakes() -> usize {
    NetBounds::default().retry_above_handshakes
}
fn default_max_queued_pushes() -> usize {
    NetBounds::default().max_queued_pushes
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// The name of the file in the state folder that holds the bound QUIC address.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";
/// The name of the file in the state folder that holds the bound metrics address (when enabled).
pub const METRICS_ADDR_FILE: &str = "metrics.addr";

/// What [`ServerConfig::prepare`] makes: everything [`crate::net::Server::start`] needs.
pub struct Prepared {
    /// The network setup.
    pub net: NetSetup,
    /// The round engine, at the resumed round.
    pub engine: Engine,
    /// The checkpoint store.
    pub store: Store,
    /// The newest committed round (0 for a fresh federation).
    pub start_round: Round,
    /// The checkpoint resumed from; `None` for a fresh federation (its initial pool was just
    /// written as round 0).
    pub resumed_from: Option<PathBuf>,
}

impl ServerConfig {
    /// Reads and checks a configuration file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { problem, .. } => ConfigError::Parse { path: path.into(), problem },
            other => other,
        })
    }

    /// Parses configuration text, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut c: ServerConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::from("(text)"), problem: e.to_string() })?;
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut c.state_dir);
        rebase(&mut c.ca_cert);
        rebase(&mut c.server_cert);
        rebase(&mut c.server_key);
        for p in [&mut c.revocation_list, &mut c.backbone_dir, &mut c.spec_file].into_iter().flatten() {
            rebase(p);
        }
        c.check()?;
        Ok(c)
    }

    /// Checks the fields that can be checked without touching files.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.rounds == 0 {
            return Err(field("rounds", "must be at least 1"));
        }
        if self.clients_per_round == 0 {
            return Err(field("clients_per_round", "must be at least 1"));
        }
        if self.quorum == 0 || self.quorum > self.clients_per_round {
            return Err(field(
                "quorum",
                format!("{} must be in 1..={} (clients_per_round)", self.quorum, self.clients_per_round),
            ));
        }
        if !(self.over_selection.is_finite() && self.over_selection >= 1.0) {
            return Err(field("over_selection", format!("{} must be a factor >= 1", self.over_selection)));
        }
        if self.min_clients_to_start.is_some_and(|m| m < self.quorum) {
            return Err(field("min_clients_to_start", format!("must be at least the quorum ({})", self.quorum)));
        }
        if self.idle_timeout <= self.heartbeat {
            return Err(field("idle_timeout", format!("must be longer than the heartbeat ({:?})", self.heartbeat)));
        }
        if self.local_steps == 0 {
            return Err(field("local_steps", "must be at least 1"));
        }
        if self.deadline.is_zero() {
            return Err(field("deadline", "must be positive"));
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return Err(field("idle_timeout", "must be at least 100ms"));
        }
        if self.keep_alive.is_some_and(|k| k >= self.idle_timeout) {
            return Err(field("keep_alive", "must be shorter than idle_timeout"));
        }
        self.check_bounds()?;
        match (&self.pool, &self.spec_file) {
            (Some(_), Some(_)) => return Err(field("pool", "give [pool] or spec_file, not both")),
            (None, None) => return Err(field("pool", "the pool spec is missing: give [pool] or spec_file")),
            _ => {}
        }
        match (&self.backbone_dir, &self.backbone_fingerprint) {
            (Some(_), Some(_)) => {
                return Err(field("backbone_dir", "give backbone_dir or backbone_fingerprint, not both"))
            }
            (None, None) => {
                return Err(field("backbone_dir", "the backbone is missing: give backbone_dir or backbone_fingerprint"))
            }
            _ => {}
        }
        self.download_codec.to_codec().map_err(|e| field("download_codec", e))?;
        self.aggregate.to_config()?;
        if let Some(problem) = self.trust()?.problem() {
            return Err(field("trust", problem));
        }
        Ok(())
    }

    /// Checks the network bounds (caps and timeouts).
    fn check_bounds(&self) -> Result<(), ConfigError> {
        let millis = Duration::from_millis(1);
        for (name, d) in [
            ("enroll_timeout", self.enroll_timeout),
            ("control_timeout", self.control_timeout),
            ("upload_stall_timeout", self.upload_stall_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d < millis {
                return Err(field(name, "must be at least 1ms"));
            }
        }
        if self.upload_stall_timeout > self.request_timeout {
            return Err(field("upload_stall_timeout", "must not be longer than request_timeout"));
        }
        for (name, n) in [
            ("max_connections", self.max_connections),
            ("max_handshakes", self.max_handshakes),
            ("max_queued_pushes", self.max_queued_pushes),
        ] {
            if n == 0 {
                return Err(field(name, "must be at least 1"));
            }
        }
        if self.max_upload_bytes_in_flight == Some(0) {
            return Err(field("max_upload_bytes_in_flight", "must be at least 1"));
        }
        Ok(())
    }

    /// What the coordinator believes of clients: the roster, the caps, the update bounds, strikes.
    pub fn trust(&self) -> Result<TrustConfig, ConfigError> {
        let mut roster = std::collections::BTreeMap::new();
        for (name, entry) in &self.clients {
            let e = match (entry.max_examples, entry.weight) {
                (Some(m), None) => RosterEntry::MaxExamples(m),
                (None, Some(w)) => RosterEntry::Weight(w),
                _ => return Err(field("clients", format!("{name:?}: give max_examples or weight, exactly one"))),
            };
            roster.insert(name.clone(), e);
        }
        Ok(TrustConfig {
            max_examples_per_update: self.max_examples_per_update,
            roster,
            roster_only: self.roster_only,
            norm_bound: self.aggregate.norm_bound()?,
            max_abs_value: self.aggregate.max_abs_value,
            strikes: self.strikes,
            strike_window: self.strike_window,
        })
    }

    /// The revocation list's path: the configured one, else `revoked.txt` beside the CA.
    pub fn revocation_list_path(&self) -> PathBuf {
        self.revocation_list
            .clone()
            .unwrap_or_else(|| self.ca_cert.parent().unwrap_or(Path::new(".")).join(crate::certs::REVOKED))
    }

    /// The pool spec, from `[pool]` or `spec_file`, validated.
    pub fn pool_spec(&self) -> Result<PoolSpec, ConfigError> {
        let spec = match (&self.pool, &self.spec_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| field("spec_file", format!("{}: {e}", path.display())))?;
                serde_json::from_str(&text).map_err(|e| field("spec_file", format!("{}: {e}", path.display())))?
            }
            (None, None) => return Err(field("pool", "the pool spec is missing")),
        };
        spec.validate().map_err(|e| field("pool", e))?;
        Ok(spec)
    }

    /// The backbone fingerprint, from `backbone_fingerprint` or by hashing `backbone_dir`.
    pub fn backbone(&self) -> Result<BackboneFingerprint, ConfigError> {
        match (&self.backbone_fingerprint, &self.backbone_dir) {
            (Some(hex), _) => Sha256::from_hex(hex.trim())
                .map(BackboneFingerprint)
                .ok_or_else(|| field("backbone_fingerprint", format!("{hex:?} is not 64 hex characters"))),
            (None, Some(dir)) => BackboneFingerprint::of_model_path(dir).map_err(|e| field("backbone_dir", e)),
            (None, None) => Err(field("backbone_dir", "the backbone is missing")),
        }
    }

    /// The frame caps.
    pub fn frame_limits(&self) -> FrameLimits {
        let d = FrameLimits::default();
        FrameLimits { control: d.control, bulk: self.max_frame_bytes.unwrap_or(d.bulk) }
    }

    /// The network setup.
    pub fn net_setup(&self) -> NetSetup {
        NetSetup {
            listen: self.listen,
            ca_cert: self.ca_cert.clone(),
            server_cert: self.server_cert.clone(),
            server_key: self.server_key.clone(),
            revocation_list: self.revocation_list_path(),
            limits: self.frame_limits(),
            idle_timeout: self.idle_timeout,
            keep_alive: self.keep_alive.unwrap_or(self.idle_timeout / 4),
            bounds: NetBounds {
                max_connections: self.max_connections,
                max_handshakes: self.max_handshakes,
                retry_above_handshakes: self.retry_above_handshakes,
                enroll_timeout: self.enroll_timeout,
                control_timeout: self.control_timeout,
                upload_stall_timeout: self.upload_stall_timeout,
                request_timeout: self.request_timeout,
                max_upload_bytes_in_flight: self.max_upload_bytes_in_flight,
                max_queued_pushes: self.max_queued_pushes,
            },
            metrics_listen: self.metrics_listen,
        }
    }

    /// Opens the store, resumes from its newest committed round (or starts a fresh pool at round
    /// 0), and builds the engine and the network setup.
    pub fn prepare(&self) -> Result<Prepared, ConfigError> {
        let spec = self.pool_spec()?;
        let backbone = self.backbone()?;
        let download_codec = self.download_codec.to_codec().map_err(|e| field("download_codec", e))?;
        let aggregate = self.aggregate.to_config()?;
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| ConfigError::Store { dir: self.state_dir.clone(), problem: e.to_string() })?;
        let store_err =
            |e: crate::store::StoreError| ConfigError::Store { dir: self.state_dir.clone(), problem: e.to_string() };
        let (store, resume) = Store::open(&self.state_dir, spec.clone(), backbone).map_err(store_err)?;
        let mut store =
            store.with_retention(Retention { keep_last: self.store.keep_last, keep_every: self.store.keep_every });
        for skipped in &resume.skipped {
            tracing::warn!("skipped a checkpoint that does not verify: {skipped}");
        }
        let server_state = resume.server_state;
        let (start_round, global, resumed_from) = match resume.latest {
            Some((round, pool)) => (round, pool, resume.path),
            None => {
                let pool = AdapterPool::init(&spec, self.seed).map_err(|e| field("pool", e))?;
                store.write_initial(&pool).map_err(store_err)?;
                (Round(0), pool, None)
            }
        };
        let decode_limits = DecodeLimits::for_spec(&spec);
        let engine_config = EngineConfig {
            total_rounds: self.rounds,
            clients_per_round: self.clients_per_round,
            quorum: self.quorum,
            over_selection: self.over_selection,
            min_clients_to_start: self.min_clients_to_start.unwrap_or(self.clients_per_round),
            deadline: self.deadline,
            local_steps: self.local_steps,
            seed: self.seed,
            download_codec,
            decode_limits,
            backbone,
            heartbeat: self.heartbeat,
            idle_timeout: self.idle_timeout,
            eval_deadline: self.evaluate.then(|| self.eval_deadline.unwrap_or(self.deadline)),
            trust: self.trust()?,
        };
        let mut merge = self.budget.merge(&spec, aggregate).map_err(|e| field("aggregate", e))?;
        if !server_state.is_empty() {
            merge.load_server_state(&server_state).map_err(|e| ConfigError::Store {
                dir: self.state_dir.clone(),
                problem: format!("the server state saved with round {start_round}: {e}"),
            })?;
        } else if start_round.0 > 0 && !merge.server_state().is_empty() {
            tracing::warn!(round = %start_round, "no server optimiser state was saved with the resumed round; FedAdam's moments start from zero");
        }
        let planner = self.budget.planner(&spec, self.deadline, self.rounds).map_err(|e| field("budget", e))?;
        // The norm bound's reference: the median update norm of the round resumed from.
        let median = store.rounds().iter().rev().find(|r| r.round == start_round.0).and_then(|r| r.median_update_norm);
        let mut engine = Engine::new(engine_config, spec, merge, start_round, global)?.with_norm_median(median);
        if let Some(planner) = planner {
            engine = engine.with_ranks(planner);
        }
        // A crash after a commit but before its evaluation was logged: evaluate that pool first.
        let evaluated =
            store.rounds().iter().rev().find(|r| r.round == start_round.0).is_some_and(|r| r.eval.is_some());
        if self.evaluate && start_round.0 > 0 && !evaluated {
            engine.resume_evaluation();
        }
        Ok(Prepared { net: self.net_setup(), engine, store, start_round, resumed_from })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../server.example.toml");

    #[test]
    fn the_example_file_parses_and_paths_are_rebased() {
        let c = ServerConfig::parse(EXAMPLE, Path::new("/etc/fedpool")).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/fedpool/state"));
        assert_eq!(c.revocation_list_path(), Path::new("/etc/fedpool/certs/revoked.txt"));
        assert!(c.pool_spec().is_ok());
    }

    #[test]
    fn every_field_of_the_example_is_documented_in_help() {
        for line in EXAMPLE.lines() {
            let line = line.trim_start_matches('#').trim();
            let Some((key, _)) = line.split_once('=') else { continue };
            let key = key.trim();
            if key.is_empty() || key.contains(' ') {
                continue;
            }
            assert!(CONFIG_REFERENCE.contains(key), "field {key:?} is not in CONFIG_REFERENCE");
        }
    }

    #[test]
    fn network_bounds_default_as_documented_and_a_bad_one_is_named() {
        let c = ServerConfig::parse(EXAMPLE, Path::new(".")).unwrap();
        let net = c.net_setup();
        assert_eq!(net.bounds, NetBounds::default());
        assert_eq!(net.upload_budget(), 1 << 30, "256 MiB frames: 1 GiB");
        let big = EXAMPLE.replace("rounds = 20", "rounds = 20\nmax_frame_bytes = 536870912");
        assert_eq!(ServerConfig::parse(&big, Path::new(".")).unwrap().net_setup().upload_budget(), 2 << 30);
        for (line, name) in [
            ("max_connections = 0", "max_connections"),
            ("upload_stall_timeout = \"11m\"", "upload_stall_timeout"),
            ("control_timeout = \"0s\"", "control_timeout"),
            ("max_upload_bytes_in_flight = 0", "max_upload_bytes_in_flight"),
        ] {
            let bad = EXAMPLE.replace("rounds = 20", &format!("rounds = 20\n{line}"));
            let e = ServerConfig::parse(&bad, Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(name), "{line}: {e}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = EXAMPLE.replace("quorum = 2", "quorum = 9");
        let e = ServerConfig::parse(&bad, Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("quorum"), "{e}");
        let bad = EXAMPLE.replace("rounds = 20", "rounds = 20\nsurprise = 1");
        let e = ServerConfig::parse(&bad, Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("surprise"), "{e}");
        let bad = EXAMPLE.replace("strategy = \"fedavg\"", "strategy = \"mode\"");
        let e = ServerConfig::parse(&bad, Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("aggregate.strategy"), "{e}");
    }

    #[test]
    fn the_roster_and_the_trust_settings_parse_and_a_bad_entry_is_named() {
        let text = EXAMPLE.replace("rounds = 20", "rounds = 20\nmax_examples_per_update = 500\nstrikes = 2")
            + "\n[clients]\na = { max_examples = 50 }\nb = { weight = 7 }\n";
        let c = ServerConfig::parse(&text, Path::new(".")).unwrap();
        let t = c.trust().unwrap();
        assert_eq!(t.max_examples_per_update, 500);
        assert_eq!(t.strikes, 2);
        assert_eq!(t.roster["a"], RosterEntry::MaxExamples(50));
        assert_eq!(t.roster["b"], RosterEntry::Weight(7));
        assert_eq!(t.norm_bound, NormBound::Median { factor: 3.0, first_round: None }, "on by default");
        let both = format!("{EXAMPLE}\n[clients]\na = {{ max_examples = 5, weight = 5 }}\n");
        let e = ServerConfig::parse(&both, Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("clients") && e.contains("\"a\""), "{e}");
        let section = |body: &str| -> AggregateSection { toml::from_str(body).unwrap() };
        assert_eq!(section("norm_bound = \"off\"").norm_bound().unwrap(), NormBound::Off);
        assert!(section("norm_bound = \"absolute\"").norm_bound().is_err());
        assert_eq!(
            section("strategy = \"krum\"\nkrum_byzantine = 2\nkrum_select = 3").to_config().unwrap().rule,
            Rule::Krum { byzantine: 2, select: 3, max_updates: 1024 }
        );
    }

    #[test]
    fn lora_merges_parse_and_a_bad_one_is_named() {
        let section = |body: &str| -> AggregateSection { toml::from_str(body).unwrap() };
        assert_eq!(section("").to_config().unwrap().lora_merge, LoraMerge::FactorMean);
        assert_eq!(section("lora_merge = \"exact\"").to_config().unwrap().lora_merge, LoraMerge::Exact);
        let fair = section("lora_merge = \"fair\"\nlora_fair_lambda = 0.5").to_config().unwrap();
        assert_eq!(fair.lora_merge, LoraMerge::Fair { lambda: 0.5 });
        let e = section("lora_merge = \"median\"").to_config().unwrap_err().to_string();
        assert!(e.contains("aggregate.lora_merge") && e.contains("median"), "{e}");
    }
}
