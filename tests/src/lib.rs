//! fedpool-tests: whole-system tests — real QUIC with mutual TLS on loopback, the real server and
//! client daemons (in-process through their libraries, or as processes that tests kill), a tiny
//! random backbone so a federation runs in seconds.
//!
//! [`Federation`] builds a folder with everything a federation needs: a tiny model with a word
//! tokenizer, each client's private CSV, a CA with server and client certificates, the pool spec,
//! and `server.toml` / `<client>.toml` files.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_common::adapter::PoolSpec;
use fedpool_server::certs;

pub mod load;

/// A word in every training text that the tokenizer does not know: it must never be on the wire.
pub const SECRET: &str = "patientsecret";

/// A federation folder.
pub struct Federation {
    /// The folder (removed on drop).
    pub dir: tempfile::TempDir,
    /// The clients' names.
    pub clients: Vec<String>,
    /// The pool spec the server and the clients use.
    pub spec: PoolSpec,
    /// The backbone's path in the folder (`model`, or a decoder's `tiny.gguf`).
    pub model: String,
}

impl Federation {
    /// A tiny model (seed 1), `clients` with 60 examples each (different seeds), certificates,
    /// and the SSF-pool spec (4 slots, top-2) of the tiny model with a 2-label head.
    pub fn new(clients: &[&str]) -> Self {
        Self::with_model(clients, &BertConfig::tiny(), 4, 2)
    }

    /// [`Federation::new`] with another random model shape and pool (`pool_size` slots, `top_k`).
    pub fn with_model(clients: &[&str], model_config: &BertConfig, pool_size: usize, top_k: usize) -> Self {
        let options = AdapterOptions {
            choice: AdapterChoice::SsfPool,
            pool_size,
            top_k,
            rank: 4,
            alpha: 8.0,
            lora_modules: vec!["attention.self.query".into(), "attention.self.value".into()],
            pooling: fedpool_common::Pooling::Mean,
        };
        Self::with_options(clients, model_config, &options)
    }

    /// A federation of `clients` training the adapter `options` on a random `model_config`.
    pub fn with_options(clients: &[&str], model_config: &BertConfig, options: &AdapterOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("model");
        fedpool_client::model::write_random_model(&model, model_config, 1).expect("random model");
        fedpool_client::testkit::write_word_tokenizer(&model).expect("tokenizer");
        let spec = pool_spec(model_config, options, 2).expect("spec");
        std::fs::write(dir.path().join("spec.json"), serde_json::to_string_pretty(&spec).expect("json")).expect("spec");
        certs::init(&dir.path().join("certs"), &certs::InitOptions::default()).expect("certs init");
        let f = Self { dir, clients: clients.iter().map(|c| c.to_string()).collect(), spec, model: "model".into() };
        for (i, c) in clients.iter().enumerate() {
            f.add_client(c, 100 + i as u64);
        }
        f
    }

    /// A federation of a decoder: a tiny random Llama as a Q8_0 GGUF (`tiny.gguf`, its tokenizer in
    /// the metadata), `clients` with 48 prompt/response pairs each ("the N" → "in", "an N" →
    /// "on"), the decoder spec of `options` (no head), certificates.
    pub fn decoder(clients: &[&str], options: &AdapterOptions) -> Self {
        use fedpool_client::model::LlamaConfig;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LlamaConfig { vocab_size: 128, ..LlamaConfig::tiny() };
        let gguf = candle_core::quantized::GgmlDType::Q8_0;
        fedpool_client::model::write_random_gguf(dir.path().join("tiny.gguf"), &config, gguf, 3).expect("gguf");
        let spec = fedpool_client::spec::decoder_pool_spec(&config, options).expect("spec");
        std::fs::write(dir.path().join("spec.json"), serde_json::to_string_pretty(&spec).expect("json")).expect("spec");
        certs::init(&dir.path().join("certs"), &certs::InitOptions::default()).expect("certs init");
        let f = Self { dir, clients: clients.iter().map(|c| c.to_string()).collect(), spec, model: "tiny.gguf".into() };
        for (i, c) in clients.iter().enumerate() {
            certs::issue(&f.dir.path().join("certs"), c, 30, false).expect("certs issue");
            let mut csv = String::from("prompt,response\n");
            for j in 0..48u64 {
                let the = (j + i as u64).is_multiple_of(2);
                let prompt = format!("{} {}", if the { "the" } else { "an" }, (j * 7 + i as u64) % 100);
                csv.push_str(&format!("{prompt},{}\n", if the { "in" } else { "on" }));
            }
            std::fs::write(f.path(&format!("{c}.csv")), csv).expect("csv");
        }
        f
    }

