//! The training attempt of a round: sampling the clients, their rank grants and tasks, the checks
//! an update passes before it is folded, and the commit (or the abandon that leads to a retry).

use std::collections::BTreeMap;
use std::sync::Arc;

use fedpool_common::codec::{self, EncodedDelta};
use fedpool_common::frame::{self, HEADER_LEN};
use fedpool_common::wire::{Ack, ExpectedTask, Reject, RejectReason, RoundTask, TargetBudget, Update};
use fedpool_common::{Nonce, PoolDelta, Round, TaskId};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{mix, Action, ClientId, Commit, Engine, EngineConfig, EngineError, Phase, RoundRecord, Time};
use crate::aggregate::truncate_lora;
use crate::ranks::Plan;

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskState {
    Open,
    Accepted,
    Rejected,
}

/// A task handed out.
#[derive(Debug, Clone)]
pub(super) struct TaskInfo {
    pub(super) round: Round,
    pub(super) client: ClientId,
    pub(super) nonce: Nonce,
    pub(super) state: TaskState,
    /// The LoRA ranks granted (rank budgets), if any.
    pub(super) ranks: Option<BTreeMap<String, usize>>,
}

/// The running totals of one round, kept across its attempts.
#[derive(Debug, Clone)]
pub(super) struct RoundAccount {
    /// Attempts started for the round so far (≥ 1: an account opens with the first attempt).
    pub(super) attempts: u32,
    pub(super) started_at: Time,
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    pub(super) rejected: BTreeMap<String, u64>,
}

/// The running attempt of a round.
#[derive(Debug)]
pub(super) struct Attempt {
    pub(super) number: u32,
    pub(super) deadline_at: Time,
    /// The attempt's tasks by client (each selected client has one).
    pub(super) by_client: BTreeMap<ClientId, TaskId>,
    accepted: Vec<String>,
    /// The acknowledgements owed to the accepted updates: sent only after the round's commit is
    /// on disk (or turned into `NotCommitted` refusals if the attempt ends without one).
    acks: Vec<(ClientId, Ack)>,
    /// The L2 norms of the accepted updates (before any scaling): the next round's norm reference.
    norms: Vec<f64>,
    answered: usize,
    /// Σ of the accepted updates' weights (the coordinator's, not the clients' claims).
    examples: u64,
    loss_sum: f64,
    accuracy_sum: f64,
}

/// How an attempt that is due ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    /// Enough updates are in: the round commits.
    Commit,
    /// The deadline passed, or every selected client answered, below the quorum: a new attempt.
    Abandon,
}

impl Attempt {
    /// Whether the attempt ends at `now`, and how: it commits once `quorum` updates are in and
    /// every selected client answered, `clients_per_round` updates are in or the deadline passed;
    /// it is abandoned when the deadline passed or every selected client answered below quorum.
    pub(super) fn close(&self, now: Time, c: &EngineConfig) -> Option<Close> {
        let received = self.accepted.len();
        let all_answered = self.answered >= self.by_client.len();
        let deadline_passed = now >= self.deadline_at;
        if received >= c.quorum && (all_answered || received >= c.clients_per_round || deadline_passed) {
            Some(Close::Commit)
        } else if deadline_passed || all_answered {
            Some(Close::Abandon)
        } else {
            None
        }
    }
}

fn reject_key(reason: RejectReason) -> String {
    format!("{reason:?}")
}

/// Tells the senders of updates that were folded but will not be committed (their attempt ended
/// without a commit) that their work is in no round: they keep their residuals.
fn not_committed(acks: Vec<(ClientId, Ack)>, detail: &str, out: &mut Vec<Action>) {
    for (client, ack) in acks {
        out.push(Action::Reject {
            client,
            reject: Reject {
                round: Some(ack.round),
                task_id: Some(ack.task_id),
                reason: RejectReason::NotCommitted,
                detail: detail.to_string(),
            },
        });
    }
}

