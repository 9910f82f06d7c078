//! The simulator's network and device model: how long each virtual client takes for a round, and
//! whether it shows up at all.
//!
//! A [`NetworkConfig`] (the `[network]` table of a simulation config) describes the population:
//! per-client upload and download bandwidth ([`BandwidthSpec`]: fixed, lognormal with a median and
//! a spread, or a CSV trace), one latency, the probability that a client is available in a round,
//! the probability that an available, selected client drops out mid-round, and relative compute
//! speed ([`ComputeSpec`]). [`NetworkModel::new`] draws each client's [`ClientLink`] once; after
//! that the model answers questions about a round:
//!
//! - [`NetworkModel::available`] / [`NetworkModel::drops_out`]: Bernoulli draws per (round, client);
//! - [`NetworkModel::round_time`]: download + local compute + upload, each transfer paying the
//!   latency once: `latency + down/download_bps + compute/compute_speed + latency + up/upload_bps`;
//! - [`NetworkModel::outcome`]: all of it against a deadline; a client past the deadline is a
//!   straggler.
//!
//! Pure and synchronous, like the round engine: no clock, no I/O after construction (a trace file
//! is read once, in [`NetworkModel::new`]). Everything is deterministic in the seed and never
//! depends on call order: each draw has its own [`ChaCha8Rng`] keyed by (seed, what is drawn,
//! round, client), so client 7's upload bandwidth does not depend on how many clients there are or
//! on the compute spec, and asking about round 9 before round 3 changes nothing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// Φ⁻¹(0.9), the standard normal's 90th percentile: a lognormal with log-scale σ has
/// p90/p10 = exp(2·Z90·σ).
const Z90: f64 = 1.281_551_565_544_600_4;

/// Draw domains: each kind of draw has its own key space, so the draws are independent.
const DOMAIN_UPLOAD: u64 = u64::from_le_bytes(*b"upload\0\0");
const DOMAIN_DOWNLOAD: u64 = u64::from_le_bytes(*b"download");
const DOMAIN_COMPUTE: u64 = u64::from_le_bytes(*b"compute\0");
const DOMAIN_AVAILABLE: u64 = u64::from_le_bytes(*b"availabl");
const DOMAIN_DROPOUT: u64 = u64::from_le_bytes(*b"dropout\0");

/// The network and device population of a simulation: the `[network]` table of its config.
///
/// `upload` and `download` must be given in a config file; every other field has a default.
/// [`NetworkConfig::default`] is a plain, ideal-ish population: 10 Mbit/s up, 100 Mbit/s down
/// for every client, 20 ms latency, always available, never dropping out, all at speed 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Client → server bandwidth, bytes per second.
    pub upload: BandwidthSpec,
    /// Server → client bandwidth, bytes per second.
    pub download: BandwidthSpec,
    /// One-way latency in milliseconds, paid once by the download and once by the upload
    /// (default 20). Finite and ≥ 0.
    #[serde(default = "default_latency_ms")]
    pub latency_ms: f64,
    /// Probability that a client is available (online, willing) in a given round, in [0, 1]
    /// (default 1).
    #[serde(default = "default_availability")]
    pub availability: f64,
    /// Probability that an available, selected client drops out mid-round and never answers, in
    /// [0, 1] (default 0).
    #[serde(default)]
    pub dropout: f64,
    /// Relative compute speed: a client of speed 2 does the same local work in half the time
    /// (default: fixed 1).
    #[serde(default)]
    pub compute: ComputeSpec,
    /// Seed of every draw the model makes (default 0).
    #[serde(default)]
    pub seed: u64,
}

fn default_latency_ms() -> f64 {
    20.0
}

fn default_availability() -> f64 {
    1.0
}

impl Default for NetworkConfig {
    /// 10 Mbit/s up, 100 Mbit/s down, 20 ms, always available, no dropout, speed 1, seed 0.
    fn default() -> Self {
        NetworkConfig {
            upload: BandwidthSpec::Fixed { bytes_per_sec: 1.25e6 },
            download: BandwidthSpec::Fixed { bytes_per_sec: 1.25e7 },
            latency_ms: default_latency_ms(),
            availability: default_availability(),
            dropout: 0.0,
            compute: ComputeSpec::default(),
            seed: 0,
        }
    }
}