    /// Issues a certificate and writes the private data of client `name`.
    pub fn add_client(&self, name: &str, seed: u64) {
        certs::issue(&self.dir.path().join("certs"), name, 30, false).expect("certs issue");
        let mut csv = String::from("text,label\n");
        for (_, text, label) in fedpool_client::testkit::separable_texts(60, 2, seed) {
            csv.push_str(&format!("{text} {SECRET}{seed},{}\n", ["neg", "pos"][label]));
        }
        std::fs::write(self.path(&format!("{name}.csv")), csv).expect("csv");
    }

    /// A path inside the folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The server's state folder.
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Writes `server.toml`: loopback port 0, the tiny spec, `rounds`, `clients_per_round`,
    /// `quorum`, deadlines; `extra` lines are appended to the top-level table (`local_steps` and
    /// `idle_timeout` given there replace the defaults of 4 and 5 s).
    pub fn write_server_config(
        &self,
        rounds: u64,
        per_round: usize,
        quorum: usize,
        deadline: &str,
        extra: &str,
    ) -> PathBuf {
        let fp = fedpool_common::BackboneFingerprint::of_model_path(&self.path(&self.model)).expect("fingerprint");
        let text = format!(
            r#"listen = "127.0.0.1:0"
state_dir = "state"
ca_cert = "certs/ca.pem"
server_cert = "certs/server.pem"
server_key = "certs/server.key"
backbone_fingerprint = "{fp}"
spec_file = "spec.json"
rounds = {rounds}
clients_per_round = {per_round}
quorum = {quorum}
deadline = "{deadline}"
{steps}seed = 3
heartbeat = "1s"
{idle}{extra}
"#,
            fp = fp.0.to_hex(),
            steps = if extra.contains("local_steps") { "" } else { "local_steps = 4\n" },
            idle = if extra.contains("idle_timeout") { "" } else { "idle_timeout = \"5s\"\n" },
        );
        let p = self.path("server.toml");
        std::fs::write(&p, text).expect("server.toml");
        p
    }

    /// Writes `<name>.toml` for the daemon: the server's address from `state/listen.addr`, the
    /// client's certificate and CSV, the tiny spec's adapter; `codec` is the `[upload_codec]` body.
    pub fn write_client_config(&self, name: &str, model: &str, codec: &str) -> PathBuf {
        self.write_client_config_with(name, model, codec, "")
    }

