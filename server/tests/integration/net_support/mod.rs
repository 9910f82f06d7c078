//! Shared by the network tests: a tiny federation on loopback (certificates, a config, a tiny SSF
//! pool) and a minimal client that speaks the protocol over QUIC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpool_common::codec::{self, CodecConfig, DecodeLimits};
use fedpool_common::frame::{FrameLimits, HEADER_LEN};
use fedpool_common::wire::{
    ClientMessage, Enroll, Heartbeat, RoundTask, ServerMessage, TrainMetrics, Update, PROTOCOL_VERSION,
};
use fedpool_common::{AdapterPool, BackboneFingerprint, PoolDelta, PoolSpec, Sha256, SlotUsage, TargetSpec};
use fedpool_server::certs;
use fedpool_server::net::framing::read_frame;
use fedpool_server::net::tls;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Generous bound for anything a test waits on (the happy path takes well under a second).
pub const WAIT: Duration = Duration::from_secs(20);

/// A tiny FedIns pool: 2 slots, top-1, one target of width 4, keys of width 3, no head.
pub fn tiny_spec() -> PoolSpec {
    PoolSpec::ssf_pool(vec![TargetSpec { name: "enc.out".into(), dim_in: 4, dim_out: 4 }], 3, 2, 1, None)
}

/// The backbone fingerprint the test federation uses.
pub fn backbone() -> BackboneFingerprint {
    BackboneFingerprint(Sha256::of(b"tiny test backbone"))
}

/// A federation folder: certificates (`certs/`) and state (`state/`).
pub struct Federation {
    pub dir: tempfile::TempDir,
}

impl Federation {
    /// A CA and server certificate, and client certificates for `clients`.
    pub fn new(clients: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = Self { dir };
        certs::init(&f.certs(), &certs::InitOptions::default()).expect("certs init");
        for c in clients {
            f.issue(c);
        }
        f
    }

    pub fn issue(&self, name: &str) {
        certs::issue(&self.certs(), name, 30, false).expect("certs issue");
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A server configuration on loopback (port 0) for the tiny pool; `extra` lines are appended
    /// to the top-level table.
    pub fn config_toml(&self, clients_per_round: usize, rounds: u64, deadline: &str, extra: &str) -> String {
        let spec = serde_json::to_string(&tiny_spec()).expect("spec json");
        std::fs::write(self.dir.path().join("spec.json"), spec).expect("write spec");
        format!(
            r#"
listen = "127.0.0.1:0"
state_dir = "state"
ca_cert = "certs/ca.pem"
server_cert = "certs/server.pem"
server_key = "certs/server.key"
backbone_fingerprint = "{backbone}"
spec_file = "spec.json"
rounds = {rounds}
clients_per_round = {clients_per_round}
quorum = {clients_per_round}
min_clients_to_start = {clients_per_round}
deadline = "{deadline}"
local_steps = 1
seed = 7
heartbeat = "1s"
idle_timeout = "10s"
evaluate = false
{extra}
"#,
            backbone = backbone().0.to_hex()
        )
    }

    /// Writes `toml` as `server.toml` and returns its path.
    pub fn write_config(&self, toml: &str) -> PathBuf {
        let p = self.dir.path().join("server.toml");
        std::fs::write(&p, toml).expect("write config");
        p
    }

    pub fn client_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let d = self.certs().join(certs::CLIENTS_DIR);
        (d.join(format!("{name}.pem")), d.join(format!("{name}.key")))
    }
}

/// A client identity: certificate chain and key.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The identity issued to `name` in `fed`.
pub fn identity(fed: &Federation, name: &str) -> Identity {
    let (c, k) = fed.client_cert(name);
    (certs::load_certs(&c).expect("client cert"), certs::load_key(&k).expect("client key"))
}

/// A self-signed certificate with subject CN `name` (not signed by the federation CA).
pub fn self_signed(name: &str) -> Identity {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed");
    let key = PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    (vec![cert.der().clone()], key)
}

/// A minimal protocol client.
pub struct TestClient {
    /// Held so the endpoint lives as long as the connection.
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// What went wrong in an exchange, kept as text for assertions.
#[derive(Debug)]
pub struct ExchangeError(pub String);

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn ex<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ExchangeError + '_ {
    move |e| ExchangeError(format!("{what}: {e}"))
}