impl Engine {
    /// Starts the next attempt of round `committed + 1`, continuing `account` (the round's totals,
    /// `None` before its first attempt): samples the clients, plans their ranks and sends each a
    /// task with a fresh nonce. The engine is then in [`Phase::Training`], or [`Phase::Failed`]
    /// if the global pool cannot be encoded or the merge cannot begin.
    pub(super) fn start_attempt(&mut self, now: Time, account: Option<RoundAccount>, out: &mut Vec<Action>) {
        let round = self.training_round();
        // Tasks older than the previous round can no longer be told apart usefully: forget them.
        self.tasks.retain(|_, t| t.round.0 + 1 >= round.0);
        if let Err(e) = self.encode_for_next_round() {
            tracing::error!(error = %e, "cannot start a round");
            self.fail(e, out);
            return;
        }
        if let Err(source) = self.merge.begin(&self.global) {
            let e = EngineError::Merge { round, source };
            tracing::error!(error = %e, "the merge cannot begin a round");
            self.fail(e, out);
            return;
        }
        let account = match account {
            Some(acc) => RoundAccount { attempts: acc.attempts + 1, ..acc },
            None => {
                RoundAccount { attempts: 1, started_at: now, bytes_up: 0, bytes_down: 0, rejected: BTreeMap::new() }
            }
        };
        let number = account.attempts;

        // Sample deterministically from the connected clients in identity order.
        let candidates: Vec<ClientId> =
            self.clients.iter().filter(|(_, c)| c.connected).map(|(id, _)| id.clone()).collect();
        let want = self.config.selected_per_round().min(candidates.len());
        let seed = mix(self.config.seed ^ mix(round.0 ^ mix(u64::from(number))));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut picked: Vec<usize> = rand::seq::index::sample(&mut rng, candidates.len(), want).into_vec();
        picked.sort_unstable();
        let mut selected: Vec<ClientId> = picked.into_iter().map(|i| candidates[i].clone()).collect();
        let grants = self.plan_ranks(round, &mut selected);

        let deadline_at = now + self.config.deadline;
        let mut by_client = BTreeMap::new();
        for (client, ranks) in selected.iter().zip(grants) {
            let id = TaskId(self.next_task);
            self.next_task = self.next_task.wrapping_add(1);
            let nonce = self.nonces.next();
            let info = TaskInfo { round, client: client.clone(), nonce, state: TaskState::Open, ranks };
            self.tasks.insert(id, info);
            by_client.insert(client.clone(), id);
        }
        let attempt = Attempt {
            number,
            deadline_at,
            by_client: by_client.clone(),
            accepted: Vec::new(),
            acks: Vec::new(),
            norms: Vec::new(),
            answered: 0,
            examples: 0,
            loss_sum: 0.0,
            accuracy_sum: 0.0,
        };
        self.phase = Phase::Training { account, attempt };
        tracing::info!(
            %round,
            attempt = number,
            selected = selected.len(),
            connected = candidates.len(),
            deadline_secs = self.config.deadline.as_secs_f64(),
            "round started"
        );
        for (client, id) in by_client {
            self.send_task(now, client, id, out);
        }
    }

    /// Ends an attempt that missed its quorum; the round waits for its next attempt. Its accepted
    /// updates are in no commit: their senders are told so (`NotCommitted`) instead of an ack.
    pub(super) fn abandon_attempt(&mut self, now: Time, account: RoundAccount, a: Attempt, out: &mut Vec<Action>) {
        let round = self.training_round();
        let why = if now >= a.deadline_at { "the deadline passed" } else { "every selected client answered" };
        tracing::warn!(
            %round,
            attempt = a.number,
            received = a.accepted.len(),
            quorum = self.config.quorum,
            "round attempt missed its quorum ({why}); retrying with new tasks"
        );
        let detail = format!("attempt {} of round {round} missed its quorum ({why}): nothing was committed", a.number);
        not_committed(a.acks, &detail, out);
        // The attempt's tasks stay known (an update for one is then `Late`) until the round after
        // next starts; `check_update` tells a closed task by its absence from the running attempt.
        self.phase = Phase::WaitingToTrain { account: Some(account) };
    }