/// How a client's bandwidth in one direction is chosen, in bytes per second. Written in TOML as
/// an inline table with a `kind`: `{ kind = "fixed", bytes_per_sec = 1e6 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BandwidthSpec {
    /// Every client gets the same bandwidth.
    Fixed {
        /// Bytes per second; finite and > 0.
        bytes_per_sec: f64,
    },
    /// Each client draws its bandwidth once from a lognormal distribution.
    LogNormal {
        /// The population's median, bytes per second; finite and > 0.
        median_bytes_per_sec: f64,
        /// The spread: the 90th percentile over the 10th, ≥ 1 (1 = everyone at the median;
        /// 10 = σ = ln 10 / (2·1.2816) ≈ 0.90 in log space).
        p90_over_p10: f64,
    },
    /// Bandwidths measured elsewhere: a CSV file with a header row and one row per client, in
    /// client order; clients beyond the last row wrap around to the first.
    Trace {
        /// The CSV file, relative to the config's folder (`base_dir` of [`NetworkModel::new`]).
        file: PathBuf,
        /// The header of the column that holds bytes per second.
        column: String,
    },
}

/// How a client's relative compute speed is chosen. Written in TOML as an inline table with a
/// `kind`: `{ kind = "lognormal", median = 1.0, p90_over_p10 = 4.0 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ComputeSpec {
    /// Every client has the same speed.
    Fixed {
        /// Relative speed; finite and > 0 (1 = the speed the caller's compute times refer to).
        speed: f64,
    },
    /// Each client draws its speed once from a lognormal distribution.
    LogNormal {
        /// The population's median speed; finite and > 0.
        median: f64,
        /// The 90th percentile over the 10th, ≥ 1.
        p90_over_p10: f64,
    },
}

impl Default for ComputeSpec {
    /// Every client at speed 1.
    fn default() -> Self {
        ComputeSpec::Fixed { speed: 1.0 }
    }
}

/// One client's drawn link and device, fixed for the whole simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLink {
    /// Client → server bandwidth, bytes per second (finite, > 0).
    pub upload_bps: f64,
    /// Server → client bandwidth, bytes per second (finite, > 0).
    pub download_bps: f64,
    /// One-way latency, paid once per transfer.
    pub latency: Duration,
    /// Relative compute speed (finite, > 0): local work that takes `t` at speed 1 takes
    /// `t / compute_speed`.
    pub compute_speed: f64,
}

/// What became of one selected client in one round, as [`NetworkModel::outcome`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOutcome {
    /// The client was not available this round (it should not have been selected).
    Unavailable,
    /// The client started the round and dropped out; it never answers.
    DroppedOut,
    /// The client's result arrives in time, `time` after the round started.
    OnTime {
        /// The client's simulated round time, ≤ the deadline.
        time: Duration,
    },
    /// The client would answer only after the deadline.
    Straggler {
        /// The client's simulated round time, > the deadline.
        time: Duration,
    },
}

