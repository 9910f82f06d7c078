//! One task per client connection: authenticate (certificate CN and serial, revocation list), read
//! request streams, forward messages to the engine task, and route the engine's answers back to
//! the stream that asked (or push them, one at a time, on a fresh unidirectional stream). A
//! connection whose certificate becomes revoked while it is open is closed with
//! [`close::REVOKED`] ([`Revocations`], polled by [`poll_revocations`]). Every wait is bounded
//! ([`NetBounds`]): the enrollment, each request frame (control frames by one timeout, uploads by
//! their progress), the shared upload budget, the push queue.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fedpool_common::frame::{FrameError, FrameLimits};
use fedpool_common::wire::{ClientMessage, Heartbeat, RejectReason, ServerMessage};
use fedpool_common::TaskId;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::framing::{read_body, read_body_with_progress, read_header, write_frame_with_progress, ProgressError};
use super::tls::PeerIdentity;
use super::{close, tls, NetBounds, ToConn, ToEngine, UploadPermit};
use crate::certs::{CertError, RevocationFile, RevocationList, RevokedBy};
use crate::metrics::Metrics;

/// The revocation list as the connection tasks see it: checked at every admission (re-read first
/// if the file changed), polled by [`poll_revocations`], and pushed to live connections through a
/// watch channel whenever it changes.
pub(crate) struct Revocations {
    file: std::sync::Mutex<RevocationFile>,
    tx: watch::Sender<Arc<RevocationList>>,
}

impl Revocations {
    /// The list in the file at `path` (read at the first check).
    pub(crate) fn new(path: PathBuf) -> Self {
        let file = RevocationFile::new(path);
        let (tx, _) = watch::channel(file.current());
        Self { file: std::sync::Mutex::new(file), tx }
    }

    /// The list now, re-read if the file changed (and pushed to live connections if it did). An
    /// unreadable list is an error: the caller refuses rather than admit unchecked.
    fn now(&self) -> Result<Arc<RevocationList>, CertError> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let changed = file.refresh()?;
        let list = file.current();
        if changed {
            self.tx.send_replace(list.clone());
        }
        Ok(list)
    }

    /// Live connections watch this; subscribe before the admission check so no change between
    /// the two is missed.
    fn subscribe(&self) -> watch::Receiver<Arc<RevocationList>> {
        self.tx.subscribe()
    }

    fn path(&self) -> PathBuf {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).path().to_path_buf()
    }
}

/// Re-reads the revocation list every `every` while the server runs, so that live connections
/// of newly revoked certificates are closed. A list that turns unreadable is logged (once per
/// distinct error) and the last good list stays in force for live connections; new connections
/// are refused meanwhile ([`serve`] checks [`Revocations::now`]).
pub(crate) async fn poll_revocations(revocations: Arc<Revocations>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<String> = None;
    loop {
        tick.tick().await;
        match revocations.now() {
            Ok(_) => {
                if failing.take().is_some() {
                    info!("the revocation list {} is readable again", revocations.path().display());
                }
            }
            Err(e) => {
                let text = e.to_string();
                if failing.as_deref() != Some(text.as_str()) {
                    error!(
                        "cannot read the revocation list: {e}; live connections are checked against the last \
                         list read, new connections are refused until it is readable"
                    );
                }
                failing = Some(text);
            }
        }
    }
}

/// Why the certificate of `who` is revoked by `list`, as a close reason; `None` if it is not.
fn revoked_reason(list: &RevocationList, who: &PeerIdentity) -> Option<String> {
    let PeerIdentity { name, serial } = who;
    list.revokes(name, serial).map(|by| match by {
        RevokedBy::Serial => format!("the certificate of {name:?} (serial {serial}) is revoked"),
        RevokedBy::Name => format!("the certificate of {name:?} (serial {serial}) is revoked: the name is revoked"),
    })
}