    /// Sends (or re-sends) task `task_id` of the running attempt to `client`, with the time left
    /// until the deadline.
    pub(super) fn send_task(&mut self, now: Time, client: ClientId, task_id: TaskId, out: &mut Vec<Action>) {
        let Some(ranks) = self.tasks.get(&task_id).map(|t| t.ranks.clone()) else { return };
        let global = match ranks.as_ref().map(|r| self.truncated_global(r)) {
            Some(Ok(enc)) => Some(enc),
            Some(Err(e)) => {
                tracing::error!(%client, error = %e, "cannot encode the truncated global pool; sending it whole");
                None
            }
            None => None,
        };
        let Phase::Training { account, attempt } = &mut self.phase else { return };
        let (Some(info), Some((_, whole))) = (self.tasks.get(&task_id), &self.encoded) else { return };
        let left = attempt.deadline_at.since(now);
        let rank_budget = ranks
            .iter()
            .flatten()
            .map(|(target, &rank)| TargetBudget { target: target.clone(), rank: rank as u32 })
            .collect();
        let task = Box::new(RoundTask {
            round: info.round,
            task_id,
            nonce: info.nonce,
            global: global.unwrap_or_else(|| whole.clone()),
            rank_budget,
            local_steps: self.config.local_steps,
            deadline_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        });
        let size = frame::encoded_len(task.as_ref()).map(|n| (n + HEADER_LEN) as u64).unwrap_or(0);
        account.bytes_down = account.bytes_down.saturating_add(size);
        out.push(Action::SendTask { client, task });
    }

    /// Asks the rank planner (if any) for each selected client's ranks; clients told to sit out
    /// leave the selection. Without a planner every client trains every triplet (`None`), and so
    /// does every client of a round the planner fails for (its error is logged).
    fn plan_ranks(&mut self, round: Round, selected: &mut Vec<ClientId>) -> Vec<Option<BTreeMap<String, usize>>> {
        let Some(planner) = self.ranks.as_ref() else { return vec![None; selected.len()] };
        let names: Vec<String> = selected.iter().map(|c| c.0.clone()).collect();
        let task_bytes = self.encoded.as_ref().map_or(0, |(_, e)| e.wire_len() as u64);
        let plans = match planner.plan(round, &names, task_bytes) {
            Ok(p) if p.len() == names.len() => p,
            Ok(p) => {
                tracing::error!(
                    %round,
                    plans = p.len(),
                    clients = names.len(),
                    "the rank planner gave a plan per client for another number of clients; every client trains \
                     every triplet this round"
                );
                return vec![None; selected.len()];
            }
            Err(e) => {
                let error: &dyn std::error::Error = &e;
                tracing::error!(%round, error, "the rank planner failed; every client trains every triplet this round");
                return vec![None; selected.len()];
            }
        };
        let mut grants = Vec::with_capacity(selected.len());
        let mut kept = Vec::with_capacity(selected.len());
        for (client, plan) in selected.drain(..).zip(plans) {
            match plan {
                Plan::Train(ranks) => {
                    let per_target: Vec<u32> = ranks.iter().map(|b| b.rank).collect();
                    tracing::info!(%client, %round, ranks = ?per_target, "rank budget");
                    grants.push(Some(ranks.into_iter().map(|b| (b.target, b.rank as usize)).collect()));
                    kept.push(client);
                }
                Plan::SitOut(why) => tracing::info!(%client, %round, "sits this round out: {why}"),
            }
        }
        *selected = kept;
        grants
    }

    /// The current global truncated to `ranks` and encoded with the download codec (once per
    /// distinct rank list and round).
    fn truncated_global(&mut self, ranks: &BTreeMap<String, usize>) -> Result<EncodedDelta, EngineError> {
        let round = self.training_round();
        let key: Vec<usize> = self.spec.targets.iter().map(|t| ranks.get(&t.name).copied().unwrap_or(0)).collect();
        if let Some(e) = self.truncated.get(&key) {
            return Ok(e.clone());
        }
        let delta =
            truncate_lora(&self.global, &self.spec, ranks).map_err(|source| EngineError::Truncate { round, source })?;
        let enc = self.encode_delta(round, &delta)?;
        self.truncated.insert(key, enc.clone());
        Ok(enc)
    }

