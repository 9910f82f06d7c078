//! One task per client connection: authenticate (certificate CN, revocation list), read request
//! streams, forward messages to the engine task, and route the engine's answers back to the
//! stream that asked (or push them on a fresh unidirectional stream).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fedpool_common::frame::{FrameError, FrameLimits};
use fedpool_common::wire::{ClientMessage, Heartbeat, RejectReason, ServerMessage};
use fedpool_common::TaskId;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::framing::{read_body, read_header, RawFrame};
use super::{close, tls, ToConn, ToEngine};
use crate::certs::RevocationList;
use crate::metrics::Metrics;

/// What every connection task shares.
pub(crate) struct ConnShared {
    pub limits: FrameLimits,
    pub revocation_list: PathBuf,
    pub request_timeout: Duration,
    pub metrics: Arc<Metrics>,
    pub to_engine: mpsc::Sender<ToEngine>,
    pub next_id: AtomicU64,
}

/// Longest close reason sent (QUIC carries it in one packet).
const MAX_REASON: usize = 512;

/// Closes `conn` with `code` and a reason trimmed to fit a packet.
pub(crate) fn close_with(conn: &quinn::Connection, code: u32, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(VarInt::from_u32(code), &reason.as_bytes()[..end]);
}

/// A request stream waiting for the engine's answer.
struct Waiting {
    send: SendStream,
    task_id: Option<TaskId>,
}

/// Streams waiting for answers, by the kind of request.
#[derive(Default)]
struct Pending {
    enrolls: VecDeque<Waiting>,
    updates: VecDeque<Waiting>,
}

impl Pending {
    /// The stream a server message answers, if any: a Welcome answers the oldest Enroll; an Ack
    /// the Update of its task; a Reject the Update of its task, else the oldest Enroll for
    /// enrollment reasons, else the oldest Update, else the oldest Enroll.
    fn take_for(&mut self, msg: &ServerMessage) -> Option<SendStream> {
        let by_task = |q: &mut VecDeque<Waiting>, t: TaskId| {
            q.iter().position(|w| w.task_id == Some(t)).and_then(|i| q.remove(i)).map(|w| w.send)
        };
        match msg {
            ServerMessage::Welcome(_) => self.enrolls.pop_front().map(|w| w.send),
            ServerMessage::Ack(a) => by_task(&mut self.updates, a.task_id),
            ServerMessage::Reject(r) => {
                if let Some(s) = r.task_id.and_then(|t| by_task(&mut self.updates, t)) {
                    return Some(s);
                }
                let enroll_reason = matches!(
                    r.reason,
                    RejectReason::ProtocolVersion | RejectReason::BackboneMismatch | RejectReason::SpecMismatch
                );
                if enroll_reason {
                    if let Some(w) = self.enrolls.pop_front() {
                        return Some(w.send);
                    }
                }
                self.updates.pop_front().or_else(|| self.enrolls.pop_front()).map(|w| w.send)
            }
            ServerMessage::Task(_) | ServerMessage::EvalTask(_) | ServerMessage::Heartbeat(_) => None,
        }
    }
}

/// What reading one request stream gave.
// One value per request stream, moved straight into a match: boxing the large variant would buy
// nothing.
#[allow(clippy::large_enum_variant)]
enum Request {
    /// A message, with the stream to answer on and the seconds its body took to arrive.
    Message { send: SendStream, frame: RawFrame, msg: ClientMessage, seconds: f64 },
    /// The client ended or reset the stream without a frame (not an error).
    Abandoned,
    /// A bad frame: the connection is closed.
    Bad(String),
}

/// Reads one request frame. A bulk body (an update) is read only while holding the connection's
/// bulk permit, so one connection buffers at most one update at a time (memory: one frame cap per
/// connection, however many streams it opens).
async fn read_request(
    send: SendStream,
    mut recv: RecvStream,
    limits: FrameLimits,
    timeout: Duration,
    bulk: Arc<Semaphore>,
) -> Request {
    let id = recv.id();
    let read = async {
        let Some(header) = read_header(&mut recv, &limits).await? else { return Ok(None) };
        let _permit = if header.kind.is_bulk() { bulk.acquire().await.ok() } else { None };
        // The body's arrival time is the transfer (bandwidth estimates for rank budgets).
        let started = std::time::Instant::now();
        let body = read_body(&mut recv, header).await?;
        Ok::<_, FrameError>(Some((RawFrame { kind: header.kind, body }, started.elapsed().as_secs_f64())))
    };
    let (frame, seconds) = match tokio::time::timeout(timeout, read).await {
        Err(_) => return Request::Bad(format!("stream {id}: no complete frame within {timeout:?}")),
        Ok(Ok(Some(read))) => read,
        Ok(Ok(None)) => return Request::Abandoned,
        Ok(Err(FrameError::Io(e))) => {
            // A reset stream or a lost connection: nothing to answer, nothing malformed.
            debug!("stream {id}: {e}");
            return Request::Abandoned;
        }
        Ok(Err(e)) => return Request::Bad(format!("stream {id}: {e}")),
    };
    // One frame per request stream: stop reading (the peer gets STOP_SENDING for anything more).
    let _ = recv.stop(VarInt::from_u32(0));
    match ClientMessage::decode(frame.kind, &frame.body) {
        Ok(msg) => Request::Message { send, frame, msg, seconds },
        Err(e) => Request::Bad(format!("stream {id}: {:?} frame of {} bytes: {e}", frame.kind, frame.body.len())),
    }
}