impl TestClient {
    /// Connects (the TLS handshake completes even for a certificate the server will refuse:
    /// TLS 1.3 client auth fails at the first read).
    pub async fn connect(
        addr: SocketAddr,
        fed: &Federation,
        identity: Option<Identity>,
    ) -> Result<Self, ExchangeError> {
        let ca = certs::load_certs(&fed.certs().join(certs::CA_CERT)).expect("ca");
        let transport = tls::transport(Duration::from_secs(10), Duration::from_secs(1), false).expect("transport");
        let cfg = tls::client_config(&ca, identity, transport).expect("client config");
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        endpoint.set_default_client_config(cfg);
        let connecting = endpoint.connect(addr, "localhost").map_err(ex("connect"))?;
        let conn = tokio::time::timeout(WAIT, connecting)
            .await
            .map_err(ex("handshake timed out"))?
            .map_err(ex("handshake"))?;
        Ok(Self { _endpoint: endpoint, conn })
    }

    /// Connects with the certificate issued to `name`.
    pub async fn connect_as(addr: SocketAddr, fed: &Federation, name: &str) -> Self {
        Self::connect(addr, fed, Some(identity(fed, name))).await.expect("connect")
    }

    /// Sends raw bytes on a new request stream and reads one answer frame.
    pub async fn raw_exchange(&self, bytes: &[u8]) -> Result<ServerMessage, ExchangeError> {
        let fut = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(ex("open stream"))?;
            send.write_all(bytes).await.map_err(ex("write"))?;
            let _ = send.finish();
            let frame = read_frame(&mut recv, &FrameLimits::default())
                .await
                .map_err(ex("read answer"))?
                .ok_or_else(|| ExchangeError("stream ended without an answer".into()))?;
            ServerMessage::decode(frame.kind, &frame.body).map_err(ex("decode answer"))
        };
        tokio::time::timeout(WAIT, fut).await.map_err(ex("exchange timed out"))?
    }

    /// One request, one answer.
    pub async fn exchange(&self, msg: &ClientMessage) -> Result<ServerMessage, ExchangeError> {
        self.raw_exchange(&msg.to_frame().expect("frame")).await
    }

    /// Enrolls with the test backbone and the tiny spec.
    pub async fn enroll(&self) -> Result<ServerMessage, ExchangeError> {
        self.exchange(&ClientMessage::Enroll(enroll_msg())).await
    }

    /// Waits for the next message the server pushes (a task).
    pub async fn next_push(&self) -> Result<ServerMessage, ExchangeError> {
        let fut = async {
            let mut recv = self.conn.accept_uni().await.map_err(ex("accept stream"))?;
            let frame = read_frame(&mut recv, &FrameLimits::default())
                .await
                .map_err(ex("read push"))?
                .ok_or_else(|| ExchangeError("empty push stream".into()))?;
            ServerMessage::decode(frame.kind, &frame.body).map_err(ex("decode push"))
        };
        tokio::time::timeout(WAIT, fut).await.map_err(ex("no push in time"))?
    }

    /// Waits for the next task.
    pub async fn next_task(&self) -> Result<RoundTask, ExchangeError> {
        loop {
            match self.next_push().await? {
                ServerMessage::Task(t) => return Ok(*t),
                other => eprintln!("(push ignored while waiting for a task: {other:?})"),
            }
        }
    }

    pub async fn heartbeat(&self, seq: u64) -> Result<ServerMessage, ExchangeError> {
        self.exchange(&ClientMessage::Heartbeat(Heartbeat { seq })).await
    }
}

/// The Enroll a tiny-pool client sends.
pub fn enroll_msg() -> Enroll {
    Enroll {
        protocol_version: PROTOCOL_VERSION,
        backbone: backbone(),
        spec_hash: tiny_spec().hash(),
        declared_upload_bps: None,
        declared_download_bps: None,
        examples: 5,
        software: "net-test-client".into(),
    }
}

/// The global pool a task carries.
pub fn task_global(task: &RoundTask) -> AdapterPool {
    let spec = tiny_spec();
    let d = codec::decode(&task.global, &DecodeLimits::default()).expect("decode task global");
    let mut g = AdapterPool::zeros(&spec);
    g.apply_delta(&d).expect("apply global");
    g
}

/// A deterministic "trained" delta: slot 0 used by 3 examples, slot 1 by 2, every value changed
/// by a distinct amount scaled by `scale`.
pub fn trained_delta(scale: f32) -> PoolDelta {
    let spec = tiny_spec();
    let zero = AdapterPool::zeros(&spec);
    let mut moved = zero.clone();
    for (i, t) in moved.tensors.values_mut().enumerate() {
        for (j, v) in t.data_mut().iter_mut().enumerate() {
            *v = scale * (0.01 * (i as f32 + 1.0) + 0.001 * j as f32);
        }
    }
    let full = moved.delta_from(&zero).expect("delta");
    full.restrict_to_slots(SlotUsage { slots: vec![0, 1], counts: vec![3, 2] }).expect("slots")
}

