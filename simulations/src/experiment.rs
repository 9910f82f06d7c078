//! An experiment: the TOML file `fedpool-sim run --config sim.toml` reads (or the embedded
//! [`DEFAULT_EXPERIMENT`]), checked, with its paths resolved against the file's folder.
//!
//! The tables reuse the product's own configuration types, so a setting means the same thing in
//! a simulation as in a deployment: `[adapter]`, `[train]` and `[upload_codec]` are the client
//! daemon's, `[download_codec]` and `[aggregate]` the server's, `[network]` the simulator's
//! [`NetworkConfig`]. `[partition]` chooses how the data is dealt to the virtual clients and
//! `[federation]` sets the rounds as the server's `server.toml` does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpool_client::data::DataOptions;
use fedpool_client::session::config::{AdapterSection, TrainSection};
use fedpool_client::train::TrainConfig;
use fedpool_common::codec::CodecSettings;
use fedpool_server::config::AggregateSection;
use fedpool_server::ranks::BudgetSection;
use serde::{Deserialize, Serialize};

use crate::network::NetworkConfig;

/// The experiment `fedpool-sim run` runs without `--config`: MiniLM, VADER dealt to 8 clients with
/// 2 domains each, a FedIns SSF pool, 3 rounds; a few minutes on 2 CPU cores.
pub const DEFAULT_EXPERIMENT: &str = include_str!("../default.toml");

/// Why an experiment file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for an experiment (toml's message names the line and field).
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or "the default experiment".
        origin: String,
        /// What toml said.
        message: String,
    },
    /// A value is out of range.
    #[error("{origin}: {field}: {problem}")]
    Field {
        /// The file, or "the default experiment".
        origin: String,
        /// The field, as written in the file (`federation.quorum`).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// How virtual clients train in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// All selected clients together: one batched forward/backward per step over the shared
    /// backbone (`tenancy::train_lockstep_bounded`). Specs lockstep does not cover (a single SSF
    /// adapter, the linear probe) train sequentially.
    #[default]
    Lockstep,
    /// One client after another with the client's own trainer, as Flower and OpenFedLLM run
    /// virtual clients.
    Sequential,
}

/// The `[partition]` table: how the examples are dealt to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "lowercase", deny_unknown_fields)]
pub enum PartitionScheme {
    /// Shuffled and dealt evenly.
    Iid,
    /// Label skew: each label split by proportions drawn from Dir(α).
    Dirichlet {
        /// Concentration; smaller is more skewed.
        alpha: f64,
        /// Fewest examples a client may get (the draw is repeated until every client has them).
        #[serde(default = "default_min_size")]
        min_size: usize,
    },
    /// Natural groups (VADER's domains, a file's group column): each client holds this many.
    Groups {
        /// Groups per client.
        groups_per_client: usize,
    },
    /// An explicit split file: a JSON object client name → example ids, honoured exactly.
    File {
        /// The split file (relative to the experiment file's folder).
        file: PathBuf,
    },
}

/// The global test set an experiment names (its `global_test`), parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalTest {
    /// `"unused:N"`: N examples of the data that no client holds (neither training nor held-out),
    /// drawn with the experiment's seed after the partition and the per-client subsets.
    Unused(usize),
    /// A JSON file holding an array of example ids, resolved against the experiment file's folder.
    File(PathBuf),
}

fn default_min_size() -> usize {
    10
}

/// The `[federation]` table: rounds as the server runs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// Rounds to run.
    #[serde(default = "default_rounds")]
    pub rounds: u64,
    /// Updates a round wants (default: every client).
    #[serde(default)]
    pub clients_per_round: Option<usize>,
    /// Fewest updates a round commits with (default: half of `clients_per_round`, rounded up).
    #[serde(default)]
    pub quorum: Option<usize>,
    /// Extra clients sampled against stragglers (≥ 1).
    #[serde(default = "default_over_selection")]
    pub over_selection: f64,
    /// Simulated seconds a round waits for updates.
    #[serde(default = "default_deadline")]
    pub deadline_s: f64,
    /// Local optimisation steps per round.
    #[serde(default = "default_local_steps")]
    pub local_steps: u32,
    /// Simulated seconds one training example (forward + backward) takes on a client of speed
    /// 1; a client's compute time is `local_steps × batch_size × this / speed`. The default,
    /// 0.2 s, is a slow client: MiniLM trained at 5 samples/s on 2 busy CPU cores (the dev
    /// machine; alone and with `frozen_matmul` it trains about 13 samples/s, 0.08 s).
    #[serde(default = "default_seconds_per_sample")]
    pub seconds_per_sample: f64,
}