/// What every connection task shares.
pub(crate) struct ConnShared {
    pub limits: FrameLimits,
    pub revocations: Arc<Revocations>,
    pub bounds: NetBounds,
    /// The upload budget (permits are bytes), shared by all connections.
    pub uploads: Arc<Semaphore>,
    /// The budget's size in bytes.
    pub upload_budget: u64,
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
// One value per request stream, moved straight into a match: boxing the large variant would
// buy nothing.
#[allow(clippy::large_enum_variant)]
enum Request {
    /// A message, with the stream to answer on, the bytes it took on the wire, the seconds its
    /// body took to arrive and, for an upload, its share of the upload budget.
    Message { send: SendStream, msg: ClientMessage, wire_bytes: u64, seconds: f64, permit: Option<UploadPermit> },
    /// The client ended or reset the stream without a frame (not an error).
    Abandoned,
    /// A bad or too slow frame: the connection is closed (counted under `closed`, if a bound).
    Bad { why: String, closed: Option<&'static str> },
}

impl Request {
    fn bad(why: String) -> Self {
        Request::Bad { why, closed: None }
    }
}

/// Reads one request frame, each part within its bound: the header within `control_timeout` of
/// the stream's opening; a control body within the same `control_timeout`; a bulk body (an
/// update) only while holding the connection's bulk permit (one update read at a time per
/// connection) and its length in the shared upload budget (waiting for either is the server's
/// doing, not the client's, and is not timed), then by progress: every chunk within
/// `upload_stall_timeout`, the whole within `request_timeout`. The budget's share travels with
/// the message to the engine task.
async fn read_request(
    send: SendStream,
    mut recv: RecvStream,
    shared: Arc<ConnShared>,
    bulk: Arc<Semaphore>,
) -> Request {
    let id = recv.id();
    let NetBounds { control_timeout, upload_stall_timeout, request_timeout, .. } = shared.bounds;
    let opened = tokio::time::Instant::now();
    let header = match tokio::time::timeout(control_timeout, read_header(&mut recv, &shared.limits)).await {
        Err(_) => {
            return Request::Bad {
                why: format!("stream {id}: no frame header within {control_timeout:?} (control_timeout)"),
                closed: Some("control_timeout"),
            }
        }
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Request::Abandoned,
        Ok(Err(e)) => return frame_error(id, e),
    };
    let (body, seconds, permit) = if header.kind.is_bulk() {
        let Ok(_bulk) = bulk.acquire_owned().await else { return Request::Abandoned };
        let Some(permit) =
            UploadPermit::acquire(&shared.uploads, shared.upload_budget, header.len, &shared.metrics).await
        else {
            return Request::Abandoned;
        };
        // The body's arrival time is the transfer (bandwidth estimates for rank budgets).
        let started = std::time::Instant::now();
        let read = read_body_with_progress(&mut recv, header, upload_stall_timeout);
        match tokio::time::timeout(request_timeout, read).await {
            Err(_) => {
                return Request::Bad {
                    why: format!(
                        "stream {id}: {:?} body of {} bytes not complete within {request_timeout:?} (request_timeout)",
                        header.kind, header.len
                    ),
                    closed: Some("request_timeout"),
                }
            }
            Ok(Err(ProgressError::Stalled { done, total, stall, .. })) => {
                return Request::Bad {
                    why: format!(
                        "stream {id}: {:?} body stalled at {done} of {total} bytes: no 64 KiB chunk (or the rest) \
                         within {stall:?} (upload_stall_timeout)",
                        header.kind
                    ),
                    closed: Some("upload_stalled"),
                }
            }
            Ok(Err(ProgressError::Frame(e))) => return frame_error(id, e),
            Ok(Ok(body)) => (body, started.elapsed().as_secs_f64(), Some(permit)),
        }
    } else {
        let started = std::time::Instant::now();
        match tokio::time::timeout_at(opened + control_timeout, read_body(&mut recv, header)).await {
            Err(_) => {
                return Request::Bad {
                    why: format!(
                        "stream {id}: {:?} frame of {} bytes not complete within {control_timeout:?} (control_timeout)",
                        header.kind, header.len
                    ),
                    closed: Some("control_timeout"),
                }
            }
            Ok(Err(e)) => return frame_error(id, e),
            Ok(Ok(body)) => (body, started.elapsed().as_secs_f64(), None),
        }
    };
    // One frame per request stream: stop reading (the peer gets STOP_SENDING for anything more).
    let _ = recv.stop(VarInt::from_u32(0));
    let wire_bytes = (fedpool_common::frame::HEADER_LEN + body.len()) as u64;
    // The raw body is dropped here; the decoded message keeps the budget's share.
    match ClientMessage::decode(header.kind, &body) {
        Ok(msg) => Request::Message { send, msg, wire_bytes, seconds, permit },
        Err(e) => Request::bad(format!("stream {id}: {:?} frame of {} bytes: {e}", header.kind, body.len())),
    }
}

/// What a frame error on stream `id` means: a reset stream or a lost connection is nothing to
/// answer; anything else is a bad frame.
fn frame_error(id: quinn::StreamId, e: FrameError) -> Request {
    match e {
        FrameError::Io(e) => {
            debug!("stream {id}: {e}");
            Request::Abandoned
        }
        e => Request::bad(format!("stream {id}: {e}")),
    }
}

/// Serves one incoming connection to its end. `_connection` is its slot under
/// `max_connections`, held to the end; `handshake` its slot under `max_handshakes`, given back
/// once the handshake is over.
pub(crate) async fn serve(
    incoming: quinn::Incoming,
    shared: Arc<ConnShared>,
    _connection: OwnedSemaphorePermit,
    handshake: OwnedSemaphorePermit,
) {
    let remote = incoming.remote_address();
    shared.metrics.handshake(true);
    let handshaken = incoming.await;
    shared.metrics.handshake(false);
    drop(handshake);
    let conn = match handshaken {
        Ok(c) => c,
        Err(e) => {
            info!("connection from {remote} failed during the handshake: {e}");
            return;
        }
    };
    let who = match tls::peer_identity(&conn) {
        Ok(who) => who,
        Err(e) => {
            warn!("connection from {remote} refused: {e}");
            shared.metrics.count_refused("no_identity");
            close_with(&conn, close::NO_IDENTITY, &format!("refused: {e}"));
            return;
        }
    };
    let client = who.name.clone();
    let revocations = shared.revocations.subscribe();
    match shared.revocations.now() {
        Ok(list) => {
            if let Some(why) = revoked_reason(&list, &who) {
                warn!("client {client:?} from {remote} refused: {why}");
                shared.metrics.count_refused("revoked");
                close_with(&conn, close::REVOKED, &format!("refused: {why}"));
                return;
            }
        }
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
    let why = run(&conn, &who, id, rx, revocations, &shared).await;
    info!("client {client:?} (connection {id}) gone: {why}");
    let _ = shared.to_engine.send(ToEngine::Disconnected { client, conn: id }).await;
}

async fn run(
    conn: &quinn::Connection,
    who: &PeerIdentity,
    id: u64,
    mut rx: mpsc::UnboundedReceiver<ToConn>,
    mut revocations: watch::Receiver<Arc<RevocationList>>,
    shared: &Arc<ConnShared>,
) -> String {
    let client = who.name.as_str();
    let bounds = shared.bounds;
    // False once the list's sender is gone (the server is stopping): nothing more to watch.
    let mut watching = true;
    let mut readers: JoinSet<Request> = JoinSet::new();
    let mut writers: JoinSet<()> = JoinSet::new();
    let mut pending = Pending::default();
    let bulk = Arc::new(Semaphore::new(1));
    // One push writer: pushes go out one at a time; at most `max_queued_pushes` wait behind it.
    let (push_tx, push_rx) = mpsc::channel(bounds.max_queued_pushes.max(1));
    let mut push_tx = Some(push_tx);
    let mut pusher = tokio::spawn(pusher(conn.clone(), push_rx, bounds, shared.metrics.clone()));
    let mut pusher_done = false;
    // Until the first Enroll frame.
    let enroll_deadline = tokio::time::sleep(bounds.enroll_timeout);
    tokio::pin!(enroll_deadline);
    let mut enrolled = false;
    let why = loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    readers.spawn(read_request(send, recv, shared.clone(), bulk.clone()));
                }
                Err(e) => break format!("connection closed: {e}"),
            },
            () = &mut enroll_deadline, if !enrolled => {
                let why = format!("no Enroll within {:?} (enroll_timeout) of connecting", bounds.enroll_timeout);
                warn!("client {client:?} (connection {id}) closed: {why}");
                shared.metrics.count_closed("enroll_timeout");
                close_with(conn, close::PROTOCOL, &format!("protocol error: {why}"));
                break format!("closed: {why}");
            },
            Some(done) = readers.join_next() => {
                let Ok(request) = done else { continue };
                match request {
                    Request::Abandoned => {}
                    Request::Bad { why, closed } => {
                        warn!("client {client:?} (connection {id}) sent a bad frame: {why}");
                        shared.metrics.count_reject(RejectReason::Protocol);
                        if let Some(reason) = closed {
                            shared.metrics.count_closed(reason);
                        }
                        close_with(conn, close::PROTOCOL, &format!("protocol error: {why}"));
                        break format!("closed for a protocol error: {why}");
                    }
                    Request::Message { send, msg, wire_bytes, seconds, permit } => {
                        shared.metrics.add_bytes_in(wire_bytes);
                        match &msg {
                            ClientMessage::Enroll(_) => {
                                enrolled = true;
                                pending.enrolls.push_back(Waiting { send, task_id: None });
                            }
                            ClientMessage::Update(u) => pending.updates.push_back(Waiting { send, task_id: Some(u.task_id) }),
                            ClientMessage::EvalReport(r) => pending.updates.push_back(Waiting { send, task_id: Some(r.task_id) }),
                            ClientMessage::Heartbeat(h) => {
                                let reply = ServerMessage::Heartbeat(Heartbeat { seq: h.seq });
                                writers.spawn(write_reply(send, reply, bounds.upload_stall_timeout, shared.metrics.clone()));
                            }
                        }
                        let to_engine =
                            ToEngine::Message {
                                client: client.to_string(),
                                conn: id,
                                msg,
                                wire_bytes,
                                seconds,
                                received: std::time::Instant::now(),
                                permit,
                            };
                        if shared.to_engine.send(to_engine).await.is_err() {
                            close_with(conn, close::SHUTDOWN, "server shutting down");
                            break "the engine stopped".into();
                        }
                    }
                }
            },
            Some(_) = writers.join_next() => {},
            done = &mut pusher, if !pusher_done => {
                pusher_done = true;
                if let Ok(Err(why)) = done {
                    // The pusher closed the connection; accept_bi ends the loop next.
                    debug!("client {client:?} (connection {id}): {why}");
                }
            },
            changed = revocations.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let list = revocations.borrow_and_update().clone();
                if let Some(why) = revoked_reason(&list, who) {
                    warn!("client {client:?} (connection {id}) closed: {why}");
                    close_with(conn, close::REVOKED, &format!("revoked while connected: {why}"));
                    break format!("closed: {why}");
                }
            },
            out = rx.recv() => match out {
                Some(ToConn::Send(msg)) => {
                    match pending.take_for(&msg) {
                        Some(send) => {
                            writers.spawn(write_reply(send, msg, bounds.upload_stall_timeout, shared.metrics.clone()));
                        }
                        None => {
                            let full = match push_tx.as_ref().map(|tx| tx.try_send(msg)) {
                                Some(Ok(())) | None => false,
                                Some(Err(mpsc::error::TrySendError::Closed(_))) => false,
                                Some(Err(mpsc::error::TrySendError::Full(_))) => true,
                            };
                            if full {
                                let why = format!(
                                    "more than {} pushes waiting (max_queued_pushes): the client does not take \
                                     its pushes",
                                    bounds.max_queued_pushes
                                );
                                warn!("client {client:?} (connection {id}) closed: {why}");
                                shared.metrics.count_closed("push_queue_full");
                                close_with(conn, close::PROTOCOL, &format!("protocol error: {why}"));
                                break format!("closed: {why}");
                            }
                        }
                    }
                }
                Some(ToConn::Close { code, reason }) => {
                    // Let queued answers and pushes go out first (briefly), then close.
                    push_tx = None;
                    let flush = async {
                        while writers.join_next().await.is_some() {}
                        if !pusher_done {
                            let _ = (&mut pusher).await;
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
                    close_with(conn, code, &reason);
                    break format!("closed by the server: {reason}");
                }
                None => {
                    close_with(conn, close::SHUTDOWN, "server shutting down");
                    break "the engine stopped".into();
                }
            },
        }
    };
    drop(push_tx);
    pusher.abort();
    why
}

