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
//! 2. **Admission.** Right after the handshake the server checks the client's certificate
//!    against the revocation list ([`crate::certs::revocation`]): its serial (`serial:HEX` lines,
//!    written by `certs revoke` and by issuing a name again) or its subject CN (a bare name, the
//!    older format, still honoured). The list is re-read first if the file changed (so `certs
//!    revoke` takes effect without a restart). A revoked certificate is closed with application
//!    code [`close::REVOKED`] and a reason naming the client and the serial; a certificate
//!    without a usable CN with [`close::NO_IDENTITY`]; an unreadable list refuses everyone with
//!    [`close::INTERNAL`] (fail closed).
//!
//!    **Revocation reaches live connections**: the server polls the list's modification time,
//!    size and inode every [`REVOCATION_POLL`] and pushes a changed list to every connection task;
//!    a connection whose certificate it now revokes is closed with [`close::REVOKED`] and the
//!    reason `revoked while connected: the certificate of "NAME" (serial HEX) is revoked` — within
//!    one poll interval of the file's change (0.5 s, plus a packet's flight; measured ≈0.3 s on
//!    loopback). A list that turns unreadable is logged as an error; live connections keep being
//!    checked against the last good list, new ones are refused until it is readable again.
//! 3. **One connection per client.** A new connection with the same identity replaces the old one
//!    (closed with [`close::REPLACED`]); the client keeps its place in the round, and the engine
//!    re-sends its task when it enrolls again.
//! 4. **One bidirectional stream per exchange, opened by the client**: it writes exactly one
//!    frame and finishes its side; the server answers with exactly one frame and finishes:
//!    - `Enroll` → `Welcome` or `Reject` (first exchange on every connection);
//!    - `Update` → `Ack` or `Reject` (matched by task id);
//!    - `Heartbeat{seq}` → `Heartbeat{seq}` (answered at once by the connection task).
//! 5. **Server pushes** (`Task`, and any answer whose request stream is gone) travel on a
//!    **unidirectional stream opened by the server**, one frame per stream, one push at a time per
//!    connection (below).
//! 6. **Frames** are `fedpool_common::frame`'s: an 8-byte header (`FP`, kind, 0, u32 LE length)
//!    checked against the per-kind caps ([`FrameLimits`]) before any of the body is read; the body
//!    is read in 64 KiB chunks as it arrives ([`framing`]); then `ClientMessage::decode` (bincode
//!    with an allocation limit of about twice the body, itself under the frame cap). An oversized,
//!    truncated, garbage or wrongly-typed frame, or one too slow (below), closes **that connection
//!    only**, with [`close::PROTOCOL`] and the reason; other clients are not affected. A stream the
//!    client resets is simply dropped.
//! 7. **Liveness.** The transport has an idle timeout and sends keep-alives: a dead client is
//!    noticed within the idle timeout and reported to the engine as lost. The engine's own
//!    `Drop` closes a connection with [`close::DROPPED`]; the end of the federation with
//!    [`close::FINISHED`]; a server shutdown with [`close::SHUTDOWN`].
//!
//! # Every resource bounded ([`NetBounds`], `server.toml`)
//! - **Connections and handshakes.** The accept loop refuses (`Incoming::refuse`, before any
//!   handshake work) a connection beyond `max_connections` open ones (default 10,000) or beyond
//!   `max_handshakes` handshakes in progress (default 256), counted in
//!   `fedpool_connections_refused_total{reason="too_many_connections"|"too_many_handshakes"}`.
//!   Once `retry_above_handshakes` handshakes are in progress (default 64; 0: always), a client
//!   whose address is not yet validated is sent a **QUIC Retry** (`Incoming::retry`: a stateless
//!   token round trip, so a spoofed source address cannot make the server do handshake work;
//!   `fedpool_quic_retries_total`).
//! - **Enrollment.** A connection with no `Enroll` frame within `enroll_timeout` (default 30 s) of
//!   its admission is closed with [`close::PROTOCOL`] and the reason `no Enroll within …`.
//! - **Request timeouts.** A control frame (`Enroll`, `Heartbeat`, `EvalReport`: at most the
//!   control cap, 64 KiB) must arrive whole within `control_timeout` (default 10 s) of its stream's
//!   opening. A bulk frame (`Update`) is timed by progress: its header within `control_timeout`,
//!   then every 64 KiB chunk of its body within `upload_stall_timeout` (default 60 s) of the
//!   previous one, and the whole body within `request_timeout` (default 10 min). Each closes the
//!   connection with [`close::PROTOCOL`], the reason naming the timeout.
//! - **Upload bytes in flight.** One byte budget shared by all connections
//!   (`max_upload_bytes_in_flight`, default the larger of 1 GiB and 4 × the bulk frame cap): an
//!   upload's body is read only after its length is taken from the budget (a body longer than the
//!   whole budget takes all of it), and the bytes are given back once the engine task has handled
//!   the message (decoded, checked, folded). Beyond the budget uploads wait (QUIC flow control
//!   holds the client back): back-pressure, not failure. Each connection also reads one upload
//!   at a time. `fedpool_upload_bytes_in_flight` shows the budget in use.
//! - **Pushes.** Each connection has one push writer: pushes go out one at a time, in order (a
//!   push is done when the client's transport acknowledged all of it), each chunk within
//!   `upload_stall_timeout` and the whole within `request_timeout`; so one connection holds at
//!   most one encoded push frame. A connection with more than `max_queued_pushes` (default 8)
//!   pushes waiting, or whose push stalls, is closed with [`close::PROTOCOL`] and the reason.
//!   Answers on request streams are bounded by the streams a client may open
//!   ([`tls::MAX_CLIENT_STREAMS`](fedpool_transport::tls::MAX_CLIENT_STREAMS)) and written
//!   within `upload_stall_timeout`.

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
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::metrics::{self, Metrics};
use crate::round::Engine;
use crate::status::Status;
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
    /// The revocation list (`serial:HEX` lines and, in the older format, bare client names;
    /// [`crate::certs::revocation`]), checked at every admission and polled every
    /// [`REVOCATION_POLL`] for live connections; a missing file means nothing is revoked.
    pub revocation_list: PathBuf,
    /// Size caps per message kind.
    pub limits: FrameLimits,
    /// A connection silent for this long is closed (and its client reported lost).
    pub idle_timeout: Duration,
    /// Keep-alive interval the server sends at (should be well under the idle timeout).
    pub keep_alive: Duration,
    /// The caps and timeouts that bound every connection's resources.
    pub bounds: NetBounds,
    /// Where to serve Prometheus metrics (`GET /metrics`) and the status page (`GET /`), if
    /// anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// The caps and timeouts that bound what connections may hold (module doc, "Every resource