    /// Encodes the global pool for the tasks of round `committed + 1` (its attempts, and the
    /// evaluation before it, which carries the same pool), unless that is done already.
    pub(super) fn encode_for_next_round(&mut self) -> Result<(), EngineError> {
        let round = self.training_round();
        if self.encoded.as_ref().map(|(r, _)| *r) != Some(round) {
            self.encoded = Some((round, self.encode_global(round)?));
        }
        Ok(())
    }

    /// The global pool as a delta from zero (every slot listed for SSF pools; see the module
    /// documentation), encoded with the download codec.
    fn encode_global(&self, round: Round) -> Result<EncodedDelta, EngineError> {
        let delta = self.global.to_transfer(&self.spec).map_err(|source| EngineError::Transfer { round, source })?;
        self.encode_delta(round, &delta)
    }

    /// `delta` encoded with the download codec, its stochastic rounding seeded by the round.
    fn encode_delta(&self, round: Round, delta: &PoolDelta) -> Result<EncodedDelta, EngineError> {
        codec::encode(delta, &self.config.download_codec, None, mix(self.config.seed ^ round.0))
            .map_err(|e| EngineError::Encode { round, source: Arc::new(e) })
    }

    // ---- updates -----------------------------------------------------------------------------

    pub(super) fn on_update(
        &mut self,
        now: Time,
        client: ClientId,
        update: Update,
        wire_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        if let Some(acc) = self.account_mut() {
            acc.bytes_up = acc.bytes_up.saturating_add(wire_bytes);
        }
        if let Some(why) = self.strikes.quarantined().get(&client.0) {
            let detail = format!("client {client} is quarantined for this run: {why}");
            self.refuse(client, &update, RejectReason::Quarantined, detail, out);
            return;
        }
        match self.clients.get_mut(&client) {
            Some(c) => {
                if c.connected {
                    c.last_heard = now;
                }
            }
            None => {
                let detail = "update from a client that has not enrolled".to_string();
                self.refuse(client, &update, RejectReason::Protocol, detail, out);
                return;
            }
        }
        match self.check_update(now, &client, &update) {
            Err((reason, detail)) => self.refuse(client, &update, reason, detail, out),
            Ok(expected) => match update.validate(&expected, &self.spec, &self.config.decode_limits) {
                Err(invalid) => {
                    self.mark(update.task_id, TaskState::Rejected);
                    self.refuse(client, &update, invalid.reason, invalid.detail, out);
                }
                Ok(mut delta) => {
                    let round = expected.round;
                    let (declared, cap) = self.clients.get(&client).map_or((0, 0), |c| (c.declared, c.weight_cap));
                    let refused = if update.examples > declared {
                        Some(format!(
                            "the update claims {} examples, the client declared {declared} at its first enrollment",
                            update.examples
                        ))
                    } else {
                        self.above_grant(&update, &delta).or_else(|| self.out_of_range(&delta))
                    };
                    if let Some(detail) = refused {
                        self.mark(update.task_id, TaskState::Rejected);
                        self.refuse(client, &update, RejectReason::InvalidDelta, detail, out);
                        return;
                    }
                    // The weight is the coordinator's: the claim, capped (or fixed by the roster).
                    let weight = match self.config.trust.roster.get(&client.0) {
                        Some(super::RosterEntry::Weight(w)) => (*w).min(update.examples),
                        _ => update.examples.min(cap),
                    };
                    let norm = crate::aggregate::robust::l2_norm(&delta);
                    if let Some(limit) = self.config.trust.norm_limit(self.norm_median) {
                        if norm > limit {
                            tracing::info!(%client, %round, norm, limit, "update scaled down to the norm bound");
                            let factor = (limit / norm) as f32;
                            delta.tensors.values_mut().for_each(|t| t.scale(factor));
                        }
                    }
                    if let Err(e) = self.merge.fold_weighted(&delta, update.examples, weight) {
                        tracing::warn!(%client, %round, error = %e, "the merge refused an update");
                        self.mark(update.task_id, TaskState::Rejected);
                        self.refuse(client, &update, RejectReason::InvalidDelta, e.to_string(), out);
                        return;
                    }
                    self.mark(update.task_id, TaskState::Accepted);
                    if let Some(p) = self.ranks.as_mut() {
                        p.observe_update(&client.0, &update);
                    }
                    if let Phase::Training { attempt: a, .. } = &mut self.phase {
                        let w = weight as f64;
                        a.accepted.push(client.0.clone());
                        a.norms.push(norm);
                        a.examples = a.examples.saturating_add(weight);
                        a.loss_sum += w * f64::from(update.metrics.loss);
                        a.accuracy_sum += w * f64::from(update.metrics.accuracy);
                        // Acknowledged only once the round is committed (durable acknowledgement).
                        a.acks.push((client.clone(), Ack { round, task_id: update.task_id }));
                    }
                    tracing::info!(
                        %client,
                        %round,
                        task = %update.task_id,
                        weight,
                        norm,
                        "update folded (acknowledged once the round is committed)"
                    );
                }
            },
        }
    }