/// The connection's one push writer: takes pushes in order and writes each on a fresh
/// unidirectional stream, one at a time ([`push`]). A push that cannot go out in time closes
/// the connection (the error says why).
async fn pusher(
    conn: quinn::Connection,
    mut queue: mpsc::Receiver<ServerMessage>,
    bounds: NetBounds,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    while let Some(msg) = queue.recv().await {
        if let Err(why) = push(&conn, msg, bounds, &metrics).await {
            warn!("closing a connection: {why}");
            metrics.count_closed("push_stalled");
            close_with(&conn, close::PROTOCOL, &format!("protocol error: {why}"));
            return Err(why);
        }
    }
    Ok(())
}

/// The name of a server message's kind, for reasons and logs.
fn kind_name(msg: &ServerMessage) -> &'static str {
    match msg {
        ServerMessage::Welcome(_) => "Welcome",
        ServerMessage::Task(_) => "Task",
        ServerMessage::Ack(_) => "Ack",
        ServerMessage::Reject(_) => "Reject",
        ServerMessage::Heartbeat(_) => "Heartbeat",
        ServerMessage::EvalTask(_) => "EvalTask",
    }
}

/// Counts a push in flight while it lives (so an aborted push is uncounted too).
struct InFlight(Arc<Metrics>);