/// bounded"); the defaults are the documented ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetBounds {
    /// Most connections open at once (handshakes included); beyond it new ones are refused.
    pub max_connections: usize,
    /// Most QUIC handshakes in progress at once; beyond it new connections are refused.
    pub max_handshakes: usize,
    /// From this many handshakes in progress on, a client whose address is not validated is sent
    /// a QUIC Retry first (0: always).
    pub retry_above_handshakes: usize,
    /// Most time from admission to the client's `Enroll` frame.
    pub enroll_timeout: Duration,
    /// Most time for a control frame (and for any frame's header), from its stream's opening.
    pub control_timeout: Duration,
    /// Most time between two chunks (64 KiB) of an upload's body, or of a push.
    pub upload_stall_timeout: Duration,
    /// Most time for an upload's whole body, or for a whole push.
    pub request_timeout: Duration,
    /// Bytes of upload bodies all connections may hold at once; `None`: the larger of 1 GiB and
    /// 4 × the bulk frame cap ([`NetSetup::upload_budget`]).
    pub max_upload_bytes_in_flight: Option<u64>,
    /// Most pushes waiting behind the one being written, per connection; one more closes it.
    pub max_queued_pushes: usize,
}

impl Default for NetBounds {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_handshakes: 256,
            retry_above_handshakes: 64,
            enroll_timeout: Duration::from_secs(30),
            control_timeout: Duration::from_secs(10),
            upload_stall_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(600),
            max_upload_bytes_in_flight: None,
            max_queued_pushes: 8,
        }
    }
}

