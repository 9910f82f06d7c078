//! The daemon's loop: connect, enroll, take tasks, train or evaluate on a blocking thread,
//! upload, and after any loss of the connection reconnect with exponential backoff and jitter.
//!
//! ```text
//!          ┌──────────── backoff (doubling from reconnect_initial to reconnect_max, ×U(0.5,1.5)) ──┐
//!          ▼                                                                                        │
//!   connect + Enroll ──Reject(backbone/spec/protocol)──▶ stop with the server's words               │
//!          │ Welcome                                                                                │
//!          ▼                                                                                        │
//!   serve: pushed Task / EvalTask ─▶ queue ─▶ one job at a time (spawn_blocking) ─▶ result ─▶ send  │
//!          heartbeats every heartbeat_secs; connection lost ─────────────────────────────────────────┘
//!          closed with FINISHED ─▶ done;   SIGINT/SIGTERM ─▶ abandon the upload, close, done
//! ```
//! A job keeps running while the connection is down; its result waits and is sent when the server,
//! after the client enrolls again, re-sends the same task (the engine does that while the round is
//! open). A result for a task the server no longer offers is dropped. The residual is saved only
//! after the server acknowledges the update ([`super::residual`]), which it does only once the
//! round is committed to its disk: the answer to an upload may take until the round's deadline,
//! so heartbeats run on a task of their own meanwhile, and an answer that arrives pushed (the
//! upload's stream was lost with an earlier connection) counts as well.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedpool_common::wire::{ClientMessage, EvalTask, Heartbeat, RejectReason, RoundTask, ServerMessage, Update};
use fedpool_common::TaskId;
use fedpool_transport::close;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::{ConfigError, DaemonConfig};
use super::connection::{Connection, Dialer, Faults, FrameTap, LinkError, ANSWER_TIMEOUT};
use super::local::{LocalError, LocalWork};

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server closed the federation (all rounds run).
    Finished,
    /// Stopped on request (a signal).
    Stopped,
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Loading, training or evaluating failed.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The transport could not be set up.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The server refused this client for good (another backbone, spec or protocol; revoked).
    #[error("the server refused this client ({reason}): {detail}")]
    Refused {
        /// The reason.
        reason: String,
        /// The server's words.
        detail: String,
    },
    /// A blocking job panicked.
    #[error("a local job failed: {0}")]
    Job(String),
}

/// Optional hooks for tests and debugging.
#[derive(Clone, Default)]
pub struct DaemonOptions {
    /// Sees every frame written to the server.
    pub tap: Option<FrameTap>,
    /// Injected faults.
    pub faults: Faults,
}

/// A task received and not yet done.
#[derive(Debug, Clone)]
enum Job {
    Train(Box<RoundTask>),
    Eval(Box<EvalTask>),
}

impl Job {
    fn task_id(&self) -> TaskId {
        match self {
            Job::Train(t) => t.task_id,
            Job::Eval(t) => t.task_id,
        }
    }
}

/// A finished job's result, waiting to be sent.
#[derive(Debug, Clone)]
enum Ready {
    Update(Box<Update>),
    Eval(fedpool_common::wire::EvalReport),
}

impl Ready {
    fn task_id(&self) -> TaskId {
        match self {
            Ready::Update(u) => u.task_id,
            Ready::Eval(r) => r.task_id,
        }
    }
}

type Running = (TaskId, JoinHandle<Result<Ready, DaemonError>>);

/// The daemon's state across connections.
struct Daemon {
    config: DaemonConfig,
    options: DaemonOptions,
    local: Arc<Mutex<LocalWork>>,
    queue: VecDeque<Job>,
    running: Option<Running>,
    ready: Option<Ready>,
    /// The newest training task and when its round's deadline passes at the server (its update's
    /// answer comes by then, plus the commit).
    train_deadline: Option<(TaskId, Instant)>,
}

/// A task that sends heartbeats for one connection; stopped when dropped.
struct Heartbeats(JoinHandle<()>);