    /// [`Federation::write_client_config`] with `top` lines added to the top-level table (e.g.
    /// `declared_upload_bps = 1000`).
    pub fn write_client_config_with(&self, name: &str, model: &str, codec: &str, top: &str) -> PathBuf {
        let adapter = match self.spec.kind {
            kind @ (fedpool_common::AdapterKind::Lora | fedpool_common::AdapterKind::AdaLora) => {
                let name = if kind == fedpool_common::AdapterKind::Lora { "lora" } else { "adalora" };
                format!("kind = \"{name}\"\nrank = {}\nalpha = {}", self.spec.max_rank, self.spec.lora_alpha)
            }
            _ => format!("kind = \"ssf-pool\"\npool_size = {}\ntop_k = {}", self.spec.pool_size, self.spec.top_k),
        };
        let text = format!(
            r#"server_addr_file = "state/listen.addr"
ca_cert = "certs/ca.pem"
cert = "certs/clients/{name}.pem"
key = "certs/clients/{name}.key"
model = "{model}"
data = "{name}.csv"
state_dir = "client-{name}"
device = "cpu"
test_fraction = 0.2
idle_timeout = "3s"
reconnect_initial = "100ms"
reconnect_max = "1s"
{top}

[adapter]
{adapter}

[train]
batch_size = 8
lr = 0.01

[upload_codec]
{codec}
"#
        );
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, text).expect("client toml");
        p
    }

    /// Starts the server of `server.toml` in this process (the `fedpool-server` library, real
    /// QUIC on loopback) and publishes its address in `state/listen.addr` for the clients.
    pub async fn start_server_in_process(&self) -> (fedpool_server::net::Server, fedpool_server::config::ServerConfig) {
        let config = fedpool_server::config::ServerConfig::load(&self.path("server.toml")).expect("server config");
        let prepared = config.prepare().expect("prepare");
        let metrics = fedpool_server::metrics::Metrics::new();
        let server = fedpool_server::net::Server::start(prepared.net, prepared.engine, prepared.store, metrics)
            .await
            .expect("start");
        std::fs::write(self.state().join("listen.addr"), server.local_addr().to_string()).expect("addr");
        (server, config)
    }

    /// The rounds of `state/rounds.jsonl` as JSON, each with its evaluation merged in
    /// (`fedpool_server::store::read_round_log`); none while the log does not exist yet.
    pub fn rounds(&self) -> Vec<serde_json::Value> {
        let path = self.state().join(fedpool_server::store::ROUND_LOG);
        if !path.exists() {
            return Vec::new();
        }
        let records = fedpool_server::store::read_round_log(&path).expect("the round log reads");
        records.iter().map(|r| serde_json::to_value(r).expect("a record is JSON")).collect()
    }

    /// Waits until `rounds.jsonl` has `n` rounds whose `eval` is present (with evaluation on) or
    /// `n` rounds (`with_eval` false).
    pub fn wait_rounds(&self, n: usize, with_eval: bool, timeout: Duration) -> Vec<serde_json::Value> {
        let t = Instant::now();
        loop {
            let r = self.rounds();
            let done = if with_eval { r.iter().filter(|l| !l["eval"].is_null()).count() } else { r.len() };
            if done >= n {
                return r;
            }
            assert!(t.elapsed() < timeout, "timed out waiting for {n} rounds; log: {r:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The newest modification time of the files under `dir` (recursively).
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() { newest_mtime(&path) } else { entry.metadata().ok()?.modified().ok() };
        newest = newest.max(t);
    }
    newest
}

/// The path of a workspace binary (`fedpool-server`, `fedpool-client`), next to the test
/// executable. `cargo test --workspace` has built it already (the server's and the client's own
/// tests use it); it is rebuilt here only when missing or older than the sources it comes from,
/// because a `cargo build -p` unifies features differently and would recompile shared crates.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let path = dir.join(name);
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources = ["common/src", "transport/src", "client/src", "server/src"]
        .iter()
        .filter_map(|d| newest_mtime(&root.join(d)))
        .max();
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if built.is_some() && built >= sources {
        return path;
    }
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--manifest-path"]).arg(root.join("Cargo.toml")).args(["-p", name, "--bin", name]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo build");
    assert!(status.success(), "building {name} failed");
    assert!(path.is_file(), "{} missing after the build", path.display());
    path
}

/// A child process whose stderr goes to a log file, killed on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its log.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args` in `dir`, logging to `log`, with extra environment variables.
    pub fn start(bin: &Path, args: &[&str], dir: &Path, log: PathBuf, env: &[(&str, &str)]) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin);
        cmd.args(args).current_dir(dir).stdout(Stdio::null()).stderr(file).env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn");
        Self { child, log }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let t = Instant::now();
        while !self.log_text().contains(needle) {
            assert!(
                t.elapsed() < timeout,
                "timed out waiting for {needle:?} in {}:\n{}",
                self.log.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit (at most `timeout`), returning whether it exited with 0.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let t = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            assert!(t.elapsed() < timeout, "{} did not exit:\n{}", self.log.display(), self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
