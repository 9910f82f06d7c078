//! The QUIC endpoint (quinn, rustls with ring, mutual TLS) that carries the round engine's
//! messages to clients and theirs back.
//!
//! # Tasks
//! - An **accept loop** takes incoming connections and spawns one **connection task** each
//!   ([`conn`]): it authenticates the client, reads its request streams and forwards their
//!   messages to the engine task over one bounded mpsc channel.
//! - The single **engine task** ([`driver`]) owns the sans-IO [`Engine`](crate::round::Engine)
//!   and the [`Store`](crate::store::Store). It turns messages into engine events, carries out
//!   the engine's actions in order (a `Commit` is written to disk — temp file, fsync, rename —
//!   before any later action, such as the next round's tasks, is sent), routes messages to
//!   connections by client identity, and sleeps until the engine's `next_wakeup` to feed it a
//!   `Tick`.
//!
//! # The protocol over QUIC (ALPN `fedpool/1`, TLS 1.3 only)
//! 1. **Handshake.** Mutual TLS: the server presents its certificate (SAN `localhost`,
//!    `127.0.0.1`, … — see [`crate::certs`]); the client must present a certificate signed by
//!    the federation CA, else the handshake fails (with TLS 1.3 the client only notices at its
//!    first stream read). The client's identity is its certificate's subject CN.
//! 2. **Admission.** Right after the handshake the server re-reads the revocation list (every
//!    connection, so `certs revoke` takes effect without a restart). A revoked identity is closed
//!    with application code [`close::REVOKED`] and a reason naming it; a certificate without a
//!    usable CN with [`close::NO_IDENTITY`].
//! 3. **One connection per client.** A new connection with the same identity replaces the old one
//!    (closed with [`close::REPLACED`]); the client keeps its place in the round, and the engine
//!    re-sends its task when it enrolls again.
//! 4. **One bidirectional stream per exchange, opened by the client**: it writes exactly one
//!    frame and finishes its side; the server answers with exactly one frame and finishes:
//!    - `Enroll` → `Welcome` or `Reject` (first exchange on every connection);
//!    - `Update` → `Ack` or `Reject` (matched by task id);
//!    - `Heartbeat{seq}` → `Heartbeat{seq}` (answered at once by the connection task).
//! 5. **Server pushes** (`Task`, and any answer whose request stream is gone) travel on a
//!    **unidirectional stream opened by the server**, one frame per stream.
//! 6. **Frames** are `fedpool_common::frame`'s: an 8-byte header (`FP`, kind, 0, u32 LE length)
//!    checked against the per-kind caps ([`FrameLimits`]) before any of the body is read; the body
//!    is read in 64 KiB chunks as it arrives ([`framing`]); then `ClientMessage::decode`. An
//!    oversized, truncated, garbage or wrongly-typed frame, or one not complete within the request
//!    timeout, closes **that connection only**, with [`close::PROTOCOL`] and the reason; other
//!    clients are not affected. A stream the client resets is simply dropped.
//! 7. **Liveness.** The transport has an idle timeout and sends keep-alives: a dead client is
//!    noticed within the idle timeout and reported to the engine as lost. The engine's own
//!    `Drop` closes a connection with [`close::DROPPED`]; the end of the federation with
//!    [`close::FINISHED`]; a server shutdown with [`close::SHUTDOWN`].

pub mod conn;
pub mod driver;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use fedpool_common::frame::FrameLimits;
use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_common::Round;
use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::metrics::{self, Metrics};
use crate::round::Engine;
use crate::store::Store;

pub use fedpool_transport::close;
pub use fedpool_transport::framing;