impl Heartbeats {
    /// Starts sending a heartbeat on `conn` every `every`.
    fn start(conn: Connection, every: Duration) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            for seq in 1u64.. {
                tick.tick().await;
                let c = conn.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.exchange(&ClientMessage::Heartbeat(Heartbeat { seq })).await {
                        tracing::debug!("heartbeat {seq}: {e}");
                    }
                });
            }
        }))
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How one connection ended.
enum ConnEnd {
    Lost(String),
    Finished,
    Stopped,
}

/// Runs the daemon until the federation finishes, `stop` turns true, or a fatal error.
pub async fn run(
    config: DaemonConfig,
    options: DaemonOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<Outcome, DaemonError> {
    let load_config = config.clone();
    let local = tokio::task::spawn_blocking(move || LocalWork::load(&load_config))
        .await
        .map_err(|e| DaemonError::Job(e.to_string()))??;
    let dialer = Dialer::new(&config.ca_cert, &config.cert, &config.key, &config.server_name, config.idle_timeout)?;
    let mut d = Daemon {
        config,
        options,
        local: Arc::new(Mutex::new(local)),
        queue: VecDeque::new(),
        running: None,
        ready: None,
        train_deadline: None,
    };
    let mut failures: u32 = 0;
    loop {
        if *stop.borrow() {
            return Ok(Outcome::Stopped);
        }
        match d.session(&dialer, &mut stop).await {
            Ok(ConnEnd::Finished) => return Ok(Outcome::Finished),
            Ok(ConnEnd::Stopped) => return Ok(Outcome::Stopped),
            Ok(ConnEnd::Lost(why)) => {
                tracing::warn!("connection lost: {why}");
                failures = 0; // it had enrolled: start the backoff again from the beginning
            }
            Err(SessionError::Fatal(e)) => return Err(e),
            Err(SessionError::Retry(why)) => {
                tracing::warn!("cannot reach the server: {why}");
                failures = failures.saturating_add(1);
            }
        }
        let wait = backoff(d.config.reconnect_initial, d.config.reconnect_max, failures);
        tracing::info!("reconnecting in {:.1} s", wait.as_secs_f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return Ok(Outcome::Stopped),
        }
    }
}

/// The delay before reconnection attempt `failures` (0 after a session that had enrolled):
/// `initial · 2^failures`, at most `max`, times a uniform jitter in [0.5, 1.5).
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let base = initial.saturating_mul(1u32 << failures.min(16)).min(max);
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}

enum SessionError {
    Retry(String),
    Fatal(DaemonError),
}

