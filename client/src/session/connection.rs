//! One QUIC connection to the server, speaking the protocol of `fedpool-server`'s `net` module:
//! one bidirectional stream per request (one frame each way), tasks pushed on unidirectional
//! streams. Every frame this client writes passes through [`Connection::write_frame`], where an
//! optional tap sees its bytes (the test that no training text leaves uses it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedpool_common::frame::{FrameError, FrameLimits};
use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_transport::framing::read_frame;
use fedpool_transport::tls::{self, TlsError};
use quinn::VarInt;

/// Sees every frame the client writes, before it is sent.
pub type FrameTap = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Most time to wait for the server's answer to one request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an exchange with the server failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS or transport configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Connecting failed.
    #[error("cannot connect to {addr}: {problem}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// What failed.
        problem: String,
    },
    /// The connection closed or failed.
    #[error("connection lost: {0}")]
    Lost(#[from] quinn::ConnectionError),
    /// A stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The server's frame was unreadable.
    #[error("bad frame from the server: {0}")]
    Frame(#[from] FrameError),
    /// No answer in time.
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
}

/// Faults injected by tests (off in normal use).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Send half of every update frame, then wait this long before the rest (a client killed
    /// "during upload" in the fault tests).
    pub stall_upload: Option<Duration>,
    /// Stall only updates of this round and later (0: every round).
    pub stall_from_round: u64,
}

/// An open connection.
#[derive(Clone)]
pub struct Connection {
    conn: quinn::Connection,
    limits: FrameLimits,
    tap: Option<FrameTap>,
    faults: Faults,
}

/// The endpoint and client configuration, built once per daemon.
pub struct Dialer {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    server_name: String,
}

impl Dialer {
    /// A client endpoint that presents `cert`/`key` and trusts only `ca_cert`.
    pub fn new(
        ca_cert: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
        server_name: &str,
        idle_timeout: Duration,
    ) -> Result<Self, LinkError> {
        let transport = tls::transport(idle_timeout, idle_timeout / 4, false)?;
        let config = tls::client_config_from_files(ca_cert, cert, key, transport)?;
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| LinkError::Connect { addr: bind, problem: format!("cannot open a UDP socket: {e}") })?;
        Ok(Self { endpoint, config, server_name: server_name.to_string() })
    }

    /// Connects (the TLS handshake; a refused client certificate shows at the first exchange).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        tap: Option<FrameTap>,
        faults: Faults,
    ) -> Result<Connection, LinkError> {
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, &self.server_name)
            .map_err(|e| LinkError::Connect { addr, problem: e.to_string() })?;
        let conn = tokio::time::timeout(Duration::from_secs(20), connecting)
            .await
            .map_err(|_| LinkError::Connect { addr, problem: "handshake timed out".into() })?
            .map_err(|e| LinkError::Connect { addr, problem: e.to_string() })?;
        Ok(Connection { conn, limits: FrameLimits::default(), tap, faults })
    }
}

impl Connection {
    /// The underlying QUIC connection.
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    async fn write_frame(&self, send: &mut quinn::SendStream, msg: &ClientMessage) -> Result<(), LinkError> {
        let frame = msg.to_frame()?;
        if let Some(tap) = &self.tap {
            tap(&frame);
        }
        let stream = |e: &dyn std::fmt::Display| LinkError::Stream(e.to_string());
        match (msg, self.faults.stall_upload) {
            (ClientMessage::Update(u), Some(pause)) if u.round.0 >= self.faults.stall_from_round => {
                let half = frame.len() / 2;
                send.write_all(&frame[..half]).await.map_err(|e| stream(&e))?;
                tracing::warn!("fault injection: upload stalled after {half} of {} bytes", frame.len());
                tokio::time::sleep(pause).await;
                send.write_all(&frame[half..]).await.map_err(|e| stream(&e))?;
            }
            _ => send.write_all(&frame).await.map_err(|e| stream(&e))?,
        }
        send.finish().map_err(|e| stream(&e))?;
        Ok(())
    }

    /// Sends one request and waits for its one answer (at most [`ANSWER_TIMEOUT`]).
    pub async fn exchange(&self, msg: &ClientMessage) -> Result<ServerMessage, LinkError> {
        self.exchange_within(msg, ANSWER_TIMEOUT).await
    }

    /// Sends one request and waits at most `timeout` for its one answer (an update's answer comes
    /// only once its round is committed, which may be as late as the round's deadline).
    pub async fn exchange_within(&self, msg: &ClientMessage, timeout: Duration) -> Result<ServerMessage, LinkError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        self.write_frame(&mut send, msg).await?;
        let answer = async {
            let frame = read_frame(&mut recv, &self.limits)
                .await?
                .ok_or_else(|| LinkError::Stream("the server closed the stream without answering".into()))?;
            Ok::<_, LinkError>(ServerMessage::decode(frame.kind, &frame.body)?)
        };
        match tokio::time::timeout(timeout, answer).await {
            Ok(r) => r,
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }

    /// The messages the server pushes (tasks), read by a task of their own: a frame is never
    /// half-read and dropped when the caller's `select!` picks another branch (reading a task of
    /// several MB takes a while; a heartbeat tick must not cancel it). The channel ends, after an
    /// error, when the connection does.
    pub fn pushes(&self) -> tokio::sync::mpsc::Receiver<Result<ServerMessage, LinkError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let conn = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = conn.next_push().await;
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
        rx
    }

    /// The next message the server pushes (a task). Not cancellation-safe: use [`Self::pushes`]
    /// inside `select!`.
    pub async fn next_push(&self) -> Result<ServerMessage, LinkError> {
        let mut recv = self.conn.accept_uni().await?;
        let frame =
            read_frame(&mut recv, &self.limits).await?.ok_or_else(|| LinkError::Stream("empty push stream".into()))?;
        Ok(ServerMessage::decode(frame.kind, &frame.body)?)
    }

    /// Closes the connection with an application code and reason.
    pub fn close(&self, code: u32, reason: &str) {
        self.conn.close(VarInt::from_u32(code), reason.as_bytes());
    }
}