    /// Why an update's values are out of the trusted range (`max_abs_value`), if they are: a
    /// finite 10³⁰ would pass the finiteness check and overflow the merge's sums.
    fn out_of_range(&self, delta: &PoolDelta) -> Option<String> {
        let max = self.config.trust.max_abs_value;
        delta.tensors.iter().find_map(|(name, t)| {
            let worst = t.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
            (worst > max)
                .then(|| format!("tensor {name:?} holds a value of magnitude {worst:e}, above max_abs_value {max:e}"))
        })
    }

    /// Why an update carries more than its task granted (a LoRA rank above the budget), if it does.
    fn above_grant(&self, update: &Update, delta: &PoolDelta) -> Option<String> {
        let granted = self.tasks.get(&update.task_id)?.ranks.as_ref()?;
        delta.lora_ranks(&self.spec).into_iter().find_map(|(target, rank)| {
            let allowed = granted.get(&target).copied().unwrap_or(0);
            (rank > allowed).then(|| format!("rank {rank} on LoRA target {target:?}, but the task granted {allowed}"))
        })
    }

    /// The task an update answers, if its sender, round, nonce, state and timing are right.
    fn check_update(
        &self,
        now: Time,
        client: &ClientId,
        update: &Update,
    ) -> Result<ExpectedTask, (RejectReason, String)> {
        let Some(task) = self.tasks.get(&update.task_id) else {
            return Err((RejectReason::UnknownTask, format!("task {} is not known to the server", update.task_id)));
        };
        if &task.client != client {
            return Err((RejectReason::UnknownTask, format!("task {} was not given to this client", update.task_id)));
        }
        if update.round != task.round {
            return Err((
                RejectReason::WrongRound,
                format!("update for round {}, task {} is for round {}", update.round, update.task_id, task.round),
            ));
        }
        if update.nonce != task.nonce {
            return Err((
                RejectReason::WrongNonce,
                format!("nonce does not match task {}'s (replayed update?)", update.task_id),
            ));
        }
        match task.state {
            TaskState::Accepted | TaskState::Rejected => {
                return Err((RejectReason::Duplicate, format!("task {} already has an update", update.task_id)));
            }
            TaskState::Open => {}
        }
        let Some(a) = self.attempt().filter(|a| a.by_client.get(client) == Some(&update.task_id)) else {
            return Err((
                RejectReason::Late,
                format!("task {} of round {} closed before its update arrived", update.task_id, task.round),
            ));
        };
        if now >= a.deadline_at {
            return Err((RejectReason::Late, format!("update after the deadline of round {}", task.round)));
        }
        Ok(ExpectedTask { round: task.round, task_id: update.task_id, nonce: task.nonce })
    }

    fn mark(&mut self, task_id: TaskId, state: TaskState) {
        if let Some(t) = self.tasks.get_mut(&task_id) {
            t.state = state;
            if let Phase::Training { attempt: a, .. } = &mut self.phase {
                if a.by_client.get(&t.client) == Some(&task_id) {
                    a.answered += 1;
                }
            }
        }
    }

    fn refuse(
        &mut self,
        client: ClientId,
        update: &Update,
        reason: RejectReason,
        detail: String,
        out: &mut Vec<Action>,
    ) {
        tracing::info!(%client, round = %update.round, task = %update.task_id, ?reason, %detail, "update refused");
        if let Some(acc) = self.account_mut() {
            *acc.rejected.entry(reject_key(reason)).or_insert(0) += 1;
        }
        out.push(Action::Reject {
            client: client.clone(),
            reject: Reject { round: Some(update.round), task_id: Some(update.task_id), reason, detail: detail.clone() },
        });
        self.strike(&client, reason, &detail, out);
    }