/// The default upload budget's floor: 1 GiB.
pub const MIN_DEFAULT_UPLOAD_BUDGET: u64 = 1 << 30;

impl NetSetup {
    /// The upload budget in bytes: `bounds.max_upload_bytes_in_flight`, else the larger of
    /// [`MIN_DEFAULT_UPLOAD_BUDGET`] and 4 × the bulk frame cap; at least 1.
    pub fn upload_budget(&self) -> u64 {
        self.bounds
            .max_upload_bytes_in_flight
            .unwrap_or_else(|| MIN_DEFAULT_UPLOAD_BUDGET.max(4 * u64::from(self.limits.bulk)))
            .max(1)
    }
}

/// Bytes of the shared upload budget held by one upload body, given back when dropped (after
/// the engine task handled the message it became).
pub(crate) struct UploadPermit {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    metrics: Arc<Metrics>,
}

impl UploadPermit {
    /// Takes `bytes` of `budget` (whose size is `total`), waiting while they are in use; a body
    /// longer than the whole budget takes all of it. `None` once the budget is closed.
    pub(crate) async fn acquire(
        budget: &Arc<Semaphore>,
        total: u64,
        bytes: u32,
        metrics: &Arc<Metrics>,
    ) -> Option<UploadPermit> {
        let take = u64::from(bytes).min(total);
        // `take` ≤ `bytes`, a u32.
        let permit = budget.clone().acquire_many_owned(u32::try_from(take).unwrap_or(u32::MAX)).await.ok()?;
        metrics.upload_bytes(take, true);
        Some(UploadPermit { _permit: permit, bytes: take, metrics: metrics.clone() })
    }
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        self.metrics.upload_bytes(self.bytes, false);
    }
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
// One value per message, moved through the queue into a match: boxing the large variant would
// cost an allocation per message and buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ToEngine {
    /// An authenticated connection, with its outbox.
    Connected { client: String, conn: u64, tx: mpsc::UnboundedSender<ToConn> },
    /// A decoded message, the bytes it took on the wire, the seconds its body took to arrive and
    /// when it was complete (the engine judges it at that time, however long it waited in the
    /// queue: a client is never dropped as idle because the engine task was busy). An upload
    /// carries its share of the upload budget, given back once the engine has handled it.
    Message {
        client: String,
        conn: u64,
        msg: ClientMessage,
        wire_bytes: u64,
        seconds: f64,
        received: std::time::Instant,
        permit: Option<UploadPermit>,
    },
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

/// How often the server re-reads the revocation list (when its modification time, size or inode
/// changed) to close live connections of newly revoked certificates: the bound on how long a
/// revoked client stays connected, plus a packet's flight.
pub const REVOCATION_POLL: Duration = Duration::from_millis(500);

/// Capacity of the channel into the engine task (connection tasks wait when it is full).
const ENGINE_QUEUE: usize = 1024;