/// An update answering `task` with `delta` (5 examples, lossless upload).
pub fn update_for(task: &RoundTask, delta: &PoolDelta) -> Update {
    Update {
        round: task.round,
        task_id: task.task_id,
        nonce: task.nonce,
        examples: 5,
        delta: codec::encode(delta, &CodecConfig::default(), None, 1).expect("encode"),
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.5, steps: 1, seconds: 0.01 },
        importance: Vec::new(),
    }
}

/// `global` with `delta` (slot rows) added: what FedAvg with one client commits.
pub fn expected_after(global: &AdapterPool, delta: &PoolDelta) -> AdapterPool {
    let mut g = global.clone();
    g.apply_delta(delta).expect("apply delta");
    g
}

/// Asserts two pools are equal to f32 rounding (a weighted mean of one update may round).
pub fn assert_pools_close(got: &AdapterPool, want: &AdapterPool) {
    assert_eq!(got.spec_hash, want.spec_hash);
    assert_eq!(got.tensors.keys().collect::<Vec<_>>(), want.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &got.tensors {
        let w = &want.tensors[name];
        assert_eq!(t.shape(), w.shape(), "{name}");
        for (i, (a, b)) in t.data().iter().zip(w.data()).enumerate() {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}[{i}]: got {a}, want {b}");
        }
    }
}

/// Reads the `listen.addr` the binary writes, once it exists.
pub fn read_addr(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A header claiming `len` bytes of `kind`.
pub fn header(kind: u8, len: u32) -> [u8; HEADER_LEN] {
    let l = len.to_le_bytes();
    [b'F', b'P', kind, 0, l[0], l[1], l[2], l[3]]
}

/// Starts a server from `toml` (paths relative to the federation folder).
pub async fn start_server(fed: &Federation, toml: &str) -> fedpool_server::net::Server {
    let config = fedpool_server::config::ServerConfig::parse(toml, fed.dir.path()).expect("config");
    let p = config.prepare().expect("prepare");
    fedpool_server::net::Server::start(p.net, p.engine, p.store, fedpool_server::metrics::Metrics::new())
        .await
        .expect("start server")
}

/// Waits (within [`WAIT`]) for the server to close `conn`; its application close.
pub async fn server_close(conn: &quinn::Connection) -> quinn::ApplicationClose {
    match tokio::time::timeout(WAIT, conn.closed()).await.expect("closed in time") {
        quinn::ConnectionError::ApplicationClosed(c) => c,
        other => panic!("expected an application close, got {other}"),
    }
}

/// The longest body an [`update_for`] of `trained_delta(_)` can have (every integer at its
/// widest varint): a bound for sizing byte budgets in tests.
pub fn max_update_body_len() -> usize {
    let update = Update {
        round: fedpool_common::Round(u64::MAX),
        task_id: fedpool_common::TaskId(u64::MAX),
        nonce: fedpool_common::Nonce([0xff; 16]),
        examples: 5,
        delta: codec::encode(&trained_delta(1.0), &CodecConfig::default(), None, 1).expect("encode"),
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.5, steps: 1, seconds: 0.01 },
        importance: Vec::new(),
    };
    ClientMessage::Update(update).to_frame().expect("frame").len() - HEADER_LEN
}

impl TestClient {
    /// Sends `bytes` on a new request stream in two parts, `pause` apart (the first `split`
    /// bytes, then the rest), and reads one answer frame.
    pub async fn paced_exchange(
        &self,
        bytes: &[u8],
        split: usize,
        pause: Duration,
    ) -> Result<ServerMessage, ExchangeError> {
        let fut = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(ex("open stream"))?;
            send.write_all(&bytes[..split]).await.map_err(ex("write"))?;
            tokio::time::sleep(pause).await;
            send.write_all(&bytes[split..]).await.map_err(ex("write the rest"))?;
            let _ = send.finish();
            let frame = read_frame(&mut recv, &FrameLimits::default())
                .await
                .map_err(ex("read answer"))?
                .ok_or_else(|| ExchangeError("stream ended without an answer".into()))?;
            ServerMessage::decode(frame.kind, &frame.body).map_err(ex("decode answer"))
        };
        tokio::time::timeout(WAIT, fut).await.map_err(ex("exchange timed out"))?
    }

    /// Opens a request stream and writes `bytes` on it without finishing it (the rest of a frame
    /// never comes); the stream is returned so it stays open.
    pub async fn send_partial(&self, bytes: &[u8]) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.expect("open stream");
        send.write_all(bytes).await.expect("write");
        (send, recv)
    }
}
