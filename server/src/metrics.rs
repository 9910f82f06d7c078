//! Prometheus metrics: counters and gauges updated by the network layer, served as text on
//! `GET /metrics` by a tiny HTTP/1.1 responder on its own TCP port (off unless configured). The
//! same port serves the coordinator's status page on `GET /` ([`crate::status`]); any other path
//! is 404.
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `fedpool_round` | gauge | the engine's current round |
//! | `fedpool_committed_round` | gauge | the newest round committed to disk |
//! | `fedpool_connected_clients` | gauge | authenticated clients with an open connection |
//! | `fedpool_bytes_in_total` | counter | frame bytes received from clients (headers + bodies) |
//! | `fedpool_bytes_out_total` | counter | frame bytes sent to clients |
//! | `fedpool_updates_rejected_total{reason}` | counter | refusals sent, by `RejectReason` (snake case); `protocol` also counts connections closed for a bad frame |
//! | `fedpool_quarantined_clients` | gauge | clients quarantined for the rest of the run (too many refusals) |
//! | `fedpool_connections_refused_total{reason}` | counter | connections refused: before the handshake (`too_many_connections`, `too_many_handshakes`) or after it (`revoked`, `no_identity`, `revocation_list_unreadable`) |
//! | `fedpool_connections_closed_total{reason}` | counter | connections the server closed for exceeding a bound (`enroll_timeout`, `control_timeout`, `upload_stalled`, `request_timeout`, `push_queue_full`, `push_stalled`) |
//! | `fedpool_quic_retries_total` | counter | incoming connections sent a QUIC Retry (address validation) |
//! | `fedpool_handshakes_in_progress` | gauge | QUIC handshakes under way |
//! | `fedpool_upload_bytes_in_flight` | gauge | bytes of upload bodies held (being read, decoded, or waiting for the engine): the shared budget in use |
//! | `fedpool_upload_bytes_in_flight_max` | gauge | the most `fedpool_upload_bytes_in_flight` has been since the start |
//! | `fedpool_pushes_in_flight` | gauge | server pushes being written (at most one per connection) |
//! | `fedpool_pushes_in_flight_max` | gauge | the most `fedpool_pushes_in_flight` has been since the start |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedpool_common::wire::RejectReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::status::Status;

/// The server's metrics; cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    round: AtomicU64,
    committed_round: AtomicU64,
    connected: AtomicU64,
    quarantined: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    closed: Mutex<BTreeMap<&'static str, u64>>,
    quic_retries: AtomicU64,
    handshakes: AtomicU64,
    upload_bytes: AtomicU64,
    upload_bytes_max: AtomicU64,
    pushes: AtomicU64,
    pushes_max: AtomicU64,
}

/// The label value for a reject reason.
pub fn reason_label(reason: RejectReason) -> &'static str {
    use RejectReason::*;
    match reason {
        ProtocolVersion => "protocol_version",
        BackboneMismatch => "backbone_mismatch",
        SpecMismatch => "spec_mismatch",
        UnknownTask => "unknown_task",
        WrongRound => "wrong_round",
        WrongNonce => "wrong_nonce",
        Duplicate => "duplicate",
        Late => "late",
        InvalidDelta => "invalid_delta",
        NonFinite => "non_finite",
        Corrupt => "corrupt",
        Protocol => "protocol",
        NotCommitted => "not_committed",
        Quarantined => "quarantined",
    }
}