/// Everything that can be wrong with a network config or its trace files.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A number in the config is out of range.
    #[error("{field} = {value:?}: must be {expected}")]
    InvalidField {
        /// The field's path, e.g. `network.upload.median_bytes_per_sec`.
        field: String,
        /// The value given.
        value: f64,
        /// What it must be, e.g. `finite and > 0`.
        expected: &'static str,
    },
    /// A lognormal spread so wide that a client drew a bandwidth or speed that is 0 or infinite.
    #[error(
        "{field}: client {client} drew {value:?}, not a finite number > 0; \
         p90_over_p10 = {p90_over_p10:?} is too wide"
    )]
    DrawOutOfRange {
        /// The spec's path, e.g. `network.upload`.
        field: String,
        /// The client whose draw failed.
        client: usize,
        /// What it drew.
        value: f64,
        /// The spread configured.
        p90_over_p10: f64,
    },
    /// A trace file could not be opened.
    #[error("{field} trace {}: {source}", path.display())]
    TraceIo {
        /// The spec's path, e.g. `network.upload`.
        field: String,
        /// The trace file, joined to the base folder.
        path: PathBuf,
        /// Why it could not be opened.
        source: std::io::Error,
    },
    /// A trace file is not readable CSV (I/O error while reading, invalid UTF-8, …).
    #[error("{field} trace {}{}: {source}", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default())]
    TraceCsv {
        /// The spec's path, e.g. `network.upload`.
        field: String,
        /// The trace file.
        path: PathBuf,
        /// The line the CSV reader was on, when it knows.
        line: Option<u64>,
        /// The CSV reader's error.
        source: csv::Error,
    },
    /// A trace file has no header row, or no data rows.
    #[error("{field} trace {}: {what}", path.display())]
    TraceEmpty {
        /// The spec's path, e.g. `network.upload`.
        field: String,
        /// The trace file.
        path: PathBuf,
        /// `"empty file, no header row"` or `"no data rows after the header"`.
        what: &'static str,
    },
    /// The trace's header has no column of the configured name.
    #[error("{field} trace {}: no column {column:?} in the header (columns: {available})", path.display())]
    TraceMissingColumn {
        /// The spec's path, e.g. `network.upload`.
        field: String,
        /// The trace file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// The header's columns, comma-separated.
        available: String,
    },
    /// A trace row has a missing, non-numeric, non-finite or non-positive value in the column.
    #[error("{field} trace {}, line {line}, column {column:?}: {value:?} {problem}", path.display())]
    TraceBadValue {
        /// The spec's path, e.g. `network.upload`.
        field: String,
        /// The trace file.
        path: PathBuf,
        /// The 1-based line of the row (the header is line 1).
        line: u64,
        /// The column's name.
        column: String,
        /// The text found (empty when the row is too short).
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl NetworkConfig {
    /// Checks every number: bandwidths and speeds finite and > 0, spreads finite and ≥ 1,
    /// latency finite and ≥ 0, probabilities in [0, 1]. Trace files are checked by
    /// [`NetworkModel::new`], which reads them.
    ///
    /// # Errors
    /// [`NetworkError::InvalidField`] naming the first field out of range, e.g.
    /// `network.upload.p90_over_p10 = 0.5: must be finite and >= 1`.
    pub fn validate(&self) -> Result<(), NetworkError> {
        validate_bandwidth(&self.upload, "network.upload")?;
        validate_bandwidth(&self.download, "network.download")?;
        check(self.latency_ms, "network.latency_ms", "finite and >= 0", |v| v.is_finite() && v >= 0.0)?;
        check_probability(self.availability, "network.availability")?;
        check_probability(self.dropout, "network.dropout")?;
        match self.compute {
            ComputeSpec::Fixed { speed } => check_positive(speed, "network.compute.speed"),
            ComputeSpec::LogNormal { median, p90_over_p10 } => {
                check_positive(median, "network.compute.median")?;
                check_spread(p90_over_p10, "network.compute.p90_over_p10")
            }
        }
    }
}

fn check(value: f64, field: &str, expected: &'static str, ok: impl Fn(f64) -> bool) -> Result<(), NetworkError> {
    if ok(value) {
        Ok(())
    } else {
        Err(NetworkError::InvalidField { field: field.to_owned(), value, expected })
    }
}

fn check_positive(value: f64, field: &str) -> Result<(), NetworkError> {
    check(value, field, "finite and > 0", |v| v.is_finite() && v > 0.0)
}

fn check_spread(value: f64, field: &str) -> Result<(), NetworkError> {
    check(value, field, "finite and >= 1", |v| v.is_finite() && v >= 1.0)
}

fn check_probability(value: f64, field: &str) -> Result<(), NetworkError> {
    check(value, field, "a probability in [0, 1]", |v| (0.0..=1.0).contains(&v))
}

fn validate_bandwidth(spec: &BandwidthSpec, field: &str) -> Result<(), NetworkError> {
    match spec {
        BandwidthSpec::Fixed { bytes_per_sec } => check_positive(*bytes_per_sec, &format!("{field}.bytes_per_sec")),
        BandwidthSpec::LogNormal { median_bytes_per_sec, p90_over_p10 } => {
            check_positive(*median_bytes_per_sec, &format!("{field}.median_bytes_per_sec"))?;
            check_spread(*p90_over_p10, &format!("{field}.p90_over_p10"))
        }
        BandwidthSpec::Trace { .. } => Ok(()),
    }
}

/// The log-scale σ of a lognormal whose 90th percentile is `p90_over_p10` times its 10th.
pub fn lognormal_sigma(p90_over_p10: f64) -> f64 {
    p90_over_p10.ln() / (2.0 * Z90)
}

/// The RNG of one draw: ChaCha8 keyed by (seed, domain, round, index), so distinct draws never
/// share a key and no draw depends on another having been made.
fn draw_rng(seed: u64, domain: u64, round: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_exact_mut(8).zip([seed, domain, round, index]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Client `client`'s draw from a lognormal with the given median and spread.
fn draw_lognormal(seed: u64, domain: u64, client: usize, median: f64, p90_over_p10: f64) -> f64 {
    let z: f64 = draw_rng(seed, domain, 0, client as u64).sample(StandardNormal);
    median * (lognormal_sigma(p90_over_p10) * z).exp()
}

/// One value per client from a spec: `per_client.len() == clients`.
fn draw_all(
    clients: usize,
    field: &str,
    p90_over_p10: f64,
    draw: impl Fn(usize) -> f64,
) -> Result<Vec<f64>, NetworkError> {
    (0..clients)
        .map(|client| {
            let value = draw(client);
            if value.is_finite() && value > 0.0 {
                Ok(value)
            } else {
                Err(NetworkError::DrawOutOfRange { field: field.to_owned(), client, value, p90_over_p10 })
            }
        })
        .collect()
}

fn bandwidths(
    spec: &BandwidthSpec,
    field: &str,
    domain: u64,
    seed: u64,
    clients: usize,
    base_dir: &Path,
) -> Result<Vec<f64>, NetworkError> {
    match spec {
        BandwidthSpec::Fixed { bytes_per_sec } => Ok(vec![*bytes_per_sec; clients]),
        BandwidthSpec::LogNormal { median_bytes_per_sec, p90_over_p10 } => {
            draw_all(clients, field, *p90_over_p10, |c| {
                draw_lognormal(seed, domain, c, *median_bytes_per_sec, *p90_over_p10)
            })
        }
        BandwidthSpec::Trace { file, column } => {
            let rows = read_trace(&base_dir.join(file), column, field)?;
            Ok((0..clients).map(|c| rows[c % rows.len()]).collect())
        }
    }
}

/// Reads the column `column` of a CSV trace: every row's value, finite and > 0; at least one row.
fn read_trace(path: &Path, column: &str, field: &str) -> Result<Vec<f64>, NetworkError> {
    let file = File::open(path).map_err(|source| NetworkError::TraceIo {
        field: field.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let csv_error = |source: csv::Error| NetworkError::TraceCsv {
        field: field.to_owned(),
        path: path.to_owned(),
        line: source.position().map(|p| p.line()),
        source,
    };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).trim(csv::Trim::All).from_reader(file);
    let headers = reader.headers().map_err(csv_error)?.clone();
    if headers.is_empty() {
        return Err(NetworkError::TraceEmpty {
            field: field.to_owned(),
            path: path.to_owned(),
            what: "empty file, no header row",
        });
    }
    let index = headers.iter().position(|h| h == column).ok_or_else(|| NetworkError::TraceMissingColumn {
        field: field.to_owned(),
        path: path.to_owned(),
        column: column.to_owned(),
        available: headers.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>().join(", "),
    })?;
    let mut values = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, |p| p.line());
        let bad = |value: &str, problem| NetworkError::TraceBadValue {
            field: field.to_owned(),
            path: path.to_owned(),
            line,
            column: column.to_owned(),
            value: value.to_owned(),
            problem,
        };
        let text = record.get(index).ok_or_else(|| bad("", "is missing: the row is too short"))?;
        let value: f64 = text.parse().map_err(|_| bad(text, "is not a number (bytes per second)"))?;
        if !(value.is_finite() && value > 0.0) {
            return Err(bad(text, "must be a finite number of bytes per second > 0"));
        }
        values.push(value);
    }
    if values.is_empty() {
        return Err(NetworkError::TraceEmpty {
            field: field.to_owned(),
            path: path.to_owned(),
            what: "no data rows after the header",
        });
    }
    Ok(values)
}

/// `seconds` as a [`Duration`], saturating at [`Duration::MAX`] (a round time that overflows is
/// a straggler all the same). `seconds` is never negative or NaN here.
fn saturating_secs(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

/// The drawn network and devices of a simulated population, and the round times they imply.
#[derive(Debug, Clone)]
pub struct NetworkModel {
    links: Vec<ClientLink>,
    availability: f64,
    dropout: f64,
    seed: u64,
}

impl NetworkModel {
    /// Validates `config` and draws the links of clients `0..clients`, deterministically from
    /// `config.seed`. A trace file's path is taken relative to `base_dir` (the config file's
    /// folder); an absolute path is used as is.
    ///
    /// Client `c`'s link depends only on the seed, `c` and its own spec: adding clients or
    /// changing the compute spec leaves the others' bandwidths as they were.
    ///
    /// # Errors
    /// [`NetworkError::InvalidField`] for a number out of range (see [`NetworkConfig::validate`]);
    /// a `Trace*` error naming the file (and the line and column where there is one) for a trace
    /// that cannot be opened, is not CSV, lacks the column, has no rows or holds a value that is
    /// not a finite number > 0; [`NetworkError::DrawOutOfRange`] when a lognormal spread is so
    /// wide that a draw overflows to 0 or infinity.
    pub fn new(config: &NetworkConfig, clients: usize, base_dir: &Path) -> Result<Self, NetworkError> {
        config.validate()?;
        let seed = config.seed;
        let upload = bandwidths(&config.upload, "network.upload", DOMAIN_UPLOAD, seed, clients, base_dir)?;
        let download = bandwidths(&config.download, "network.download", DOMAIN_DOWNLOAD, seed, clients, base_dir)?;
        let speed = match config.compute {
            ComputeSpec::Fixed { speed } => vec![speed; clients],
            ComputeSpec::LogNormal { median, p90_over_p10 } => {
                draw_all(clients, "network.compute", p90_over_p10, |c| {
                    draw_lognormal(seed, DOMAIN_COMPUTE, c, median, p90_over_p10)
                })?
            }
        };
        let latency = saturating_secs(config.latency_ms / 1000.0);
        let links = (0..clients)
            .map(|c| ClientLink { upload_bps: upload[c], download_bps: download[c], latency, compute_speed: speed[c] })
            .collect();
        Ok(NetworkModel { links, availability: config.availability, dropout: config.dropout, seed })
    }

    /// The number of clients drawn.
    pub fn clients(&self) -> usize {
        self.links.len()
    }

    /// Every client's link, in client order.
    pub fn links(&self) -> &[ClientLink] {
        &self.links
    }

    /// Client `client`'s link.
    ///
    /// # Panics
    /// If `client >= self.clients()`.
    pub fn link(&self, client: usize) -> &ClientLink {
        &self.links[client]
    }

    /// Whether `client` is available in `round`: true with probability `availability`,
    /// independently per (round, client), the same answer every time it is asked.
    pub fn available(&self, round: u64, client: usize) -> bool {
        bernoulli(self.availability, draw_rng(self.seed, DOMAIN_AVAILABLE, round, client as u64))
    }

    /// Whether `client`, if available and selected in `round`, drops out mid-round and never
    /// answers: true with probability `dropout`, independently per (round, client) and
    /// independently of [`NetworkModel::available`] (whose answer the caller checks first).
    pub fn drops_out(&self, round: u64, client: usize) -> bool {
        bernoulli(self.dropout, draw_rng(self.seed, DOMAIN_DROPOUT, round, client as u64))
    }

    /// Time to receive `bytes` from the server: latency + bytes / download bandwidth.
    ///
    /// # Panics
    /// If `client >= self.clients()`.
    pub fn download_time(&self, client: usize, bytes: u64) -> Duration {
        let link = self.link(client);
        link.latency.saturating_add(saturating_secs(bytes as f64 / link.download_bps))
    }

    /// Time to send `bytes` to the server: latency + bytes / upload bandwidth.
    ///
    /// # Panics
    /// If `client >= self.clients()`.
    pub fn upload_time(&self, client: usize, bytes: u64) -> Duration {
        let link = self.link(client);
        link.latency.saturating_add(saturating_secs(bytes as f64 / link.upload_bps))
    }

    /// Time for local work that takes `compute` at speed 1: `compute / compute_speed`.
    ///
    /// # Panics
    /// If `client >= self.clients()`.
    pub fn compute_time(&self, client: usize, compute: Duration) -> Duration {
        saturating_secs(compute.as_secs_f64() / self.link(client).compute_speed)
    }

    /// Simulated round time of `client`: download the task (`bytes_down`), train (`compute` at
    /// speed 1), upload the update (`bytes_up`):
    /// `latency + bytes_down/download_bps + compute/compute_speed + latency + bytes_up/upload_bps`.
    /// Saturates at [`Duration::MAX`].
    ///
    /// # Panics
    /// If `client >= self.clients()`.
    pub fn round_time(&self, client: usize, bytes_down: u64, compute: Duration, bytes_up: u64) -> Duration {
        self.download_time(client, bytes_down)
            .saturating_add(self.compute_time(client, compute))
            .saturating_add(self.upload_time(client, bytes_up))
    }

    /// What becomes of `client` if selected in `round` with a `deadline` after the round starts:
    /// unavailable, dropped out, on time (round time ≤ deadline) or a straggler.
    ///
    /// # Panics
    /// If `client >= self.clients()`.
    pub fn outcome(
        &self,
        round: u64,
        client: usize,
        bytes_down: u64,
        compute: Duration,
        bytes_up: u64,
        deadline: Duration,
    ) -> ClientOutcome {
        if !self.available(round, client) {
            return ClientOutcome::Unavailable;
        }
        if self.drops_out(round, client) {
            return ClientOutcome::DroppedOut;
        }
        let time = self.round_time(client, bytes_down, compute, bytes_up);
        if time <= deadline {
            ClientOutcome::OnTime { time }
        } else {
            ClientOutcome::Straggler { time }
        }
    }
}

/// True with probability `p` ∈ [0, 1]: exactly never for 0, exactly always for 1.
fn bernoulli(p: f64, mut rng: ChaCha8Rng) -> bool {
    rng.random::<f64>() < p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_of_a_tenfold_spread_matches_the_closed_form() {
        let sigma = lognormal_sigma(10.0);
        assert!((sigma - 10f64.ln() / (2.0 * 1.2816)).abs() < 1e-4, "{sigma}");
        assert_eq!(lognormal_sigma(1.0), 0.0);
        // The 90th over the 10th percentile of exp(σZ) is exp(2·Z90·σ).
        assert!(((2.0 * Z90 * sigma).exp() - 10.0).abs() < 1e-12);
    }

    #[test]
    fn draw_keys_differ_in_every_component() {
        let first = |mut r: ChaCha8Rng| r.random::<u64>();
        let base = first(draw_rng(1, DOMAIN_UPLOAD, 2, 3));
        assert_eq!(base, first(draw_rng(1, DOMAIN_UPLOAD, 2, 3)));
        assert_ne!(base, first(draw_rng(9, DOMAIN_UPLOAD, 2, 3)));
        assert_ne!(base, first(draw_rng(1, DOMAIN_DOWNLOAD, 2, 3)));
        assert_ne!(base, first(draw_rng(1, DOMAIN_UPLOAD, 9, 3)));
        assert_ne!(base, first(draw_rng(1, DOMAIN_UPLOAD, 2, 9)));
        // Swapping round and client is another key, too.
        assert_ne!(base, first(draw_rng(1, DOMAIN_UPLOAD, 3, 2)));
    }

    #[test]
    fn bernoulli_extremes_are_exact() {
        for i in 0..1000 {
            assert!(!bernoulli(0.0, draw_rng(0, 0, 0, i)));
            assert!(bernoulli(1.0, draw_rng(0, 0, 0, i)));
        }
    }

    #[test]
    fn domains_are_distinct() {
        let domains = [DOMAIN_UPLOAD, DOMAIN_DOWNLOAD, DOMAIN_COMPUTE, DOMAIN_AVAILABLE, DOMAIN_DROPOUT];
        for (i, a) in domains.iter().enumerate() {
            for b in &domains[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