impl InFlight {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.push(true);
        Self(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.push(false);
    }
}

/// Pushes `msg` on a fresh unidirectional stream: the stream within `upload_stall_timeout` (a
/// client that does not take its streams runs out of them), every 64 KiB chunk within it, the
/// whole within `request_timeout`, and done once the client's transport acknowledged it all (also
/// within `upload_stall_timeout`). `Err` says why it could not go out in time; a connection
/// already gone is `Ok` (nothing to close).
async fn push(
    conn: &quinn::Connection,
    msg: ServerMessage,
    bounds: NetBounds,
    metrics: &Arc<Metrics>,
) -> Result<(), String> {
    let _in_flight = InFlight::new(metrics);
    let stall = bounds.upload_stall_timeout;
    let what = kind_name(&msg);
    let mut send = match tokio::time::timeout(stall, conn.open_uni()).await {
        Err(_) => return Err(format!("no stream to push a {what} on within {stall:?} (upload_stall_timeout)")),
        Ok(Err(e)) => {
            debug!("cannot open a stream to push a message: {e}");
            return Ok(());
        }
        Ok(Ok(s)) => s,
    };
    let frame = match msg.to_frame() {
        Ok(f) => f,
        Err(e) => {
            warn!("cannot encode a {what} push: {e}");
            let _ = send.reset(VarInt::from_u32(close::INTERNAL));
            return Ok(());
        }
    };
    drop(msg);
    let write = write_frame_with_progress(&mut send, &frame, stall);
    match tokio::time::timeout(bounds.request_timeout, write).await {
        Err(_) => {
            return Err(format!(
                "a {what} push of {} bytes not delivered within {:?} (request_timeout)",
                frame.len(),
                bounds.request_timeout
            ))
        }
        Ok(Err(ProgressError::Stalled { done, total, stall, .. })) => {
            return Err(format!(
                "a {what} push stalled at {done} of {total} bytes for {stall:?} (upload_stall_timeout)"
            ))
        }
        Ok(Err(ProgressError::Frame(e))) => {
            debug!("a {what} push not delivered: {e}");
            return Ok(());
        }
        Ok(Ok(())) => {}
    }
    metrics.add_bytes_out(frame.len() as u64);
    drop(frame);
    let _ = send.finish();
    match tokio::time::timeout(stall, send.stopped()).await {
        Err(_) => Err(format!("a {what} push not acknowledged within {stall:?} (upload_stall_timeout)")),
        Ok(_) => Ok(()),
    }
}

/// Writes `msg` as the answer on a request stream (within `stall`) and finishes it.
async fn write_reply(mut send: SendStream, msg: ServerMessage, stall: Duration, metrics: Arc<Metrics>) {
    let id = send.id();
    let frame = match msg.to_frame() {
        Ok(f) => f,
        Err(e) => {
            warn!("cannot encode an answer on stream {id}: {e}");
            let _ = send.reset(VarInt::from_u32(close::INTERNAL));
            return;
        }
    };
    drop(msg);
    match write_frame_with_progress(&mut send, &frame, stall).await {
        Ok(()) => {
            metrics.add_bytes_out(frame.len() as u64);
            let _ = send.finish();
            // Keep the stream until the peer has the data (or a bound), so a close right after
            // does not cut the answer.
            let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
        }
        Err(e) => {
            debug!("answer on stream {id} not delivered: {e}");
            let _ = send.reset(VarInt::from_u32(close::PROTOCOL));
        }
    }
}