impl Daemon {
    /// One connection: connect, enroll, serve until it ends.
    async fn session(&mut self, dialer: &Dialer, stop: &mut watch::Receiver<bool>) -> Result<ConnEnd, SessionError> {
        let addr = self.config.server_addr().map_err(|e| SessionError::Retry(e.to_string()))?;
        let conn = dialer
            .connect(addr, self.options.tap.clone(), self.options.faults)
            .await
            .map_err(|e| SessionError::Retry(e.to_string()))?;
        let enroll = self.local.lock().map_err(|_| fatal_poison())?.participant().enroll();
        let heartbeat_secs = match conn.exchange(&ClientMessage::Enroll(enroll)).await {
            Ok(ServerMessage::Welcome(w)) => {
                tracing::info!(name = %w.client_name, round = %w.round, "enrolled with {addr}");
                w.heartbeat_secs
            }
            Ok(ServerMessage::Reject(r)) => {
                return Err(SessionError::Fatal(DaemonError::Refused {
                    reason: format!("{:?}", r.reason),
                    detail: r.detail,
                }));
            }
            Ok(other) => return Err(SessionError::Retry(format!("unexpected answer to enrollment: {other:?}"))),
            Err(e) => return Err(classify(&conn, e)),
        };
        // Heartbeats go on while an upload waits for its answer (until the round commits).
        let _heartbeats = Heartbeats::start(conn.clone(), Duration::from_secs(u64::from(heartbeat_secs.max(1))));
        let mut pushes = conn.pushes();
        loop {
            self.start_next_job();
            let job_done = async {
                match self.running.as_mut() {
                    Some((_, handle)) => Some(handle.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                push = pushes.recv() => match push {
                    Some(Ok(ServerMessage::Task(task))) => self.offer(Job::Train(task), &conn, stop).await?,
                    Some(Ok(ServerMessage::EvalTask(task))) => self.offer(Job::Eval(task), &conn, stop).await?,
                    // The answer to an upload whose stream went with an earlier connection.
                    Some(Ok(answer @ (ServerMessage::Ack(_) | ServerMessage::Reject(_)))) => {
                        self.answered(answer).await?;
                    }
                    Some(Ok(other)) => tracing::debug!("ignoring a pushed {other:?}"),
                    Some(Err(e)) => return end_of(&conn, e),
                    None => return end_of(&conn, LinkError::Stream("the push reader stopped".into())),
                },
                done = job_done => {
                    let Some(joined) = done else { continue };
                    self.running = None;
                    match joined {
                        Ok(Ok(ready)) => {
                            self.ready = Some(ready);
                            if let Some(end) = self.send_ready(&conn, stop).await? {
                                return Ok(end);
                            }
                        }
                        Ok(Err(DaemonError::Local(e))) if e.is_bad_task() => tracing::error!("task abandoned: {e}"),
                        Ok(Err(e)) => return Err(SessionError::Fatal(e)),
                        Err(e) => return Err(SessionError::Fatal(DaemonError::Job(e.to_string()))),
                    }
                }
                _ = stop.changed() => {
                    conn.close(close::NORMAL, "client stopping");
                    return Ok(ConnEnd::Stopped);
                }
            }
        }
    }

    /// A task arrived: send the waiting result if it is for this task, else queue it (a newer
    /// training task replaces older queued ones and a stale result).
    async fn offer(
        &mut self,
        job: Job,
        conn: &Connection,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let id = job.task_id();
        if self.ready.as_ref().is_some_and(|r| r.task_id() == id) {
            tracing::info!(task = %id, "the server still wants task {id}: sending the result again");
            if let Some(ConnEnd::Stopped) = self.send_ready(conn, stop).await? {
                return Ok(());
            }
            return Ok(());
        }
        if self.running.as_ref().is_some_and(|(r, _)| *r == id) || self.queue.iter().any(|j| j.task_id() == id) {
            return Ok(()); // already being done
        }
        if let Job::Train(t) = &job {
            tracing::info!(round = %t.round, task = %id, steps = t.local_steps, "training task received");
            self.train_deadline = Some((id, Instant::now() + Duration::from_millis(t.deadline_ms)));
            self.queue.retain(|j| !matches!(j, Job::Train(_)));
        } else if let Job::Eval(t) = &job {
            tracing::info!(round = %t.round, task = %id, "evaluation task received");
        }
        self.ready = None;
        self.queue.push_back(job);
        Ok(())
    }

    fn start_next_job(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Some(job) = self.queue.pop_front() else { return };
        let local = self.local.clone();
        let id = job.task_id();
        let handle = tokio::task::spawn_blocking(move || {
            let mut local = local.lock().map_err(|_| DaemonError::Job("local state poisoned".into()))?;
            Ok(match job {
                Job::Train(task) => Ready::Update(Box::new(local.train_task(&task)?)),
                Job::Eval(task) => Ready::Eval(local.evaluate_task(&task)?),
            })
        });
        self.running = Some((id, handle));
    }

    /// Sends the waiting result. On an ack an update's residual is saved; on a reject the result
    /// is dropped; on a lost connection it is kept for the next connection.
    async fn send_ready(
        &mut self,
        conn: &Connection,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<ConnEnd>, SessionError> {
        let Some(ready) = self.ready.clone() else { return Ok(None) };
        let msg = match &ready {
            Ready::Update(u) => ClientMessage::Update(u.as_ref().clone()),
            Ready::Eval(r) => ClientMessage::EvalReport(*r),
        };
        // An update is answered once its round commits: by the round's deadline, plus the commit.
        let wait = match (&ready, self.train_deadline) {
            (Ready::Update(u), Some((task, at))) if task == u.task_id => {
                at.saturating_duration_since(Instant::now()) + ANSWER_TIMEOUT
            }
            _ => ANSWER_TIMEOUT,
        };
        if let Ready::Update(u) = &ready {
            tracing::info!(round = %u.round, task = %u.task_id, bytes = u.delta.wire_len(), "uploading the update");
        }
        let answer = tokio::select! {
            a = conn.exchange_within(&msg, wait) => a,
            _ = stop.changed() => {
                tracing::info!("stopping: the upload in flight is abandoned (it will be redone if the server asks)");
                conn.close(close::NORMAL, "client stopping");
                return Ok(Some(ConnEnd::Stopped));
            }
        };
        match answer {
            Ok(answer @ (ServerMessage::Ack(_) | ServerMessage::Reject(_))) => {
                self.answered(answer).await?;
                Ok(None)
            }
            Ok(other) => {
                tracing::warn!("unexpected answer to an upload: {other:?}");
                Ok(None)
            }
            Err(e) => match end_of(conn, e) {
                Ok(end) => Ok(Some(end)),
                Err(e) => Err(e),
            },
        }
    }

    /// The server's answer to the waiting result: an ack (the update is in a committed round:
    /// its residual is saved) or a refusal (the result is dropped, the residual kept). An answer
    /// for another task changes nothing.
    async fn answered(&mut self, answer: ServerMessage) -> Result<(), SessionError> {
        let Some(ready) = self.ready.clone() else { return Ok(()) };
        match answer {
            ServerMessage::Ack(a) if a.task_id == ready.task_id() => {
                self.ready = None;
                if let Ready::Update(u) = ready {
                    self.with_local(move |local| local.on_ack(a.task_id)).await?;
                    tracing::info!(round = %a.round, task = %a.task_id, bytes = u.delta.wire_len(), "update committed");
                } else {
                    tracing::info!(round = %a.round, "evaluation accepted");
                }
            }
            ServerMessage::Reject(r) if r.task_id.is_none_or(|t| t == ready.task_id()) => {
                self.ready = None;
                let level_late =
                    matches!(r.reason, RejectReason::Late | RejectReason::Duplicate | RejectReason::NotCommitted);
                if level_late {
                    tracing::info!("result for task {} refused ({:?}): {}", ready.task_id(), r.reason, r.detail);
                } else {
                    tracing::warn!("result for task {} refused ({:?}): {}", ready.task_id(), r.reason, r.detail);
                }
                if let Ready::Update(u) = ready {
                    self.with_local(move |local| local.on_reject(Some(u.task_id))).await?;
                }
            }
            other => tracing::debug!("an answer for another task: {other:?}"),
        }
        Ok(())
    }
}

impl Daemon {
    /// Runs `f` on the local state on a blocking thread (it may write the state folder); a
    /// failure stops the daemon.
    async fn with_local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LocalWork) -> Result<T, LocalError> + Send + 'static,
    ) -> Result<T, SessionError> {
        let local = self.local.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut local = local.lock().map_err(|_| DaemonError::Job("local state poisoned".into()))?;
            f(&mut local).map_err(DaemonError::from)
        })
        .await
        .map_err(|e| SessionError::Fatal(DaemonError::Job(e.to_string())))?;
        done.map_err(SessionError::Fatal)
    }
}