fn default_rounds() -> u64 {
    3
}
fn default_over_selection() -> f64 {
    1.0
}
fn default_deadline() -> f64 {
    600.0
}
fn default_local_steps() -> u32 {
    5
}
fn default_seconds_per_sample() -> f64 {
    0.2
}

impl Default for FederationSection {
    fn default() -> Self {
        Self {
            rounds: default_rounds(),
            clients_per_round: None,
            quorum: None,
            over_selection: default_over_selection(),
            deadline_s: default_deadline(),
            local_steps: default_local_steps(),
            seconds_per_sample: default_seconds_per_sample(),
        }
    }
}

/// One simulated experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// The run's name (in plots, `summary.json`).
    #[serde(default = "default_name")]
    pub name: String,
    /// Seed of everything: partition, splits, initial pool, sampling, batch orders.
    #[serde(default)]
    pub seed: u64,
    /// The frozen backbone: an HF folder (default: the fetched MiniLM, `assets/minilm`) or a decoder's `.gguf` file.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// The data: a built-in name (`vader`, `vader:tweets,movieReviewSnippets`, `trec`, `sms`) or a
    /// CSV / TSV / JSONL file.
    #[serde(default = "default_data")]
    pub data: String,
    /// Columns and labels of a data file.
    #[serde(default)]
    pub data_options: DataOptions,
    /// `cpu`, `cuda:N` or `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Virtual clients.
    #[serde(default = "default_clients")]
    pub clients: usize,
    /// Each client keeps at most this many of its examples (a seeded random choice) before its
    /// train / held-out split (default: all).
    #[serde(default)]
    pub max_examples_per_client: Option<usize>,
    /// Fraction of each client's examples held out for federated evaluation.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Each client evaluates on at most this many held-out examples (default: all).
    #[serde(default)]
    pub eval_max_examples: Option<usize>,
    /// A global test set every committed global pool is also scored on (Flower's "centralised
    /// evaluation"; default: none): `"unused:N"`, a seeded random N examples of the data that no
    /// client holds, or a JSON file (relative to the experiment file's folder) holding an array of
    /// example ids, none of them in a client's training set. Parsed by
    /// [`Experiment::global_test_set`].
    #[serde(default)]
    pub global_test: Option<String>,
    /// Lockstep or sequential training of the selected clients.
    #[serde(default)]
    pub mode: Mode,
    /// Lockstep: most rows in one forward/backward. The selected clients train in groups whose
    /// batches fit in this many rows, one group after another (all of a group's steps, then its
    /// updates are encoded and its adapters and optimizer state freed), so memory holds one
    /// group, not every client. The result does not depend on it. Default: one client per pass
    /// on a CPU (measured fastest there: big passes leave the cache; README, "Benchmark"), 256
    /// rows on a GPU.
    #[serde(default)]
    pub max_rows_per_pass: Option<usize>,
    /// How the data is dealt.
    #[serde(default = "default_partition")]
    pub partition: PartitionScheme,
    /// Rounds.
    #[serde(default)]
    pub federation: FederationSection,
    /// The adapter every client trains (the daemon's `[adapter]`).
    #[serde(default)]
    pub adapter: AdapterSection,
    /// Local training (the daemon's `[train]`).
    #[serde(default)]
    pub train: TrainSection,
    /// How clients encode their updates (the daemon's `[upload_codec]`).
    #[serde(default)]
    pub upload_codec: CodecSettings,
    /// How the server encodes the global pool in tasks (the server's `[download_codec]`).
    #[serde(default)]
    pub download_codec: CodecSettings,
    /// How the server merges updates (the server's `[aggregate]`).
    #[serde(default)]
    pub aggregate: AggregateSection,
    /// Per-client LoRA rank budgets (the server's `[budget]`).
    #[serde(default)]
    pub budget: BudgetSection,
    /// Bandwidth, latency, availability and compute speed of the clients.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The folder relative paths are taken from (the experiment file's; not in the file).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Where the experiment came from, for messages (not in the file).
    #[serde(skip)]
    pub origin: String,
}

fn default_name() -> String {
    "experiment".into()
}
fn default_data() -> String {
    "vader".into()
}
fn default_device() -> String {
    "cpu".into()
}
fn default_clients() -> usize {
    8
}
fn default_test_fraction() -> f64 {
    0.2
}
/// Rows per lockstep pass on a GPU when the experiment does not say.
pub const GPU_ROWS_PER_PASS: usize = 256;
fn default_partition() -> PartitionScheme {
    PartitionScheme::Iid
}

