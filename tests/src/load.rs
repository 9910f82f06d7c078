//! Load over real QUIC with mutual TLS on loopback: many lightweight protocol clients (a few tokio
//! tasks each, many per process — not trainers) against the `fedpool-server` binary run as a
//! process, through several rounds of the tiny model.
//!
//! Each client dials with its own certificate, enrolls (connect + `Enroll` → `Welcome`, timed on
//! the client), heartbeats every `heartbeat_secs`, answers every `Task` with a small honest
//! `Update` (the task's global moved by a constant, slot 0 only; the server answers it once the
//! round is on disk, so the exchange waits in a task of its own while the heartbeats go on) and
//! every `EvalTask` with an `EvalReport`. Meanwhile a thread samples the server's `VmHWM` (peak
//! resident set) from `/proc/<pid>/status`.
//!
//! [`run`] does all of it for one client count and returns a [`LoadRun`]: the clients'
//! [`LoadReport`], the round log, the server's peak RSS and exit. The integration test `load`
//! runs it at 100 clients; `cargo bench -p fedpool-tests --bench load` at 50, 200 and 500,
//! printing a table.
//!
//! Every client has its own [`Dialer`] and so its own UDP socket (the `Dialer` binds one
//! endpoint per client certificate): 500 clients hold 500 sockets in one process, well under the
//! usual `ulimit -n`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedpool_client::session::connection::{Connection, Dialer, Faults};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits, EncodedDelta};
use fedpool_common::wire::{
    ClientMessage, Enroll, EvalMetrics, EvalReport, EvalTask, Heartbeat, RoundTask, ServerMessage, TrainMetrics,
    Update, PROTOCOL_VERSION,
};
use fedpool_common::{AdapterKind, AdapterPool, BackboneFingerprint, PoolSpec, Sha256, SlotUsage};
use fedpool_server::certs;

use crate::{binary, Federation, Proc};

/// What each load client declares at enrollment and sends per update.
pub const EXAMPLES: u64 = 10;

/// The most time an `Update` exchange may wait for its answer (it comes once the round commits).
pub const UPDATE_TIMEOUT: Duration = Duration::from_secs(300);

/// One load run: client count, rounds, the server's round parameters.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Client connections (each its own certificate and identity).
    pub clients: usize,
    /// Rounds the server runs.
    pub rounds: u64,
    /// Updates a round aims for (`clients_per_round`); at most `clients`.
    pub clients_per_round: usize,
    /// Fewest updates that commit a round at its deadline.
    pub quorum: usize,
    /// The round deadline.
    pub deadline: Duration,
    /// Federated evaluation after each commit (the clients answer `EvalTask`s).
    pub evaluate: bool,
    /// The server's idle timeout (clients silent this long are dropped).
    pub idle_timeout: Duration,
    /// The most time the whole run may take before it is called failed.
    pub timeout: Duration,
}

impl LoadConfig {
    /// `clients` connections through `rounds` rounds: every client selected each round
    /// (`clients_per_round` = `clients`), quorum ⌈0.8 · clients⌉, a 10 s deadline, evaluation on,
    /// a 15 s idle timeout, 3 minutes for the whole run.
    pub fn new(clients: usize, rounds: u64) -> Self {
        Self {
            clients,
            rounds,
            clients_per_round: clients,
            quorum: (clients * 4).div_ceil(5).max(1),
            deadline: Duration::from_secs(10),
            evaluate: true,
            idle_timeout: Duration::from_secs(15),
            timeout: Duration::from_secs(180),
        }
    }
}

/// What the clients saw, summed over all of them.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Clients started.
    pub clients: usize,
    /// Clients welcomed.
    pub enrolled: usize,
    /// Connect + `Enroll` → `Welcome` of each welcomed client, sorted.
    pub enroll_latencies: Vec<Duration>,
    /// Why enrollments failed for good (after [`CONNECT_ATTEMPTS`]), with counts.
    pub enroll_failures: BTreeMap<String, usize>,
    /// Failed connect or enrollment attempts (retried, or the last one), by error.
    pub connect_retries: BTreeMap<String, usize>,
    /// `Task`s received.
    pub tasks: usize,
    /// Updates answered with `Ack`.
    pub updates_acked: usize,
    /// Updates answered with `Reject`, by reason (`RejectReason`'s name).
    pub rejects: BTreeMap<String, usize>,
    /// Update exchanges that failed (no answer: timeout, connection lost), by error.
    pub update_errors: BTreeMap<String, usize>,
    /// `EvalTask`s received.
    pub eval_tasks: usize,
    /// Evaluation reports answered with `Ack`.
    pub evals_acked: usize,
    /// Heartbeats answered.
    pub heartbeats: u64,
    /// Heartbeat exchanges that failed while the connection was open, by error.
    pub heartbeat_errors: BTreeMap<String, usize>,
    /// Pushes other than `Task` and `EvalTask` (a late answer pushed), by kind.
    pub other_pushes: BTreeMap<String, usize>,
    /// How the welcomed clients' connections ended, by the connection's error.
    pub closes: BTreeMap<String, usize>,
}