/// The accept loop: refuses what is over the caps, asks for address validation under load, and
/// spawns a connection task for the rest (holding a connection slot for its life and a handshake
/// slot until its handshake ends).
async fn accept(endpoint: quinn::Endpoint, shared: Arc<conn::ConnShared>) {
    let bounds = shared.bounds;
    let connections = Arc::new(Semaphore::new(bounds.max_connections.min(Semaphore::MAX_PERMITS)));
    let handshakes = Arc::new(Semaphore::new(bounds.max_handshakes.min(Semaphore::MAX_PERMITS)));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let in_handshake = bounds.max_handshakes.saturating_sub(handshakes.available_permits());
        if in_handshake >= bounds.retry_above_handshakes && !incoming.remote_address_validated() && incoming.may_retry()
        {
            // Stateless: the client comes back with a token that proves its address.
            match incoming.retry() {
                Ok(()) => shared.metrics.count_retry(),
                Err(e) => {
                    warn!("cannot send a QUIC Retry to {remote}: {e}");
                    e.into_incoming().refuse();
                }
            }
            continue;
        }
        let Ok(connection) = connections.clone().try_acquire_owned() else {
            warn!("connection from {remote} refused: {} connections open (max_connections)", bounds.max_connections);
            shared.metrics.count_refused("too_many_connections");
            incoming.refuse();
            continue;
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            warn!(
                "connection from {remote} refused: {} handshakes in progress (max_handshakes)",
                bounds.max_handshakes
            );
            shared.metrics.count_refused("too_many_handshakes");
            incoming.refuse();
            continue;
        };
        tokio::spawn(conn::serve(incoming, shared.clone(), connection, handshake));
    }
}

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
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
    /// Binds the endpoint (and the metrics endpoint with the status page, if configured) and
    /// starts the accept loop and the engine task, which continues from the engine's newest
    /// committed round. The status page starts with the rounds of the store's round log.
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
        let status = Status::new(&engine, store.rounds(), std::time::Instant::now());
        let metrics_task = match setup.metrics_listen {
            Some(addr) => {
                let (bound, task) = metrics::serve(addr, metrics.clone(), status.clone())
                    .await
                    .map_err(|source| NetError::Bind { addr, source })?;
                info!("metrics on http://{bound}/metrics, status page on http://{bound}/");
                Some((bound, task))
            }
            None => None,
        };
        let metrics_addr = metrics_task.as_ref().map(|(a, _)| *a);
        info!("listening on {local_addr} (QUIC, mutual TLS)");

        let (to_engine, from_conns) = mpsc::channel(ENGINE_QUEUE);
        let revocations = Arc::new(conn::Revocations::new(setup.revocation_list.clone()));
        let poll_task = tokio::spawn(conn::poll_revocations(revocations.clone(), REVOCATION_POLL));
        let bounds = setup.bounds;
        let upload_budget = setup.upload_budget().min(Semaphore::MAX_PERMITS as u64);
        info!(
            "bounds: {} connections, {} handshakes (retry from {}), {upload_budget} upload bytes in flight, \
             enroll within {:?}, control frames within {:?}, uploads stall after {:?} and end within {:?}, \
             {} queued pushes per connection",
            bounds.max_connections,
            bounds.max_handshakes,
            bounds.retry_above_handshakes,
            bounds.enroll_timeout,
            bounds.control_timeout,
            bounds.upload_stall_timeout,
            bounds.request_timeout,
            bounds.max_queued_pushes,
        );
        let shared = Arc::new(conn::ConnShared {
            limits: setup.limits,
            revocations,
            bounds,
            uploads: Arc::new(Semaphore::new(upload_budget as usize)),
            upload_budget,
            metrics: metrics.clone(),
            to_engine,
            next_id: AtomicU64::new(1),
        });
        let (committed_tx, committed) = watch::channel(engine.round());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shutdown = Arc::new(shutdown_tx);

        let accept_endpoint = endpoint.clone();
        let accept_task = tokio::spawn(accept(accept_endpoint, shared));
        let drv = driver::Driver::new(engine, store, metrics.clone(), status.clone(), committed_tx);
        let task = tokio::spawn(async move {
            let result = drv.run(from_conns, shutdown_rx).await;
            accept_task.abort();
            poll_task.abort();
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
        Ok(Server { local_addr, metrics_addr, metrics, status, committed, shutdown, task })
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

    /// The status page's state ([`crate::status`]).
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
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