fn fatal_poison() -> SessionError {
    SessionError::Fatal(DaemonError::Job("local state poisoned".into()))
}

/// What a failed exchange on `conn` means for the daemon.
fn classify(conn: &Connection, e: LinkError) -> SessionError {
    classify_close(conn.quic().close_reason().as_ref(), e)
}

/// [`classify`] from the connection's close reason alone (none: still open): the server's
/// `REVOKED`/`NO_IDENTITY` close, or a TLS alert that refused a certificate (ours, sent by the
/// server; or the server's, refused here), stops the daemon; anything else is retried. Decided
/// from the QUIC error's codes (a TLS alert travels as transport error `0x100 + alert`), never
/// from its text.
fn classify_close(reason: Option<&quinn::ConnectionError>, e: LinkError) -> SessionError {
    use fedpool_transport::tls::{is_certificate_alert, tls_alert};
    let refused =
        |reason: &str, detail: String| SessionError::Fatal(DaemonError::Refused { reason: reason.into(), detail });
    match reason {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            let code = c.error_code.into_inner();
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            if code == u64::from(close::REVOKED) || code == u64::from(close::NO_IDENTITY) {
                refused("certificate", reason)
            } else {
                SessionError::Retry(format!("closed by the server (code {code}): {reason}"))
            }
        }
        Some(quinn::ConnectionError::ConnectionClosed(c)) => match tls_alert(c.error_code) {
            Some(alert) if is_certificate_alert(alert) => {
                refused("TLS", format!("the server refused this client's certificate (TLS alert {alert:?}): {c}"))
            }
            _ => SessionError::Retry(e.to_string()),
        },
        Some(quinn::ConnectionError::TransportError(t)) => match tls_alert(t.code) {
            Some(alert) if is_certificate_alert(alert) => {
                refused("TLS", format!("the server's certificate is not acceptable (TLS alert {alert:?}): {t}"))
            }
            _ => SessionError::Retry(e.to_string()),
        },
        _ => SessionError::Retry(e.to_string()),
    }
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    fn closed_by_peer(code: quinn::TransportErrorCode) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: Default::default(),
        })
    }

    fn lost() -> LinkError {
        LinkError::Stream("the exchange failed".into())
    }

    #[test]
    fn a_certificate_alert_from_the_server_stops_the_daemon() {
        // certificate_revoked (44), bad_certificate (42), unknown_ca (48), certificate_required (116).
        for alert in [44u8, 42, 48, 116] {
            let closed = closed_by_peer(quinn::TransportErrorCode::crypto(alert));
            match classify_close(Some(&closed), lost()) {
                SessionError::Fatal(DaemonError::Refused { reason, detail }) => {
                    assert_eq!(reason, "TLS", "alert {alert}");
                    assert!(detail.contains("refused this client's certificate"), "alert {alert}: {detail}");
                }
                SessionError::Fatal(other) => panic!("alert {alert}: {other}"),
                SessionError::Retry(why) => panic!("alert {alert} was retried: {why}"),
            }
        }
    }

    #[test]
    fn a_handshake_failure_that_is_not_about_a_certificate_is_retried() {
        // handshake_failure (40), internal_error (80), and a plain transport error.
        for code in [
            quinn::TransportErrorCode::crypto(40),
            quinn::TransportErrorCode::crypto(80),
            quinn::TransportErrorCode::PROTOCOL_VIOLATION,
        ] {
            let closed = closed_by_peer(code);
            assert!(matches!(classify_close(Some(&closed), lost()), SessionError::Retry(_)), "{code:?}");
        }
        assert!(matches!(classify_close(Some(&quinn::ConnectionError::TimedOut), lost()), SessionError::Retry(_)));
        assert!(matches!(classify_close(None, lost()), SessionError::Retry(_)));
    }

    #[test]
    fn the_servers_revoked_close_stops_the_daemon_and_a_shutdown_is_retried() {
        let app = |code: u32| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: quinn::VarInt::from_u32(code),
                reason: Default::default(),
            })
        };
        assert!(matches!(
            classify_close(Some(&app(close::REVOKED)), lost()),
            SessionError::Fatal(DaemonError::Refused { .. })
        ));
        assert!(matches!(classify_close(Some(&app(close::SHUTDOWN)), lost()), SessionError::Retry(_)));
    }
}

/// The end of a serving connection: finished, refused for good, or lost (reconnect).
fn end_of(conn: &Connection, e: LinkError) -> Result<ConnEnd, SessionError> {
    if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.quic().close_reason() {
        if c.error_code.into_inner() == u64::from(close::FINISHED) {
            tracing::info!("the federation has finished");
            return Ok(ConnEnd::Finished);
        }
    }
    match classify(conn, e) {
        SessionError::Fatal(f) => Err(SessionError::Fatal(f)),
        SessionError::Retry(why) => Ok(ConnEnd::Lost(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for failures in 0..30 {
            let want = (100u64 << failures.min(16)).min(2000) as f64;
            for _ in 0..50 {
                let got = backoff(i, m, failures).as_secs_f64() * 1000.0;
                assert!(got >= 0.5 * want - 1e-6 && got < 1.5 * want + 1e-6, "failures {failures}: {got} vs {want}");
            }
        }
        let draws: std::collections::BTreeSet<u128> = (0..20).map(|_| backoff(i, m, 3).as_micros()).collect();
        assert!(draws.len() > 10, "jittered: {draws:?}");
    }
}