impl Metrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets the current round.
    pub fn set_round(&self, round: u64) {
        self.round.store(round, Ordering::Relaxed);
    }

    /// Sets the newest committed round.
    pub fn set_committed_round(&self, round: u64) {
        self.committed_round.store(round, Ordering::Relaxed);
    }

    /// Sets the number of connected clients.
    pub fn set_connected(&self, n: u64) {
        self.connected.store(n, Ordering::Relaxed);
    }

    /// Sets the number of quarantined clients.
    pub fn set_quarantined(&self, n: u64) {
        self.quarantined.store(n, Ordering::Relaxed);
    }

    /// Counts bytes received.
    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes sent.
    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one refusal.
    pub fn count_reject(&self, reason: RejectReason) {
        if let Ok(mut m) = self.rejected.lock() {
            *m.entry(reason_label(reason)).or_default() += 1;
        }
    }

    /// Counts one connection refused after the handshake.
    pub fn count_refused(&self, reason: &'static str) {
        if let Ok(mut m) = self.refused.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Counts one connection closed by the server for exceeding a bound (a timeout, a full push
    /// queue).
    pub fn count_closed(&self, reason: &'static str) {
        if let Ok(mut m) = self.closed.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Counts one QUIC Retry sent.
    pub fn count_retry(&self) {
        self.quic_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A handshake started (`true`) or ended (`false`).
    pub fn handshake(&self, started: bool) {
        if started {
            self.handshakes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// `n` bytes of the upload budget taken (`true`) or given back (`false`).
    pub fn upload_bytes(&self, n: u64, taken: bool) {
        if taken {
            let now = self.upload_bytes.fetch_add(n, Ordering::Relaxed) + n;
            self.upload_bytes_max.fetch_max(now, Ordering::Relaxed);
        } else {
            self.upload_bytes.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// A push started (`true`) or ended (`false`).
    pub fn push(&self, started: bool) {
        if started {
            let now = self.pushes.fetch_add(1, Ordering::Relaxed) + 1;
            self.pushes_max.fetch_max(now, Ordering::Relaxed);
        } else {
            self.pushes.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Refusals sent so far, by reason label ([`reason_label`]).
    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().map_or_else(|_| BTreeMap::new(), |m| m.clone())
    }

    /// Connections refused for `reason` so far.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refused.lock().map_or(0, |m| m.get(reason).copied().unwrap_or(0))
    }

    /// Connections closed for exceeding a bound, for `reason`, so far.
    pub fn closed(&self, reason: &str) -> u64 {
        self.closed.lock().map_or(0, |m| m.get(reason).copied().unwrap_or(0))
    }

    /// QUIC Retries sent so far.
    pub fn quic_retries(&self) -> u64 {
        self.quic_retries.load(Ordering::Relaxed)
    }

    /// Bytes of the upload budget in use now.
    pub fn upload_bytes_in_flight(&self) -> u64 {
        self.upload_bytes.load(Ordering::Relaxed)
    }

    /// The most bytes of the upload budget in use at once since the start.
    pub fn upload_bytes_in_flight_max(&self) -> u64 {
        self.upload_bytes_max.load(Ordering::Relaxed)
    }

    /// Pushes being written now.
    pub fn pushes_in_flight(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// The most pushes written at once since the start.
    pub fn pushes_in_flight_max(&self) -> u64 {
        self.pushes_max.load(Ordering::Relaxed)
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round.load(Ordering::Relaxed)
    }

    /// Bytes received so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Bytes sent so far.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// The metrics in Prometheus' text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one("fedpool_round", "gauge", "The round the engine is in.", self.round.load(Ordering::Relaxed));
        one(
            "fedpool_committed_round",
            "gauge",
            "The newest round committed to disk.",
            self.committed_round.load(Ordering::Relaxed),
        );
        one(
            "fedpool_connected_clients",
            "gauge",
            "Authenticated clients with an open connection.",
            self.connected.load(Ordering::Relaxed),
        );
        one(
            "fedpool_quarantined_clients",
            "gauge",
            "Clients quarantined for the rest of the run (too many refused updates).",
            self.quarantined.load(Ordering::Relaxed),
        );
        one("fedpool_bytes_in_total", "counter", "Frame bytes received from clients.", self.bytes_in());
        one("fedpool_bytes_out_total", "counter", "Frame bytes sent to clients.", self.bytes_out());
        one(
            "fedpool_quic_retries_total",
            "counter",
            "Incoming connections sent a QUIC Retry (address validation).",
            self.quic_retries(),
        );
        one(
            "fedpool_handshakes_in_progress",
            "gauge",
            "QUIC handshakes under way.",
            self.handshakes.load(Ordering::Relaxed),
        );
        one(
            "fedpool_upload_bytes_in_flight",
            "gauge",
            "Bytes of upload bodies held (read, decoded or queued for the engine): the shared budget in use.",
            self.upload_bytes_in_flight(),
        );
        one(
            "fedpool_upload_bytes_in_flight_max",
            "gauge",
            "The most bytes of upload bodies held at once since the start.",
            self.upload_bytes_in_flight_max(),
        );
        one(
            "fedpool_pushes_in_flight",
            "gauge",
            "Server pushes being written (at most one per connection).",
            self.pushes_in_flight(),
        );
        one(
            "fedpool_pushes_in_flight_max",
            "gauge",
            "The most server pushes written at once since the start.",
            self.pushes_in_flight_max(),
        );
        let mut labelled = |name: &str, help: &str, m: &Mutex<BTreeMap<&'static str, u64>>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            if let Ok(m) = m.lock() {
                for (reason, v) in m.iter() {
                    let _ = writeln!(s, "{name}{{reason=\"{reason}\"}} {v}");
                }
            }
        };
        labelled("fedpool_updates_rejected_total", "Refusals sent to clients, by reason.", &self.rejected);
        labelled(
            "fedpool_connections_refused_total",
            "Connections refused (over a cap before the handshake, or at admission after it), by reason.",
            &self.refused,
        );
        labelled(
            "fedpool_connections_closed_total",
            "Connections the server closed for exceeding a bound (a timeout, a full push queue), by reason.",
            &self.closed,
        );
        s
    }
}

/// Most bytes of a request read before answering.
const MAX_REQUEST: usize = 8 << 10;
/// How long a metrics request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the metrics endpoint on `addr` and returns the bound address and the task serving it
/// (it runs until aborted): `GET /metrics` is `metrics` as Prometheus text, `GET /` the status
/// page of `status` (with `metrics`' rejection counts and byte totals).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("metrics endpoint on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (metrics, status) = (metrics.clone(), status.clone());
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &metrics, &status)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((local, task))
}

async fn respond(mut stream: TcpStream, metrics: &Metrics, status: &Status) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, body, ctype) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", metrics.render(), "text/plain; version=0.0.4; charset=utf-8"),
        ("GET", "/") => ("200 OK", status.page(metrics), "text/html; charset=utf-8"),
        ("GET", _) => ("404 Not Found", "not found: try / or /metrics\n".to_string(), "text/plain; charset=utf-8"),
        _ => ("405 Method Not Allowed", "only GET\n".to_string(), "text/plain; charset=utf-8"),
    };
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoint_serves_prometheus_text_the_status_page_and_404_elsewhere() {
        let m = Metrics::new();
        m.set_round(3);
        m.add_bytes_in(100);
        m.count_reject(RejectReason::WrongNonce);
        m.count_reject(RejectReason::WrongNonce);
        let status = Status::from_snapshot(crate::status::StatusSnapshot::new(std::time::Instant::now(), 4));
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), m.clone(), status).await.unwrap();
        let out = get(addr, "/metrics").await;
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("\nfedpool_round 3\n"), "{out}");
        assert!(out.contains("\nfedpool_bytes_in_total 100\n"), "{out}");
        assert!(out.contains("fedpool_updates_rejected_total{reason=\"wrong_nonce\"} 2\n"), "{out}");
        assert!(out.contains("\nfedpool_upload_bytes_in_flight 0\n"), "{out}");
        let page = get(addr, "/").await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"), "{page}");
        let body = &page[page.find("\r\n\r\n").expect("head") + 4..];
        let length: usize = page
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("a length");
        assert_eq!(length, body.len());
        assert!(body.starts_with("<!DOCTYPE html>"), "{body}");
        assert!(
            body.contains("<tr class=\"rejection\" data-reason=\"wrong_nonce\"><td>wrong_nonce</td><td>2</td></tr>"),
            "the page counts the metrics' rejections: {body}"
        );
        assert!(body.contains("round 1 of 4"), "{body}");
        let out = get(addr, "/index.html").await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        task.abort();
    }
}