/// Serves one incoming connection to its end.
pub(crate) async fn serve(incoming: quinn::Incoming, shared: Arc<ConnShared>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            info!("connection from {remote} failed during the handshake: {e}");
            return;
        }
    };
    let client = match tls::peer_name(&conn) {
        Ok(n) => n,
        Err(e) => {
            warn!("connection from {remote} refused: {e}");
            shared.metrics.count_refused("no_identity");
            close_with(&conn, close::NO_IDENTITY, &format!("refused: {e}"));
            return;
        }
    };
    match RevocationList::load(&shared.revocation_list) {
        Ok(list) if list.contains(&client) => {
            warn!("client {client:?} from {remote} refused: its certificate is revoked");
            shared.metrics.count_refused("revoked");
            close_with(&conn, close::REVOKED, &format!("refused: the certificate of {client:?} is revoked"));
            return;
        }
        Ok(_) => {}
        Err(e) => {
            warn!("client {client:?} from {remote} refused: cannot read the revocation list: {e}");
            shared.metrics.count_refused("revocation_list_unreadable");
            close_with(&conn, close::INTERNAL, "refused: the server cannot check revocations");
            return;
        }
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    info!("client {client:?} connected from {remote} (connection {id})");
    let (tx, rx) = mpsc::unbounded_channel();
    if shared.to_engine.send(ToEngine::Connected { client: client.clone(), conn: id, tx }).await.is_err() {
        close_with(&conn, close::SHUTDOWN, "server shutting down");
        return;
    }
    let why = run(&conn, &client, id, rx, &shared).await;
    info!("client {client:?} (connection {id}) gone: {why}");
    let _ = shared.to_engine.send(ToEngine::Disconnected { client, conn: id }).await;
}

async fn run(
    conn: &quinn::Connection,
    client: &str,
    id: u64,
    mut rx: mpsc::UnboundedReceiver<ToConn>,
    shared: &ConnShared,
) -> String {
    let mut readers: JoinSet<Request> = JoinSet::new();
    let mut writers: JoinSet<()> = JoinSet::new();
    let mut pending = Pending::default();
    let bulk = Arc::new(Semaphore::new(1));
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    readers.spawn(read_request(send, recv, shared.limits, shared.request_timeout, bulk.clone()));
                }
                Err(e) => return format!("connection closed: {e}"),
            },
            Some(done) = readers.join_next() => {
                let Ok(request) = done else { continue };
                match request {
                    Request::Abandoned => {}
                    Request::Bad(why) => {
                        warn!("client {client:?} (connection {id}) sent a bad frame: {why}");
                        shared.metrics.count_reject(RejectReason::Protocol);
                        close_with(conn, close::PROTOCOL, &format!("protocol error: {why}"));
                        return format!("closed for a protocol error: {why}");
                    }
                    Request::Message { send, frame, msg, seconds } => {
                        let wire_bytes = frame.wire_len();
                        shared.metrics.add_bytes_in(wire_bytes);
                        match &msg {
                            ClientMessage::Enroll(_) => pending.enrolls.push_back(Waiting { send, task_id: None }),
                            ClientMessage::Update(u) => pending.updates.push_back(Waiting { send, task_id: Some(u.task_id) }),
                            ClientMessage::EvalReport(r) => pending.updates.push_back(Waiting { send, task_id: Some(r.task_id) }),
                            ClientMessage::Heartbeat(h) => {
                                let reply = ServerMessage::Heartbeat(Heartbeat { seq: h.seq });
                                writers.spawn(write_reply(send, reply, shared.metrics.clone()));
                            }
                        }
                        let to_engine =
                            ToEngine::Message { client: client.to_string(), conn: id, msg, wire_bytes, seconds };
                        if shared.to_engine.send(to_engine).await.is_err() {
                            close_with(conn, close::SHUTDOWN, "server shutting down");
                            return "the engine stopped".into();
                        }
                    }
                }
            },
            Some(_) = writers.join_next() => {},
            out = rx.recv() => match out {
                Some(ToConn::Send(msg)) => {
                    match pending.take_for(&msg) {
                        Some(send) => { writers.spawn(write_reply(send, msg, shared.metrics.clone())); }
                        None => {
                            let conn = conn.clone();
                            writers.spawn(push(conn, msg, shared.metrics.clone()));
                        }
                    }
                }
                Some(ToConn::Close { code, reason }) => {
                    // Let queued answers go out first (briefly), then close.
                    let flush = async { while writers.join_next().await.is_some() {} };
                    let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
                    close_with(conn, code, &reason);
                    return format!("closed by the server: {reason}");
                }
                None => {
                    close_with(conn, close::SHUTDOWN, "server shutting down");
                    return "the engine stopped".into();
                }
            },
        }
    }
}

/// Writes `msg` as the answer on a request stream and finishes it.
async fn write_reply(mut send: SendStream, msg: ServerMessage, metrics: Arc<Metrics>) {
    let id = send.id();
    let frame = match msg.to_frame() {
        Ok(f) => f,
        Err(e) => {
            warn!("cannot encode an answer on stream {id}: {e}");
            let _ = send.reset(VarInt::from_u32(close::INTERNAL));
            return;
        }
    };
    match send.write_all(&frame).await {
        Ok(()) => {
            metrics.add_bytes_out(frame.len() as u64);
            let _ = send.finish();
            // Keep the stream until the peer has the data (or a bound), so a close right after
            // does not cut the answer.
            let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
        }
        Err(e) => debug!("answer on stream {id} not delivered: {e}"),
    }
}

/// Pushes `msg` on a fresh unidirectional stream.
async fn push(conn: quinn::Connection, msg: ServerMessage, metrics: Arc<Metrics>) {
    match conn.open_uni().await {
        Ok(send) => write_reply(send, msg, metrics).await,
        Err(e) => debug!("cannot open a stream to push a message: {e}"),
    }
}
