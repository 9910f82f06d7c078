//! The engine task: owns the round [`Engine`] and the checkpoint [`Store`], feeds the engine the
//! clients' messages and ticks, and carries out its actions in order. Where it updates [`Metrics`]
//! it also updates the status page's [`Status`] (each a short lock, no I/O).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_common::Round;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{close, NetError, Outcome, ToConn, ToEngine, UploadPermit};
use crate::metrics::Metrics;
use crate::round::{Action, ClientId, Commit, Engine, EvalRecord, Event, RoundRecord, Time};
use crate::status::Status;
use crate::store::Store;

/// A registered connection: its id and outbox.
struct Link {
    conn: u64,
    tx: mpsc::UnboundedSender<ToConn>,
}

/// The engine task's state.
pub(crate) struct Driver {
    /// The engine; `None` only while it works on the blocking pool (`feed` awaits it) or after
    /// that work panicked (the driver then stops).
    engine: Option<Engine>,
    store: Option<Store>,
    links: HashMap<String, Link>,
    epoch: Instant,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    committed: watch::Sender<Round>,
}

impl Driver {
    pub(crate) fn new(
        engine: Engine,
        store: Store,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
        committed: watch::Sender<Round>,
    ) -> Self {
        metrics.set_round(engine.round().0);
        metrics.set_committed_round(committed.borrow().0);
        status.engine(&engine);
        Self {
            engine: Some(engine),
            store: Some(store),
            links: HashMap::new(),
            epoch: Instant::now(),
            metrics,
            status,
            committed,
        }
    }

    fn now(&self) -> Time {
        Time(self.epoch.elapsed())
    }

    /// `at` on the engine's clock.
    fn time_of(&self, at: Instant) -> Time {
        Time(at.saturating_duration_since(self.epoch))
    }

    /// The engine's newest committed round.
    fn round(&self) -> Round {
        self.engine.as_ref().map_or(*self.committed.borrow(), Engine::round)
    }

    /// Feeds `events` to the engine, each at its time, on the blocking pool: decoding an update,
    /// folding it and a round's merge may take seconds, and the async workers that serve the
    /// connections (heartbeat answers, uploads arriving) must never wait for them. Messages that
    /// arrive meanwhile queue up and are judged at the time they arrived, so a busy engine never
    /// drops a live client as idle.
    async fn feed(&mut self, events: Vec<(Time, Event)>) -> Result<Vec<Action>, NetError> {
        let Some(mut engine) = self.engine.take() else { return Ok(Vec::new()) };
        let (engine, actions) = tokio::task::spawn_blocking(move || {
            let mut actions = Vec::new();
            for (at, event) in events {
                actions.extend(engine.handle(at, event));
            }
            (engine, actions)
        })
        .await?;
        self.engine = Some(engine);
        Ok(actions)
    }