impl Experiment {
    /// Reads and checks an experiment file; relative paths are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, ExperimentError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ExperimentError::Io { path: path.to_path_buf(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &base, &path.display().to_string())
    }

    /// The embedded default experiment; relative paths are taken from the working directory.
    pub fn default_experiment() -> Result<Self, ExperimentError> {
        Self::parse(DEFAULT_EXPERIMENT, Path::new("."), "the default experiment")
    }

    /// Parses and checks experiment TOML; `origin` names it in errors.
    pub fn parse(text: &str, base: &Path, origin: &str) -> Result<Self, ExperimentError> {
        let mut e: Experiment = toml::from_str(text)
            .map_err(|err| ExperimentError::Parse { origin: origin.to_string(), message: err.to_string() })?;
        e.base_dir = base.to_path_buf();
        e.origin = origin.to_string();
        e.validate()?;
        Ok(e)
    }

    /// The experiment as TOML (the resolved configuration written next to the results).
    pub fn to_toml(&self) -> Result<String, ExperimentError> {
        toml::to_string_pretty(self)
            .map_err(|err| ExperimentError::Parse { origin: self.origin.clone(), message: err.to_string() })
    }

    fn bad(&self, field: &'static str, problem: impl Into<String>) -> ExperimentError {
        ExperimentError::Field { origin: self.origin.clone(), field, problem: problem.into() }
    }

    /// Checks every value that this crate owns (the reused tables are checked where they are
    /// turned into the product's types, with the same messages as the daemon and the server).
    pub fn validate(&self) -> Result<(), ExperimentError> {
        if self.clients == 0 {
            return Err(self.bad("clients", "must be at least 1"));
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return Err(self.bad("test_fraction", format!("{} must be in (0, 1)", self.test_fraction)));
        }
        if self.max_examples_per_client == Some(0) {
            return Err(self.bad("max_examples_per_client", "must be at least 1"));
        }
        if self.eval_max_examples == Some(0) {
            return Err(self.bad("eval_max_examples", "must be at least 1"));
        }
        self.global_test_set()?;
        if self.max_rows_per_pass == Some(0) {
            return Err(self.bad("max_rows_per_pass", "must be at least 1"));
        }
        match &self.partition {
            PartitionScheme::Dirichlet { alpha, .. } if !(alpha.is_finite() && *alpha > 0.0) => {
                return Err(self.bad("partition.alpha", format!("{alpha} must be a finite number > 0")));
            }
            PartitionScheme::Groups { groups_per_client: 0 } => {
                return Err(self.bad("partition.groups_per_client", "must be at least 1"));
            }
            _ => {}
        }
        let f = &self.federation;
        if f.rounds == 0 {
            return Err(self.bad("federation.rounds", "must be at least 1"));
        }
        let per_round = self.clients_per_round();
        if per_round == 0 || per_round > self.clients {
            return Err(self.bad(
                "federation.clients_per_round",
                format!("{per_round} must be in 1..={} (the clients)", self.clients),
            ));
        }
        let quorum = self.quorum();
        if quorum == 0 || quorum > per_round {
            return Err(self.bad("federation.quorum", format!("{quorum} must be in 1..={per_round}")));
        }
        if !(f.over_selection.is_finite() && f.over_selection >= 1.0) {
            return Err(self.bad("federation.over_selection", format!("{} must be ≥ 1", f.over_selection)));
        }
        if !(f.deadline_s.is_finite() && f.deadline_s > 0.0 && f.deadline_s < 1e9) {
            return Err(self.bad("federation.deadline_s", format!("{} must be in (0, 1e9)", f.deadline_s)));
        }
        if f.local_steps == 0 {
            return Err(self.bad("federation.local_steps", "must be at least 1"));
        }
        if !(f.seconds_per_sample.is_finite() && f.seconds_per_sample >= 0.0) {
            return Err(self.bad("federation.seconds_per_sample", format!("{} must be ≥ 0", f.seconds_per_sample)));
        }
        if self.train.batch_size == 0 {
            return Err(self.bad("train.batch_size", "must be at least 1"));
        }
        let adapter = self.adapter.to_options().map_err(|e| self.bad("adapter.kind", e.to_string()))?;
        self.train.lora_variant.check_adapter(adapter.choice).map_err(|e| self.bad("train.lora_variant", e))?;
        self.upload_codec.to_schedule().map_err(|e| self.bad("upload_codec", e.to_string()))?;
        self.download_codec.to_codec().map_err(|e| self.bad("download_codec", e.to_string()))?;
        self.aggregate.to_config().map_err(|e| self.bad("aggregate", e.to_string()))?;
        self.aggregate.norm_bound().map_err(|e| self.bad("aggregate", e.to_string()))?;
        self.network.validate().map_err(|e| self.bad("network", e.to_string()))?;
        Ok(())
    }

    /// The global test set `global_test` names (`None` without one): `"unused:N"` with a positive
    /// whole N, or any other non-empty text as a file path taken from the experiment's folder.
    pub fn global_test_set(&self) -> Result<Option<GlobalTest>, ExperimentError> {
        let Some(text) = self.global_test.as_deref() else { return Ok(None) };
        if let Some(count) = text.strip_prefix("unused:") {
            return match count.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(Some(GlobalTest::Unused(n))),
                _ => Err(self.bad("global_test", format!("{text:?}: \"unused:N\" needs a whole number N ≥ 1"))),
            };
        }
        if text.trim().is_empty() {
            return Err(self.bad("global_test", "is empty: give \"unused:N\" or a JSON file of example ids"));
        }
        Ok(Some(GlobalTest::File(self.base_dir.join(text))))
    }

    /// Updates a round wants.
    pub fn clients_per_round(&self) -> usize {
        self.federation.clients_per_round.unwrap_or(self.clients)
    }

    /// Fewest updates a round commits with.
    pub fn quorum(&self) -> usize {
        self.federation.quorum.unwrap_or(self.clients_per_round().div_ceil(2))
    }

    /// The round deadline.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.federation.deadline_s)
    }

    /// The local training settings every client uses (steps and seed are set per task): a
    /// constant learning rate without warm-up, since each round continues one run (as the
    /// daemon trains).
    pub fn train_config(&self) -> Result<TrainConfig, crate::error::SimError> {
        let options = self.adapter.to_options()?;
        Ok(self.train.round_config(options.choice, self.seed))
    }

    /// The backbone's path (a folder, or a decoder's GGUF file).
    pub fn model_dir(&self) -> PathBuf {
        match &self.model {
            Some(p) => self.base_dir.join(p),
            None => fedpool_client::setup::default_model_dir(),
        }
    }

    /// The data spec with a relative file path taken from the experiment's folder (built-in
    /// names are left alone).
    pub fn data_spec(&self) -> String {
        let candidate = self.base_dir.join(&self.data);
        if !Path::new(&self.data).is_absolute() && candidate.is_file() {
            candidate.display().to_string()
        } else {
            self.data.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_experiment_parses_and_round_trips() {
        let e = Experiment::default_experiment().unwrap();
        assert_eq!(e.clients, 8);
        assert_eq!(e.partition, PartitionScheme::Groups { groups_per_client: 2 });
        assert_eq!(e.adapter.kind, "ssf-pool");
        let again = Experiment::parse(&e.to_toml().unwrap(), Path::new("."), "again").unwrap();
        assert_eq!(again, Experiment { origin: "again".into(), ..e.clone() });
        let with_test = Experiment { global_test: Some("unused:50".into()), ..e };
        let again = Experiment::parse(&with_test.to_toml().unwrap(), Path::new("."), "again").unwrap();
        assert_eq!(again.global_test_set().unwrap(), Some(GlobalTest::Unused(50)));
        assert_eq!(again, Experiment { origin: "again".into(), ..with_test });
    }

    #[test]
    fn bad_values_are_named() {
        let check = |text: &str, field: &str| {
            let err = Experiment::parse(text, Path::new("."), "t.toml").unwrap_err().to_string();
            assert!(err.contains(field) && err.starts_with("t.toml"), "{err}");
        };
        check("clients = 0", "clients");
        check("clients = 4\n[federation]\nclients_per_round = 5", "federation.clients_per_round");
        check("[federation]\nquorum = 9", "federation.quorum");
        check("[federation]\ndeadline_s = -1", "federation.deadline_s");
        check("[partition]\nscheme = \"dirichlet\"\nalpha = 0", "partition.alpha");
        check("[partition]\nscheme = \"shuffle\"", "scheme");
        check("[adapter]\nkind = \"prefix\"", "adapter.kind");
        check("[aggregate]\nstrategy = \"mode\"", "aggregate");
        check("[aggregate]\nnorm_bound = \"absolute\"", "aggregate");
        check("surprise = 1", "surprise");
        check("test_fraction = 1.5", "test_fraction");
        check("global_test = \"unused:x\"", "global_test");
        check("global_test = \"unused:0\"", "global_test");
        check("global_test = \"\"", "global_test");
    }

    #[test]
    fn defaults_follow_the_clients() {
        let e = Experiment::parse("clients = 5", Path::new("."), "t").unwrap();
        assert_eq!(e.clients_per_round(), 5);
        assert_eq!(e.quorum(), 3);
        assert_eq!(e.deadline(), Duration::from_secs(600));
    }
}