    // ---- commit ------------------------------------------------------------------------------

    /// Commits round `committed + 1` from attempt `a`: the merge's new global pool, the round's
    /// record and [`Action::Commit`]. The engine then waits to evaluate the new pool, waits for the
    /// next round, or has finished. A merge that cannot finish, or whose pool does not fit the
    /// spec, leaves the round waiting for a new attempt.
    pub(super) fn commit(&mut self, now: Time, account: RoundAccount, a: Attempt, out: &mut Vec<Action>) {
        let round = self.training_round();
        let pool = match self.merge.finish(&self.global) {
            Ok(p) => p,
            Err(source) => {
                let e = EngineError::Merge { round, source };
                tracing::error!(error = %e, attempt = a.number, "the merge could not finish; retrying the round");
                not_committed(a.acks, &format!("round {round} could not be merged: {e}"), out);
                self.phase = Phase::WaitingToTrain { account: Some(account) };
                return;
            }
        };
        if let Err(e) = pool.validate(&self.spec) {
            tracing::error!(%round, error = %e, attempt = a.number, "the merge produced a pool that does not fit the spec; retrying the round");
            not_committed(a.acks, &format!("round {round}'s merged pool does not fit the spec: {e}"), out);
            self.phase = Phase::WaitingToTrain { account: Some(account) };
            return;
        }
        // The median norm of the accepted updates: the next round's norm bound (logged, so a
        // restart goes on with it).
        let mut norms = a.norms.clone();
        let median_norm = super::trust::median(&mut norms).filter(|m| m.is_finite() && *m > 0.0);
        let mut stragglers: Vec<String> = a
            .by_client
            .iter()
            .filter(|(_, id)| self.tasks.get(id).is_some_and(|t| t.state == TaskState::Open))
            .map(|(c, _)| c.0.clone())
            .collect();
        stragglers.sort();
        let mut clients = a.accepted.clone();
        clients.sort();
        let w = a.examples as f64;
        let mean = |sum: f64| if a.examples > 0 { Some(sum / w) } else { None };
        let record = RoundRecord {
            round: round.0,
            attempt: a.number,
            clients,
            examples: a.examples,
            bytes_up: account.bytes_up,
            bytes_down: account.bytes_down,
            rejected: account.rejected,
            stragglers,
            train_loss: mean(a.loss_sum),
            train_accuracy: mean(a.accuracy_sum),
            started_at_secs: account.started_at.as_secs_f64(),
            committed_at_secs: now.as_secs_f64(),
            recovered: false,
            median_update_norm: median_norm,
            eval: None,
        };
        tracing::info!(
            %round,
            attempt = record.attempt,
            clients = record.clients.len(),
            stragglers = record.stragglers.len(),
            examples = record.examples,
            bytes_up = record.bytes_up,
            bytes_down = record.bytes_down,
            seconds = record.committed_at_secs - record.started_at_secs,
            train_loss = record.train_loss,
            "round committed"
        );
        self.global = pool.clone();
        self.truncated.clear();
        if let Some(p) = self.ranks.as_mut() {
            p.committed(&pool);
        }
        self.committed = round;
        self.encoded = None;
        let server_state = self.merge.server_state();
        if median_norm.is_some() {
            self.norm_median = median_norm;
        }
        out.push(Action::Commit(Box::new(Commit { round, pool, record, server_state })));
        // The driver persists the commit before the actions after it: an ack means "on disk".
        out.extend(a.acks.into_iter().map(|(client, ack)| Action::Ack { client, ack }));
        self.phase = if self.config.eval_deadline.is_some() {
            Phase::WaitingToEvaluate
        } else if self.committed.0 >= self.config.total_rounds {
            tracing::info!(rounds = self.committed.0, "training finished");
            Phase::Finished { announced: false }
        } else {
            Phase::WaitingToTrain { account: None }
        };
    }
}
