//! The engine task: owns the round [`Engine`] and the checkpoint [`Store`], feeds the engine the
//! clients' messages and ticks, and carries out its actions in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_common::Round;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{close, NetError, Outcome, ToConn, ToEngine};
use crate::metrics::Metrics;
use crate::round::{Action, ClientId, Commit, Engine, EvalRecord, Event, RoundRecord, Time};
use crate::store::Store;

/// A registered connection: its id and outbox.
struct Link {
    conn: u64,
    tx: mpsc::UnboundedSender<ToConn>,
}

/// The engine task's state.
pub(crate) struct Driver {
    engine: Engine,
    store: Option<Store>,
    links: HashMap<String, Link>,
    epoch: Instant,
    metrics: Arc<Metrics>,
    committed: watch::Sender<Round>,
}

impl Driver {
    pub(crate) fn new(engine: Engine, store: Store, metrics: Arc<Metrics>, committed: watch::Sender<Round>) -> Self {
        metrics.set_round(engine.round().0);
        metrics.set_committed_round(committed.borrow().0);
        Self { engine, store: Some(store), links: HashMap::new(), epoch: Instant::now(), metrics, committed }
    }

    fn now(&self) -> Time {
        Time(self.epoch.elapsed())
    }

    /// Runs until the engine finishes, a shutdown is requested (or its sender dropped), or a
    /// commit fails.
    pub(crate) async fn run(
        mut self,
        mut from_conns: mpsc::Receiver<ToEngine>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Outcome, NetError> {
        let first = self.engine.handle(self.now(), Event::Tick);
        if let Some(outcome) = self.execute(first).await? {
            return Ok(outcome);
        }
        loop {
            let wake = self.engine.next_wakeup().map(|t| self.epoch + t.0);
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let actions = tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        info!("shutting down in round {}", self.engine.round());
                        self.close_all(close::SHUTDOWN, "server shutting down");
                        return Ok(Outcome::ShutDown(self.engine.round()));
                    }
                    continue;
                }
                msg = from_conns.recv() => match msg {
                    Some(m) => self.on_message(m),
                    // Cannot happen while the accept loop holds a sender; treat as a shutdown.
                    None => return Ok(Outcome::ShutDown(self.engine.round())),
                },
                _ = sleep => self.engine.handle(self.now(), Event::Tick),
            };
            if let Some(outcome) = self.execute(actions).await? {
                return Ok(outcome);
            }
        }
    }

    fn on_message(&mut self, msg: ToEngine) -> Vec<Action> {
        match msg {
            ToEngine::Connected { client, conn, tx } => {
                if let Some(old) = self.links.insert(client.clone(), Link { conn, tx }) {
                    info!("client {client:?}: connection {conn} replaces connection {}", old.conn);
                    let _ = old.tx.send(ToConn::Close {
                        code: close::REPLACED,
                        reason: "replaced by a newer connection of the same client".into(),
                    });
                }
                self.metrics.set_connected(self.links.len() as u64);
                Vec::new()
            }
            ToEngine::Message { client, conn, msg, wire_bytes, seconds } => {
                if self.links.get(&client).map(|l| l.conn) != Some(conn) {
                    debug!("client {client:?}: ignoring a message from replaced connection {conn}");
                    return Vec::new();
                }
                let id = ClientId(client);
                let mut actions = Vec::new();
                let event = match msg {
                    ClientMessage::Enroll(enroll) => Event::Enroll { client: id, enroll },
                    ClientMessage::Update(update) => {
                        let timed = Event::Throughput { client: id.clone(), bytes: wire_bytes, seconds };
                        actions = self.engine.handle(self.now(), timed);
                        Event::Update { client: id, update, wire_bytes }
                    }
                    ClientMessage::Heartbeat(_) => Event::Heartbeat { client: id },
                    ClientMessage::EvalReport(report) => Event::EvalReport { client: id, report, wire_bytes },
                };
                actions.extend(self.engine.handle(self.now(), event));
                actions
            }
            ToEngine::Disconnected { client, conn } => {
                if self.links.get(&client).map(|l| l.conn) != Some(conn) {
                    return Vec::new(); // an old connection, already replaced or dropped
                }
                self.links.remove(&client);
                self.metrics.set_connected(self.links.len() as u64);
                self.engine.handle(self.now(), Event::Lost { client: ClientId(client) })
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
    }

    /// Carries out actions in order; a commit is on disk before the next action runs.
    async fn execute(&mut self, actions: Vec<Action>) -> Result<Option<Outcome>, NetError> {
        let mut outcome = None;
        for action in actions {
            match action {
                Action::Welcome { client, welcome } => self.send_to(&client, ServerMessage::Welcome(welcome)),
                Action::SendTask { client, task } => self.send_to(&client, ServerMessage::Task(task)),
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
        self.metrics.set_round(self.engine.round().0);
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
                    Ok(()) => info!("{}", eval_line(round, &eval)),
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