    /// Runs until the engine finishes, a shutdown is requested (or its sender dropped), or a
    /// commit fails.
    pub(crate) async fn run(
        mut self,
        mut from_conns: mpsc::Receiver<ToEngine>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Outcome, NetError> {
        let first = self.feed(vec![(self.now(), Event::Tick)]).await?;
        if let Some(outcome) = self.execute(first).await? {
            return Ok(outcome);
        }
        loop {
            let wake = self.engine.as_ref().and_then(Engine::next_wakeup).map(|t| self.epoch + t.0);
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Messages before the timer: one that waited while the engine was busy is judged at
            // its arrival before a tick runs the idle timeouts at the current time. An upload's
            // share of the upload budget is held until the engine has handled it (below).
            let mut permit: Option<UploadPermit> = None;
            let events = tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        info!("shutting down in round {}", self.round());
                        self.close_all(close::SHUTDOWN, "server shutting down");
                        return Ok(Outcome::ShutDown(self.round()));
                    }
                    continue;
                }
                msg = from_conns.recv() => match msg {
                    Some(mut m) => {
                        if let ToEngine::Message { permit: p, .. } = &mut m {
                            permit = p.take();
                        }
                        self.on_message(m)
                    }
                    // Cannot happen while the accept loop holds a sender; treat as a shutdown.
                    None => return Ok(Outcome::ShutDown(self.round())),
                },
                _ = sleep => vec![(self.now(), Event::Tick)],
            };
            if events.is_empty() {
                continue;
            }
            let actions = self.feed(events).await?;
            // Handled (decoded, checked, folded): its bytes go back to the budget.
            drop(permit);
            if let Some(outcome) = self.execute(actions).await? {
                return Ok(outcome);
            }
        }
    }

    /// The engine events a connection's message stands for, each with the time to judge it at.
    fn on_message(&mut self, msg: ToEngine) -> Vec<(Time, Event)> {
        match msg {
            ToEngine::Connected { client, conn, tx } => {
                let replaced = self.links.insert(client.clone(), Link { conn, tx });
                self.metrics.set_connected(self.links.len() as u64);
                self.status.connected(&client, Instant::now());
                match replaced {
                    Some(old) => {
                        info!("client {client:?}: connection {conn} replaces connection {}", old.conn);
                        let _ = old.tx.send(ToConn::Close {
                            code: close::REPLACED,
                            reason: "replaced by a newer connection of the same client".into(),
                        });
                        // The old connection is gone for the engine too: the new one enrolls afresh
                        // (a second Enroll on a live connection is a protocol error).
                        vec![(self.now(), Event::Lost { client: ClientId(client) })]
                    }
                    None => Vec::new(),
                }
            }
            ToEngine::Message { client, conn, msg, wire_bytes, seconds, received, permit: _ } => {
                if self.links.get(&client).map(|l| l.conn) != Some(conn) {
                    debug!("client {client:?}: ignoring a message from replaced connection {conn}");
                    return Vec::new();
                }
                self.status.heard(&client, received);
                let id = ClientId(client);
                let at = self.time_of(received);
                let mut events = Vec::new();
                let event = match msg {
                    ClientMessage::Enroll(enroll) => {
                        self.status.software(&id.0, &enroll.software);
                        Event::Enroll { client: id, enroll }
                    }
                    ClientMessage::Update(update) => {
                        events.push((at, Event::Throughput { client: id.clone(), bytes: wire_bytes, seconds }));
                        Event::Update { client: id, update, wire_bytes }
                    }
                    ClientMessage::Heartbeat(_) => Event::Heartbeat { client: id },
                    ClientMessage::EvalReport(report) => Event::EvalReport { client: id, report, wire_bytes },
                };
                events.push((at, event));
                events
            }
            ToEngine::Disconnected { client, conn } => {
                if self.links.get(&client).map(|l| l.conn) != Some(conn) {
                    return Vec::new(); // an old connection, already replaced or dropped
                }
                self.links.remove(&client);
                self.metrics.set_connected(self.links.len() as u64);
                self.status.disconnected(&client);
                vec![(self.now(), Event::Lost { client: ClientId(client) })]
            }
        }
    }

    fn send_to(&self, client: &ClientId, msg: ServerMessage) {
        match self.links.get(&client.0) {
            Some(link) => {
                if link.tx.send(ToConn::Send(msg)).is_err() {
                    debug!("client {:?}: connection task gone, message dropped", client.0);
                }
            }
            None => debug!("client {:?} is not connected; message dropped", client.0),
        }
    }

    fn close_all(&mut self, code: u32, reason: &str) {
        for (_, link) in self.links.drain() {
            let _ = link.tx.send(ToConn::Close { code, reason: reason.to_string() });
        }
        self.metrics.set_connected(0);
        self.status.all_disconnected();
    }

    /// Carries out actions in order; a commit is on disk before the next action runs.
    async fn execute(&mut self, actions: Vec<Action>) -> Result<Option<Outcome>, NetError> {
        let mut outcome = None;
        for action in actions {
            match action {
                Action::Welcome { client, welcome } => {
                    self.status.enrolled(&client.0);
                    self.send_to(&client, ServerMessage::Welcome(welcome));
                }
                Action::SendTask { client, task } => {
                    if !task.rank_budget.is_empty() {
                        let planner = self.engine.as_ref().and_then(Engine::rank_planner);
                        let upload = planner.and_then(|p| p.bandwidth().estimate(&client.0).upload_bps);
                        self.status.granted(&client.0, task.round, &task.rank_budget, upload);
                    }
                    self.send_to(&client, ServerMessage::Task(task));
                }
                Action::SendEval { client, task } => self.send_to(&client, ServerMessage::EvalTask(task)),
                Action::RecordEval { round, eval } => self.record_eval(round, eval).await,
                Action::Ack { client, ack } => self.send_to(&client, ServerMessage::Ack(ack)),
                Action::Reject { client, reject } => {
                    info!("client {:?}: rejected ({:?}): {}", client.0, reject.reason, reject.detail);
                    self.metrics.count_reject(reject.reason);
                    self.send_to(&client, ServerMessage::Reject(reject));
                }
                Action::Drop { client, reason } => {
                    warn!("client {:?} dropped: {reason}", client.0);
                    if let Some(link) = self.links.remove(&client.0) {
                        let _ = link.tx.send(ToConn::Close { code: close::DROPPED, reason });
                    }
                    self.metrics.set_connected(self.links.len() as u64);
                    self.status.disconnected(&client.0);
                }
                Action::Commit(commit) => self.commit(commit).await?,
                Action::Fatal(e) => {
                    error!("the round engine cannot go on, stopping: {e}");
                    self.close_all(close::INTERNAL, "the server failed");
                    return Err(NetError::Engine(e));
                }
                Action::Finished => {
                    let round = *self.committed.borrow();
                    info!("federation finished: {round} rounds committed");
                    self.close_all(close::FINISHED, "the federation has finished");
                    outcome = Some(Outcome::Finished(round));
                }
            }
        }
        if let Some(engine) = &self.engine {
            self.metrics.set_round(engine.round().0);
            self.metrics.set_quarantined(engine.quarantined().len() as u64);
            self.status.engine(engine);
        }
        Ok(outcome)
    }

    /// Writes a commit to the store (off the async threads) and publishes the round.
    async fn commit(&mut self, commit: Box<Commit>) -> Result<(), NetError> {
        let round = commit.round;
        let Some(mut store) = self.store.take() else {
            return Err(NetError::Commit { round, problem: "the store is gone after an earlier failure".into() });
        };
        let started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let r = store.commit(&commit);
            (store, commit, r)
        })
        .await;
        let (store, commit, result) = match joined {
            Ok(x) => x,
            Err(e) => {
                let problem = format!("the commit task failed: {e}");
                error!("round {round}: {problem}");
                self.close_all(close::INTERNAL, "the server cannot commit rounds");
                return Err(NetError::Commit { round, problem });
            }
        };
        self.store = Some(store);
        match result {
            Ok(path) => {
                info!("{} -> {} ({:.0?})", status_line(&commit.record), path.display(), started.elapsed());
                self.metrics.set_committed_round(round.0);
                self.status.committed(&commit.record);
                let _ = self.committed.send(round);
                Ok(())
            }
            Err(e) => {
                error!("round {round}: commit failed, stopping: {e}");
                self.close_all(close::INTERNAL, "the server cannot commit rounds");
                Err(NetError::Commit { round, problem: e.to_string() })
            }
        }
    }
}

