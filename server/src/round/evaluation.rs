//! The federated evaluation that follows a commit: every connected client gets an [`EvalTask`]
//! with the new global pool, reports its held-out metrics (checked for range), and once every
//! asked client reported or the deadline passed the example-weighted means go to the round log
//! ([`Action::RecordEval`]). No round starts meanwhile.

use std::collections::{BTreeMap, BTreeSet};

use fedpool_common::frame::{self, HEADER_LEN};
use fedpool_common::wire::{Ack, EvalReport, EvalTask, Reject, RejectReason};
use fedpool_common::{Round, TaskId};

use super::{Action, ClientId, Engine, EvalRecord, Phase, Time};

/// A running federated evaluation of the newest committed round.
#[derive(Debug)]
pub(super) struct Evaluation {
    pub(super) round: Round,
    started_at: Time,
    pub(super) deadline_at: Time,
    tasks: BTreeMap<ClientId, TaskId>,
    /// Asked clients that have not reported yet.
    pub(super) pending: BTreeSet<ClientId>,
    reported: Vec<String>,
    examples: u64,
    accuracy_sum: f64,
    f1_sum: f64,
    loss_sum: f64,
    bytes_down: u64,
    bytes_up: u64,
}

impl Evaluation {
    /// True once every asked client reported or the deadline passed.
    pub(super) fn is_due(&self, now: Time) -> bool {
        self.pending.is_empty() || now >= self.deadline_at
    }
}

impl Engine {
    /// Sends every connected client an evaluation task for the global pool of the newest commit.
    /// The encoding is kept for the next round's tasks, which carry the same pool. The engine is
    /// then in [`Phase::Evaluating`], or [`Phase::Failed`] if the pool cannot be encoded.
    pub(super) fn start_evaluation(&mut self, now: Time, out: &mut Vec<Action>) {
        let Some(deadline) = self.config.eval_deadline else { return };
        let round = self.committed;
        if let Err(e) = self.encode_for_next_round() {
            tracing::error!(error = %e, "cannot start the evaluation");
            self.fail(e, out);
            return;
        }
        let mut tasks = BTreeMap::new();
        for (client, _) in self.clients.iter().filter(|(_, c)| c.connected) {
            tasks.insert(client.clone(), TaskId(self.next_task));
            self.next_task = self.next_task.wrapping_add(1);
        }
        tracing::info!(%round, clients = tasks.len(), "federated evaluation started");
        let pending: BTreeSet<ClientId> = tasks.keys().cloned().collect();
        self.phase = Phase::Evaluating(Evaluation {
            round,
            started_at: now,
            deadline_at: now + deadline,
            tasks,
            pending: pending.clone(),
            reported: Vec::new(),
            examples: 0,
            accuracy_sum: 0.0,
            f1_sum: 0.0,
            loss_sum: 0.0,
            bytes_down: 0,
            bytes_up: 0,
        });
        for client in pending {
            self.send_eval(now, client, out);
        }
    }

    /// Sends (or re-sends) `client`'s evaluation task with the time left until its deadline.
    pub(super) fn send_eval(&mut self, now: Time, client: ClientId, out: &mut Vec<Action>) {
        let (Phase::Evaluating(e), Some((_, global))) = (&mut self.phase, &self.encoded) else { return };
        let Some(&task_id) = e.tasks.get(&client) else { return };
        let left = e.deadline_at.since(now);
        let task = Box::new(EvalTask {
            round: e.round,
            task_id,
            global: global.clone(),
            deadline_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        });
        let size = frame::encoded_len(task.as_ref()).map(|n| (n + HEADER_LEN) as u64).unwrap_or(0);
        e.bytes_down = e.bytes_down.saturating_add(size);
        out.push(Action::SendEval { client, task });
    }

    pub(super) fn on_eval_report(
        &mut self,
        now: Time,
        client: ClientId,
        report: EvalReport,
        wire_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        if let Some(c) = self.clients.get_mut(&client) {
            if c.connected {
                c.last_heard = now;
            }
        }
        // A report weighs what the coordinator allows (the same cap as the client's updates).
        let weight = self.config.trust.eval_weight(&client.0, report.metrics.examples);
        let refusal = match &mut self.phase {
            Phase::Evaluating(e) => {
                e.bytes_up = e.bytes_up.saturating_add(wire_bytes);
                if report.round != e.round {
                    Some((
                        RejectReason::WrongRound,
                        format!("evaluation of round {}, the open one is round {}", report.round, e.round),
                    ))
                } else if e.tasks.get(&client) != Some(&report.task_id) {
                    Some((
                        RejectReason::UnknownTask,
                        format!("evaluation task {} was not given to this client", report.task_id),
                    ))
                } else if !e.pending.contains(&client) {
                    Some((RejectReason::Duplicate, format!("evaluation task {} already reported", report.task_id)))
                } else if let Err(invalid) = report.metrics.validate() {
                    Some((invalid.reason, invalid.detail))
                } else {
                    let m = report.metrics;
                    let w = weight as f64;
                    e.pending.remove(&client);
                    e.reported.push(client.0.clone());
                    e.examples = e.examples.saturating_add(weight);
                    e.accuracy_sum += w * f64::from(m.accuracy);
                    e.f1_sum += w * f64::from(m.macro_f1);
                    e.loss_sum += w * f64::from(m.loss);
                    None
                }
            }
            _ => Some((RejectReason::Late, format!("no evaluation is open (report for round {})", report.round))),
        };
        match refusal {
            None => out.push(Action::Ack { client, ack: Ack { round: report.round, task_id: report.task_id } }),
            Some((reason, detail)) => {
                tracing::info!(%client, round = %report.round, ?reason, %detail, "evaluation report refused");
                out.push(Action::Reject {
                    client,
                    reject: Reject { round: Some(report.round), task_id: Some(report.task_id), reason, detail },
                });
            }
        }
    }

    /// Ends evaluation `e` with [`Action::RecordEval`]; the engine then waits for the next round,
    /// or has finished after the last one.
    pub(super) fn finish_evaluation(&mut self, now: Time, e: Evaluation, out: &mut Vec<Action>) {
        let w = e.examples as f64;
        let mean = |sum: f64| if e.examples > 0 { Some(sum / w) } else { None };
        let mut clients = e.reported.clone();
        clients.sort();
        let eval = EvalRecord {
            accuracy: mean(e.accuracy_sum),
            macro_f1: mean(e.f1_sum),
            loss: mean(e.loss_sum),
            examples: e.examples,
            clients,
            missing: e.pending.iter().map(|c| c.0.clone()).collect(),
            bytes_down: e.bytes_down,
            bytes_up: e.bytes_up,
            seconds: now.since(e.started_at).as_secs_f64(),
        };
        tracing::info!(
            round = %e.round,
            accuracy = eval.accuracy,
            macro_f1 = eval.macro_f1,
            examples = eval.examples,
            missing = eval.missing.len(),
            "federated evaluation finished"
        );
        out.push(Action::RecordEval { round: e.round, eval });
        self.phase = if self.committed.0 >= self.config.total_rounds {
            tracing::info!(rounds = self.committed.0, "training finished");
            Phase::Finished { announced: false }
        } else {
            Phase::WaitingToTrain { account: None }
        };
    }
}