impl LoadReport {
    /// The `p`-th percentile (0 to 100, nearest rank) of the enrollment latencies.
    pub fn enroll_percentile(&self, p: f64) -> Option<Duration> {
        percentile(&self.enroll_latencies, p)
    }

    /// Adds `other` (the clients of another process or batch) to this report.
    pub fn absorb(&mut self, other: LoadReport) {
        self.clients += other.clients;
        self.enrolled += other.enrolled;
        self.enroll_latencies.extend(other.enroll_latencies);
        self.enroll_latencies.sort();
        self.tasks += other.tasks;
        self.updates_acked += other.updates_acked;
        self.eval_tasks += other.eval_tasks;
        self.evals_acked += other.evals_acked;
        self.heartbeats += other.heartbeats;
        for (mine, theirs) in [
            (&mut self.enroll_failures, other.enroll_failures),
            (&mut self.connect_retries, other.connect_retries),
            (&mut self.rejects, other.rejects),
            (&mut self.update_errors, other.update_errors),
            (&mut self.heartbeat_errors, other.heartbeat_errors),
            (&mut self.other_pushes, other.other_pushes),
            (&mut self.closes, other.closes),
        ] {
            for (k, v) in theirs {
                *mine.entry(k).or_default() += v;
            }
        }
    }
}

/// The `p`-th percentile (nearest rank) of sorted `values`; `None` when empty.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

/// The names of `n` load clients: `load-00000`, `load-00001`, …
pub fn client_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("load-{i:05}")).collect()
}

/// A federation of the tiny model (SSF pool, 4 slots, top-2) with a certificate for each of
/// `names` (no CSVs: the load clients do not train). Certificates are issued once, here.
pub fn federation(names: &[String]) -> Federation {
    let mut fed = Federation::new(&[]);
    let dir = fed.path("certs");
    for name in names {
        certs::issue(&dir, name, 30, false).expect("certs issue");
    }
    fed.clients = names.to_vec();
    fed
}

/// Writes `server.toml` for `config`: loopback port 0, the tiny spec, `heartbeat = "1s"`,
/// every client needed before a round starts.
pub fn write_server_config(fed: &Federation, config: &LoadConfig) -> PathBuf {
    let extra = format!(
        "min_clients_to_start = {start}\nlocal_steps = 1\nidle_timeout = \"{idle}ms\"\nevaluate = {eval}",
        start = config.clients_per_round.max(config.quorum),
        idle = config.idle_timeout.as_millis(),
        eval = config.evaluate,
    );
    let deadline = format!("{}ms", config.deadline.as_millis());
    fed.write_server_config(config.rounds, config.clients_per_round, config.quorum, &deadline, &extra)
}