impl Driver {
    /// Adds a round's federated evaluation to its log line (off the async threads). A failure is
    /// logged and the federation goes on: the checkpoint, which is what must not be lost, is
    /// already on disk.
    async fn record_eval(&mut self, round: Round, eval: EvalRecord) {
        let Some(mut store) = self.store.take() else { return };
        let joined = tokio::task::spawn_blocking(move || {
            let r = store.record_eval(round, &eval);
            (store, eval, r)
        })
        .await;
        match joined {
            Ok((store, eval, result)) => {
                self.store = Some(store);
                match result {
                    Ok(()) => {
                        info!("{}", eval_line(round, &eval));
                        self.status.evaluated(round, &eval);
                    }
                    Err(e) => warn!("round {round}: could not log its evaluation: {e}"),
                }
            }
            Err(e) => error!("round {round}: the evaluation log task failed: {e}"),
        }
    }
}

/// One line per federated evaluation for the operator's log.
fn eval_line(round: Round, e: &EvalRecord) -> String {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
    let mut s = format!(
        "round {round} evaluated by {} clients on {} held-out examples: accuracy {}, macro-F1 {}, loss {}",
        e.clients.len(),
        e.examples,
        pct(e.accuracy),
        pct(e.macro_f1),
        e.loss.map_or("-".to_string(), |v| format!("{v:.4}")),
    );
    if !e.missing.is_empty() {
        s.push_str(&format!(", no report from {}", e.missing.join(",")));
    }
    s
}

/// One line per committed round for the operator's log.
fn status_line(r: &RoundRecord) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let loss = r.train_loss.map_or("-".to_string(), |v| format!("{v:.4}"));
    let accuracy = r.train_accuracy.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    let mut s = format!(
        "round {} committed (attempt {}): {} clients, {} examples, train loss {loss}, train accuracy {accuracy}, \
         up {:.2} MB, down {:.2} MB, {:.1} s",
        r.round,
        r.attempt,
        r.clients.len(),
        r.examples,
        mb(r.bytes_up),
        mb(r.bytes_down),
        (r.committed_at_secs - r.started_at_secs).max(0.0),
    );
    if !r.stragglers.is_empty() {
        s.push_str(&format!(", stragglers {}", r.stragglers.join(",")));
    }
    if !r.rejected.is_empty() {
        let rejected: Vec<String> = r.rejected.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!(", rejected {}", rejected.join(",")));
    }
    s
}