/// Where and how the endpoint listens.
#[derive(Debug, Clone)]
pub struct NetSetup {
    /// UDP address to listen on (port 0: any free port; see [`Server::local_addr`]).
    pub listen: SocketAddr,
    /// The federation CA (PEM): client certificates must chain to it.
    pub ca_cert: PathBuf,
    /// The server's certificate chain (PEM).
    pub server_cert: PathBuf,
    /// The server's private key (PEM).
    pub server_key: PathBuf,
    /// The revocation list (one client name a line), re-read on every new connection; a
    /// missing file means nothing is revoked.
    pub revocation_list: PathBuf,
    /// Size caps per message kind.
    pub limits: FrameLimits,
    /// A connection silent for this long is closed (and its client reported lost).
    pub idle_timeout: Duration,
    /// Keep-alive interval the server sends at (should be well under the idle timeout).
    pub keep_alive: Duration,
    /// Most time a client may take to send one request frame.
    pub request_timeout: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// TLS or transport configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding a socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A committed round could not be written: the server stops rather than go on unsafely.
    #[error("cannot commit round {round}: {problem}")]
    Commit {
        /// The round.
        round: Round,
        /// The store's error.
        problem: String,
    },
    /// The round engine cannot go on (`Action::Fatal`).
    #[error("the round engine stopped: {0}")]
    Engine(#[from] crate::round::EngineError),
    /// The task driving the engine panicked or was cancelled.
    #[error("the engine task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How a server run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The engine ran every round; the last committed round.
    Finished(Round),
    /// Stopped on request, in this round.
    ShutDown(Round),
}

/// Connection task → engine task.
pub(crate) enum ToEngine {
    /// An authenticated connection, with its outbox.
    Connected { client: String, conn: u64, tx: mpsc::UnboundedSender<ToConn> },
    /// A decoded message, the bytes it took on the wire and the seconds its body took to arrive.
    Message { client: String, conn: u64, msg: ClientMessage, wire_bytes: u64, seconds: f64 },
    /// The connection ended.
    Disconnected { client: String, conn: u64 },
}

/// Engine task → connection task.
pub(crate) enum ToConn {
    /// Deliver a message (as the answer to a waiting request, else pushed).
    Send(ServerMessage),
    /// Close the connection with an application code and reason.
    Close { code: u32, reason: String },
}

/// Capacity of the channel into the engine task (connection tasks wait when it is full).
const ENGINE_QUEUE: usize = 1024;

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    committed: watch::Receiver<Round>,
    shutdown: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<Result<Outcome, NetError>>,
}

/// Asks a running server to stop (clonable; usable from a signal handler task).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Starts a clean shutdown: connections are closed with [`close::SHUTDOWN`], nothing half
    /// written is left behind (commits are atomic).
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }
}

impl Server {
    /// Binds the endpoint (and the metrics endpoint, if configured) and starts the accept loop
    /// and the engine task, which continues from the engine's newest committed round.
    pub async fn start(
        setup: NetSetup,
        engine: Engine,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Server, NetError> {
        let transport = tls::transport(setup.idle_timeout, setup.keep_alive, true)?;
        let server_config = tls::server_config(&setup.ca_cert, &setup.server_cert, &setup.server_key, transport)?;
        let endpoint = quinn::Endpoint::server(server_config, setup.listen)
            .map_err(|source| NetError::Bind { addr: setup.listen, source })?;
        let local_addr = endpoint.local_addr().map_err(|source| NetError::Bind { addr: setup.listen, source })?;
        let metrics_task = match setup.metrics_listen {
            Some(addr) => {
                let (bound, task) =
                    metrics::serve(addr, metrics.clone()).await.map_err(|source| NetError::Bind { addr, source })?;
                info!("metrics on http://{bound}/metrics");
                Some((bound, task))
            }
            None => None,
        };
        let metrics_addr = metrics_task.as_ref().map(|(a, _)| *a);
        info!("listening on {local_addr} (QUIC, mutual TLS)");

        let (to_engine, from_conns) = mpsc::channel(ENGINE_QUEUE);
        let shared = Arc::new(conn::ConnShared {
            limits: setup.limits,
            revocation_list: setup.revocation_list.clone(),
            request_timeout: setup.request_timeout,
            metrics: metrics.clone(),
            to_engine,
            next_id: AtomicU64::new(1),
        });
        let (committed_tx, committed) = watch::channel(engine.round());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shutdown = Arc::new(shutdown_tx);

        let accept_endpoint = endpoint.clone();
        let accept_task = tokio::spawn(async move {
            while let Some(incoming) = accept_endpoint.accept().await {
                tokio::spawn(conn::serve(incoming, shared.clone()));
            }
        });
        let drv = driver::Driver::new(engine, store, metrics.clone(), committed_tx);
        let task = tokio::spawn(async move {
            let result = drv.run(from_conns, shutdown_rx).await;
            accept_task.abort();
            let code = match &result {
                Ok(Outcome::Finished(_)) => close::FINISHED,
                Ok(Outcome::ShutDown(_)) => close::SHUTDOWN,
                Err(_) => close::INTERNAL,
            };
            // The connection tasks were told to close (after sending what they hold, such as a
            // last Ack); give them a moment, then close whatever is left.
            let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
            endpoint.close(quinn::VarInt::from_u32(code), b"server stopping");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            if let Some((_, t)) = metrics_task {
                t.abort();
            }
            result
        });
        Ok(Server { local_addr, metrics_addr, metrics, committed, shutdown, task })
    }

    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics endpoint's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The server's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The newest committed round, updated after each commit is on disk.
    pub fn committed(&self) -> watch::Receiver<Round> {
        self.committed.clone()
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Waits until the server stops: all rounds run, a shutdown requested, or a fatal error.
    pub async fn wait(self) -> Result<Outcome, NetError> {
        // Keep the sender alive while waiting: dropping it is a shutdown request.
        let _keep = self.shutdown;
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(NetError::Task(e)),
        }
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(self) -> Result<Outcome, NetError> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }
}