/// Samples a process's peak resident set (`VmHWM` of `/proc/<pid>/status`) every 20 ms on a
/// thread of its own, keeping the largest value seen (the kernel's high-water mark only grows,
/// so the last sample before the process exits is the peak up to then).
pub struct RssMonitor {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssMonitor {
    /// Starts sampling process `pid`.
    pub fn start(pid: u32) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, halt) = (peak_kib.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            while !halt.load(Ordering::Relaxed) {
                match std::fs::read_to_string(&path).ok().and_then(|s| vm_hwm_kib(&s)) {
                    Some(kib) => {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    None => return, // the process is gone (or a zombie without memory)
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { peak_kib, stop, thread: Some(thread) }
    }

    /// The largest `VmHWM` seen so far, in bytes.
    pub fn peak_bytes(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed) * 1024
    }
}

impl Drop for RssMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `VmHWM` line of a `/proc/<pid>/status` text, in KiB.
pub fn vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line["VmHWM:".len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// The `fedpool-server` binary running `server.toml` of a federation, with its RSS sampled.
pub struct ServerProcess {
    /// The process (killed on drop).
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its peak RSS.
    pub rss: RssMonitor,
}

impl ServerProcess {
    /// Starts `fedpool-server run --config server.toml` in the federation's folder and waits (at
    /// most `timeout`) for its address in `state/listen.addr`.
    pub fn start(fed: &Federation, timeout: Duration) -> Self {
        let addr_file = fed.state().join("listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let proc = Proc::start(
            &binary("fedpool-server"),
            &["run", "--config", "server.toml"],
            fed.dir.path(),
            fed.path("server.log"),
            &[],
        );
        let rss = RssMonitor::start(proc.child.id());
        let t = Instant::now();
        let addr = loop {
            if let Some(addr) = std::fs::read_to_string(&addr_file).ok().and_then(|s| s.trim().parse().ok()) {
                break addr;
            }
            assert!(t.elapsed() < timeout, "the server did not start:\n{}", proc.log_text());
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { proc, addr, rss }
    }
}

/// What every client shares: the enrollment, the spec, and one encoded
/// update per global pool (all clients send the same delta of the same global, so it is
/// computed once: the clients stay light and the CPU goes to the server and the transport).
struct Shared {
    enroll: Enroll,
    spec: PoolSpec,
    updates: Mutex<HashMap<Sha256, Result<EncodedDelta, String>>>,
}

impl Shared {
    /// The encoded delta answering a task of global `global`: every value moved by 0.001, an SSF
    /// pool's delta restricted to slot 0 (used by all `EXAMPLES`).
    fn delta_for(&self, global: &EncodedDelta) -> Result<EncodedDelta, String> {
        let mut cache = lock(&self.updates);
        cache
            .entry(global.digest)
            .or_insert_with(|| {
                let decoded = codec::decode(global, &DecodeLimits::for_spec(&self.spec)).map_err(|e| e.to_string())?;
                let start = AdapterPool::from_transfer(&decoded, &self.spec).map_err(|e| e.to_string())?;
                let mut trained = start.clone();
                trained.tensors.values_mut().for_each(|t| t.data_mut().iter_mut().for_each(|v| *v += 0.001));
                let mut delta = trained.delta_from(&start).map_err(|e| e.to_string())?;
                if self.spec.kind == AdapterKind::SsfPool {
                    delta = delta
                        .restrict_to_slots(SlotUsage { slots: vec![0], counts: vec![EXAMPLES] })
                        .map_err(|e| e.to_string())?;
                }
                codec::encode(&delta, &CodecConfig::default(), None, 1).map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// Connect + enroll attempts per client before it gives up (a daemon retries for ever; these
/// retry as it does, from 100 ms doubling to 1 s, and count every failed attempt).
pub const CONNECT_ATTEMPTS: u32 = 6;

/// One client's counts, kept while it runs (so a run that times out still reports them) and
/// summed into a [`LoadReport`] at the end.
#[derive(Default)]
struct Tally {
    /// From the first connect attempt to the `Welcome`, or why enrollment failed for good.
    enroll: Option<Result<Duration, String>>,
    connect_retries: BTreeMap<String, usize>,
    tasks: usize,
    acked: usize,
    rejects: BTreeMap<String, usize>,
    update_errors: BTreeMap<String, usize>,
    eval_tasks: usize,
    evals_acked: usize,
    other_pushes: BTreeMap<String, usize>,
    close: Option<String>,
}

impl Tally {
    fn add_to(&mut self, report: &mut LoadReport, timeout: Duration) {
        let enrolled = matches!(self.enroll, Some(Ok(_)));
        match self.enroll.take() {
            Some(Ok(latency)) => {
                report.enrolled += 1;
                report.enroll_latencies.push(latency);
            }
            Some(Err(why)) => bump(&mut report.enroll_failures, why),
            None => bump(&mut report.enroll_failures, format!("not enrolled after {timeout:?}")),
        }
        report.tasks += self.tasks;
        report.updates_acked += self.acked;
        report.eval_tasks += self.eval_tasks;
        report.evals_acked += self.evals_acked;
        for (mine, theirs) in [
            (&mut report.connect_retries, &mut self.connect_retries),
            (&mut report.rejects, &mut self.rejects),
            (&mut report.update_errors, &mut self.update_errors),
            (&mut report.other_pushes, &mut self.other_pushes),
        ] {
            for (k, v) in std::mem::take(theirs) {
                *mine.entry(k).or_default() += v;
            }
        }
        match self.close.take() {
            Some(close) => bump(&mut report.closes, close),
            None if enrolled => bump(&mut report.closes, format!("still connected after {timeout:?}")),
            None => {}
        }
    }
}

fn bump(map: &mut BTreeMap<String, usize>, key: impl Into<String>) {
    *map.entry(key.into()).or_default() += 1;
}

/// Locks a tally (a client task that panicked leaves it usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The kind of a server message, for counting.
fn kind(m: &ServerMessage) -> String {
    match m {
        ServerMessage::Welcome(_) => "Welcome".into(),
        ServerMessage::Task(_) => "Task".into(),
        ServerMessage::Ack(_) => "Ack".into(),
        ServerMessage::Reject(r) => format!("Reject({:?})", r.reason),
        ServerMessage::Heartbeat(_) => "Heartbeat".into(),
        ServerMessage::EvalTask(_) => "EvalTask".into(),
    }
}

/// Runs one client per name in `names` against the server at `addr` until the server closes
/// their connections (the federation finished, or it dropped them) or `timeout` passes.
/// Certificates are `fed`'s `certs/clients/NAME.{pem,key}`. Every client's [`Dialer`] is built
/// first, then all connect at once (a burst of handshakes: the enrollment latencies include the
/// queueing); a failed connect or enrollment is retried ([`CONNECT_ATTEMPTS`]). Must run inside
/// a multi-threaded tokio runtime.
pub async fn run_clients(fed: &Federation, addr: SocketAddr, names: &[String], timeout: Duration) -> LoadReport {
    let shared = Arc::new(Shared {
        enroll: Enroll {
            protocol_version: PROTOCOL_VERSION,
            backbone: BackboneFingerprint::of_model_path(&fed.path(&fed.model)).expect("fingerprint"),
            spec_hash: fed.spec.hash(),
            declared_upload_bps: None,
            declared_download_bps: None,
            examples: EXAMPLES,
            software: "fedpool-tests load".into(),
        },
        spec: fed.spec.clone(),
        updates: Mutex::new(HashMap::new()),
    });
    let heartbeats = Arc::new(AtomicU64::new(0));
    let heartbeat_errors = Arc::new(Mutex::new(BTreeMap::new()));
    // Every dialer (certificate and key parsed, TLS configuration built, UDP socket bound)
    // first, so that the enrollment latencies measure the handshakes and the server only.
    let certs = fed.path("certs");
    let dialers: Vec<_> = names
        .iter()
        .map(|name| {
            let dir = certs.join("clients");
            Dialer::new(
                &certs.join("ca.pem"),
                &dir.join(format!("{name}.pem")),
                &dir.join(format!("{name}.key")),
                "localhost",
                Duration::from_secs(30),
            )
            .map_err(|e| format!("dialer: {e}"))
        })
        .collect();
    let tallies: Vec<Arc<Mutex<Tally>>> = names.iter().map(|_| Arc::default()).collect();
    let mut clients = tokio::task::JoinSet::new();
    for (dialer, tally) in dialers.into_iter().zip(&tallies) {
        let (shared, tally) = (shared.clone(), tally.clone());
        let (heartbeats, heartbeat_errors) = (heartbeats.clone(), heartbeat_errors.clone());
        clients.spawn(async move { client(&shared, addr, dialer, tally, heartbeats, heartbeat_errors).await });
    }
    let mut report = LoadReport { clients: names.len(), ..LoadReport::default() };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, clients.join_next()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => bump(&mut report.closes, format!("client task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                clients.abort_all();
                break;
            }
        }
    }
    while clients.join_next().await.is_some() {}
    for tally in &tallies {
        lock(tally).add_to(&mut report, timeout);
    }
    report.enroll_latencies.sort();
    report.heartbeats = heartbeats.load(Ordering::Relaxed);
    report.heartbeat_errors = std::mem::take(&mut *lock(&heartbeat_errors));
    report
}

/// Connects and enrolls, retrying failures; the connection and the heartbeat interval.
async fn enroll(
    shared: &Shared,
    addr: SocketAddr,
    dialer: &Dialer,
    tally: &Mutex<Tally>,
) -> Result<(Connection, u32), String> {
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=CONNECT_ATTEMPTS {
        let failure = match dialer.connect(addr, None, Faults::default()).await {
            Err(e) => format!("connect: {e}"),
            Ok(conn) => match conn.exchange(&ClientMessage::Enroll(shared.enroll.clone())).await {
                Ok(ServerMessage::Welcome(w)) => return Ok((conn, w.heartbeat_secs)),
                Ok(other) => return Err(format!("enroll answered with {}", kind(&other))),
                Err(e) => format!("enroll: {e}"),
            },
        };
        // The address (the server's port) differs between runs: keep the reason only.
        let failure = failure.replace(&addr.to_string(), "SERVER");
        bump(&mut lock(tally).connect_retries, failure.clone());
        if attempt == CONNECT_ATTEMPTS {
            return Err(format!("{failure} (after {CONNECT_ATTEMPTS} attempts)"));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    unreachable!("the last attempt returns")
}

/// One client: connect and enroll (timed), heartbeat, answer pushes until the connection ends.
async fn client(
    shared: &Shared,
    addr: SocketAddr,
    dialer: Result<Dialer, String>,
    tally: Arc<Mutex<Tally>>,
    heartbeats: Arc<AtomicU64>,
    heartbeat_errors: Arc<Mutex<BTreeMap<String, usize>>>,
) {
    let dialer = match dialer {
        Ok(d) => d,
        Err(e) => return lock(&tally).enroll = Some(Err(e)),
    };
    let start = Instant::now();
    let (conn, heartbeat_secs) = match enroll(shared, addr, &dialer, &tally).await {
        Ok(enrolled) => enrolled,
        Err(e) => return lock(&tally).enroll = Some(Err(e)),
    };
    lock(&tally).enroll = Some(Ok(start.elapsed()));

    let beat = tokio::spawn(heartbeat(conn.clone(), heartbeat_secs, heartbeats, heartbeat_errors));
    let mut answers = tokio::task::JoinSet::new();
    let mut pushes = conn.pushes();
    let close = loop {
        match pushes.recv().await {
            Some(Ok(ServerMessage::Task(task))) => {
                lock(&tally).tasks += 1;
                let delta = shared.delta_for(&task.global);
                answers.spawn(answer_task(conn.clone(), *task, delta, tally.clone()));
            }
            Some(Ok(ServerMessage::EvalTask(eval))) => {
                lock(&tally).eval_tasks += 1;
                answers.spawn(answer_eval(conn.clone(), *eval, tally.clone()));
            }
            Some(Ok(other)) => bump(&mut lock(&tally).other_pushes, kind(&other)),
            Some(Err(e)) => break e.to_string(),
            None => break "the push channel ended".to_string(),
        }
    };
    while answers.join_next().await.is_some() {}
    beat.abort();
    lock(&tally).close = Some(close);
}

/// Sends `Heartbeat{seq}` every `secs` seconds until the connection closes.
async fn heartbeat(conn: Connection, secs: u32, answered: Arc<AtomicU64>, errors: Arc<Mutex<BTreeMap<String, usize>>>) {
    let period = Duration::from_secs(u64::from(secs.max(1)));
    for seq in 1.. {
        // The first at once (a fast federation may finish within one period), then every period.
        if seq > 1 {
            tokio::time::sleep(period).await;
        }
        if conn.quic().close_reason().is_some() {
            return;
        }
        match conn.exchange_within(&ClientMessage::Heartbeat(Heartbeat { seq }), 4 * period).await {
            Ok(ServerMessage::Heartbeat(_)) => {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(other) => bump(&mut lock(&errors), format!("answered {}", kind(&other))),
            Err(_) if conn.quic().close_reason().is_some() => return,
            Err(e) => bump(&mut lock(&errors), e.to_string()),
        }
    }
}

/// Answers a task with the shared delta and waits (up to [`UPDATE_TIMEOUT`]) for its answer.
async fn answer_task(conn: Connection, task: RoundTask, delta: Result<EncodedDelta, String>, tally: Arc<Mutex<Tally>>) {
    let record = |f: &dyn Fn(&mut Tally)| f(&mut lock(&tally));
    let delta = match delta {
        Ok(d) => d,
        Err(e) => return record(&|t| bump(&mut t.update_errors, format!("cannot build the update: {e}"))),
    };
    let update = Update {
        round: task.round,
        task_id: task.task_id,
        nonce: task.nonce,
        examples: EXAMPLES,
        delta,
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.5, steps: 1, seconds: 0.01 },
        importance: vec![],
    };
    match conn.exchange_within(&ClientMessage::Update(update), UPDATE_TIMEOUT).await {
        Ok(ServerMessage::Ack(_)) => record(&|t| t.acked += 1),
        Ok(ServerMessage::Reject(r)) => record(&|t| bump(&mut t.rejects, format!("{:?}", r.reason))),
        Ok(other) => record(&|t| bump(&mut t.update_errors, format!("answered {}", kind(&other)))),
        Err(e) => record(&|t| bump(&mut t.update_errors, e.to_string())),
    }
}

/// Answers an evaluation task with a plausible report.
async fn answer_eval(conn: Connection, eval: EvalTask, tally: Arc<Mutex<Tally>>) {
    let metrics = EvalMetrics { accuracy: 0.5, macro_f1: 0.5, loss: 0.7, examples: 2 };
    let report = EvalReport { round: eval.round, task_id: eval.task_id, metrics };
    let answer = conn.exchange(&ClientMessage::EvalReport(report)).await;
    let mut t = lock(&tally);
    match answer {
        Ok(ServerMessage::Ack(_)) => t.evals_acked += 1,
        Ok(other) => bump(&mut t.update_errors, format!("evaluation answered {}", kind(&other))),
        Err(e) => bump(&mut t.update_errors, format!("evaluation: {e}")),
    }
}

/// The result of [`run`].
pub struct LoadRun {
    /// What was run.
    pub config: LoadConfig,
    /// What the clients saw.
    pub report: LoadReport,
    /// The round log (`Federation::rounds`) at the end.
    pub rounds: Vec<serde_json::Value>,
    /// The server's peak RSS (bytes).
    pub server_peak_rss: u64,
    /// Whether the server exited with status 0 (after its last round) in time.
    pub server_finished: bool,
    /// The server's log.
    pub server_log: String,
    /// Issuing the certificates (once per run).
    pub setup: Duration,
    /// Starting the server (finding or building the binary included) until it listens.
    pub server_start: Duration,
    /// From starting the clients to the last one ending.
    pub wall: Duration,
    /// UDP datagrams the kernel dropped for a full socket receive buffer while the clients ran
    /// (`RcvbufErrors` of `/proc/net/snmp`: the whole machine's, so other programs' drops count
    /// too); `None` where it cannot be read.
    pub udp_receive_buffer_drops: Option<u64>,
}

impl LoadRun {
    /// Seconds from each committed round's start to its commit (the round log's clock).
    pub fn round_seconds(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| Some(r["committed_at_secs"].as_f64()? - r["started_at_secs"].as_f64()?))
            .collect()
    }

    /// The updates the round log counts as committed (sum of each round's `clients`).
    pub fn committed_updates(&self) -> usize {
        self.rounds.iter().map(|r| r["clients"].as_array().map_or(0, Vec::len)).sum()
    }
}

/// One whole load run of `config`: a federation of `config.clients` certificates, the server
/// binary as a process, the clients in this process (their own tokio runtime), until the server
/// finishes or `config.timeout` passes. The federation (its folder: logs, checkpoints) is
/// returned beside the run, so a caller may read more of it.
pub fn run(config: &LoadConfig) -> (LoadRun, Federation) {
    let names = client_names(config.clients);
    let t = Instant::now();
    let fed = federation(&names);
    write_server_config(&fed, config);
    let setup = t.elapsed();
    let t = Instant::now();
    let mut server = ServerProcess::start(&fed, Duration::from_secs(600));
    let server_start = t.elapsed();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let started = Instant::now();
    let drops_before = udp_receive_buffer_errors();
    let report = runtime.block_on(run_clients(&fed, server.addr, &names, config.timeout));
    let udp_receive_buffer_drops = udp_receive_buffer_errors().zip(drops_before).map(|(a, b)| a.saturating_sub(b));
    let wall = started.elapsed();
    let left = config.timeout.saturating_sub(wall).max(Duration::from_secs(10));
    let server_finished = wait_exit(&mut server.proc, left);
    let run = LoadRun {
        config: config.clone(),
        report,
        rounds: fed.rounds(),
        server_peak_rss: server.rss.peak_bytes(),
        server_finished,
        server_log: server.proc.log_text(),
        setup,
        server_start,
        wall,
        udp_receive_buffer_drops,
    };
    drop(runtime);
    (run, fed)
}

/// The machine's count of UDP datagrams dropped for a full receive buffer (`RcvbufErrors` in
/// the `Udp:` lines of `/proc/net/snmp`).
pub fn udp_receive_buffer_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Waits up to `timeout` for `proc` to exit; whether it exited with status 0.
fn wait_exit(proc: &mut Proc, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The machine in one line: CPU model, cores, memory (from `/proc`).
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |m| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |k| k / (1024.0 * 1024.0));
    format!("{model}, {cores} cores, {mem_gib:.0} GiB")
}

impl LoadRun {
    /// Problems seen, one line each (none for a clean run): clients not enrolled, rounds not
    /// committed or below quorum, refusals, failed exchanges, the server not finishing.
    pub fn problems(&self) -> Vec<String> {
        let r = &self.report;
        let mut p = Vec::new();
        if r.enrolled < r.clients {
            p.push(format!("{} of {} clients enrolled: {:?}", r.enrolled, r.clients, r.enroll_failures));
        }
        if self.rounds.len() as u64 != self.config.rounds {
            p.push(format!("{} of {} rounds committed", self.rounds.len(), self.config.rounds));
        }
        for round in &self.rounds {
            let n = round["clients"].as_array().map_or(0, Vec::len);
            if n < self.config.quorum {
                p.push(format!(
                    "round {} committed with {n} clients, under the quorum {}",
                    round["round"], self.config.quorum
                ));
            }
            if round["attempt"].as_u64() != Some(1) {
                p.push(format!("round {} committed at attempt {}", round["round"], round["attempt"]));
            }
        }
        if !r.rejects.is_empty() {
            p.push(format!("updates refused: {:?}", r.rejects));
        }
        if !r.update_errors.is_empty() {
            p.push(format!("exchanges failed: {:?}", r.update_errors));
        }
        if !r.heartbeat_errors.is_empty() {
            p.push(format!("heartbeats failed: {:?}", r.heartbeat_errors));
        }
        if r.updates_acked != self.committed_updates() {
            p.push(format!("{} updates acknowledged, {} committed", r.updates_acked, self.committed_updates()));
        }
        if !self.server_finished {
            p.push("the server did not exit with status 0 after its last round".into());
        }
        p
    }

    /// The server log's warnings and errors, each distinct message once (client names and
    /// addresses vary), at most `max`.
    pub fn server_warnings(&self, max: usize) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.server_log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .filter(|l| {
                let key: String = l.chars().skip_while(|c| *c != ' ').filter(|c| !c.is_ascii_digit()).collect();
                seen.insert(key)
            })
            .take(max)
            .map(str::to_string)
            .collect()
    }

    /// One line: clients, rounds, round seconds, peak RSS, enrollment percentiles, counts.
    pub fn summary(&self) -> String {
        let r = &self.report;
        let ms = |p: f64| r.enroll_percentile(p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        let secs = self.round_seconds();
        format!(
            "{} clients, {} rounds committed (seconds {:?}), server peak RSS {:.1} MiB, enroll p50 {:.1} ms p99 {:.1} \
             ms max {:.1} ms, {} tasks, {} acked, {} evaluations acked, {} heartbeats; connections ended: {:?}; \
             certificates {:.1} s, server start {:.1} s, clients {:.1} s; failed connect attempts {:?}; UDP \
             receive-buffer drops (machine) {:?}",
            r.clients,
            self.rounds.len(),
            secs.iter().map(|s| (s * 100.0).round() / 100.0).collect::<Vec<_>>(),
            self.server_peak_rss as f64 / (1024.0 * 1024.0),
            ms(50.0),
            ms(99.0),
            ms(100.0),
            r.tasks,
            r.updates_acked,
            r.evals_acked,
            r.heartbeats,
            r.closes,
            self.setup.as_secs_f64(),
            self.server_start.as_secs_f64(),
            self.wall.as_secs_f64(),
            r.connect_retries,
            self.udp_receive_buffer_drops,
        )
    }
}
