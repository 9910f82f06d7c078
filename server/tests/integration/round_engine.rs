//! The round engine, driven with a fake clock: rounds commit on quorum or deadline, stragglers are
//! listed, every kind of bad update is refused with its reason while the round goes on, missed
//! quorums are retried with new nonces, reconnecting clients get their task again, and a resumed
//! engine continues where the last one committed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolDelta, PoolError, PoolSpec, SlotUsage, TargetSpec};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits, EncodedDelta, Quantization};
use fedpool_common::wire::{Enroll, RejectReason, RoundTask, ServerMessage, TrainMetrics, Update, PROTOCOL_VERSION};
use fedpool_common::{BackboneFingerprint, HostTensor, Nonce, Round, Sha256, TaskId};
use fedpool_server::aggregate::{AggregateError, Merge};
use fedpool_server::round::{
    Action, Commit, Engine, EngineConfig, Event, NormBound, RosterEntry, SeededNonces, Time, TrustConfig,
};
use proptest::prelude::*;

// ---- fixtures ------------------------------------------------------------------------------------

fn ssf_spec() -> PoolSpec {
    let targets = (0..2).map(|i| TargetSpec { name: format!("layer.{i}.output"), dim_in: 4, dim_out: 4 }).collect();
    PoolSpec::ssf_pool(targets, 4, 3, 1, Some(HeadSpec::new(4, 2)))
}

fn lora_spec() -> PoolSpec {
    let targets = vec![TargetSpec { name: "layer.0.query".into(), dim_in: 4, dim_out: 4 }];
    PoolSpec::adalora(targets, 2, 4.0, Some(HeadSpec::new(4, 2)))
}

fn backbone() -> BackboneFingerprint {
    BackboneFingerprint(Sha256::of(b"tiny-bert"))
}

fn config() -> EngineConfig {
    EngineConfig {
        total_rounds: 10,
        clients_per_round: 2,
        quorum: 2,
        over_selection: 1.0,
        min_clients_to_start: 2,
        deadline: Duration::from_secs(60),
        local_steps: 5,
        seed: 7,
        download_codec: CodecConfig::default(),
        decode_limits: DecodeLimits::default(),
        backbone: backbone(),
        heartbeat: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(3600),
        eval_deadline: None,
        trust: TrustConfig::default(),
    }
}

fn enroll_msg(spec: &PoolSpec) -> Enroll {
    Enroll {
        protocol_version: PROTOCOL_VERSION,
        backbone: backbone(),
        spec_hash: spec.hash(),
        declared_upload_bps: Some(1_000_000),
        declared_download_bps: None,
        examples: 100,
        software: "test-client".into(),
    }
}

/// What the test merge saw, shared with the test.
#[derive(Debug, Default)]
struct Calls {
    begins: usize,
    folds: Vec<u64>,
    finishes: usize,
}

/// A test-only merge: the example-weighted mean of the deltas, slot by slot (a slot's rows move
/// by the mean of the deltas that carried it), added to the global pool.
struct MeanMerge {
    spec: PoolSpec,
    sum: BTreeMap<String, HostTensor>,
    /// Examples behind each slot (index 0 for LoRA: one "slot").
    weight: Vec<u64>,
    calls: Arc<Mutex<Calls>>,
}

impl MeanMerge {
    fn new(spec: &PoolSpec) -> (Self, Arc<Mutex<Calls>>) {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let m = Self { spec: spec.clone(), sum: BTreeMap::new(), weight: Vec::new(), calls: calls.clone() };
        (m, calls)
    }
}

impl Merge for MeanMerge {
    fn begin(&mut self, _global: &AdapterPool) -> Result<(), AggregateError> {
        self.sum = AdapterPool::zeros(&self.spec).tensors;
        self.weight = vec![0; self.spec.pool_size];
        self.calls.lock().unwrap().begins += 1;
        Ok(())
    }

    fn fold(&mut self, delta: &PoolDelta, examples: u64) -> Result<(), AggregateError> {
        self.fold_weighted(delta, examples, examples)
    }

    /// Weighs the update by the coordinator's `weight` (what the test checks in `folds`).
    fn fold_weighted(&mut self, delta: &PoolDelta, _claimed: u64, examples: u64) -> Result<(), AggregateError> {
        let slots: Vec<usize> = match &delta.slots {
            Some(u) => u.slots.iter().map(|&s| s as usize).collect(),
            None => vec![0],
        };
        for (name, d) in &delta.tensors {
            let unknown = || AggregateError::Update(PoolError::UnknownTensor(name.clone()));
            let sum = self.sum.get_mut(name).ok_or_else(unknown)?;
            if delta.slots.is_some() {
                for (i, &slot) in slots.iter().enumerate() {
                    for (y, x) in sum.row_mut(slot).iter_mut().zip(d.row(i)) {
                        *y += examples as f32 * x;
                    }
                }
            } else {
                sum.axpy(examples as f32, d)?;
            }
        }
        for s in slots {
            self.weight[s] += examples;
        }
        self.calls.lock().unwrap().folds.push(examples);
        Ok(())
    }

    fn finish(&mut self, global: &AdapterPool) -> Result<AdapterPool, AggregateError> {
        let mut out = global.clone();
        for (name, t) in out.tensors.iter_mut() {
            let sum = &self.sum[name];
            if self.spec.pool_size > 1 || self.spec.kind == fedpool_common::AdapterKind::SsfPool {
                for slot in 0..self.spec.pool_size {
                    let w = self.weight[slot];
                    if w > 0 {
                        for (y, x) in t.row_mut(slot).iter_mut().zip(sum.row(slot)) {
                            *y += x / w as f32;
                        }
                    }
                }
            } else if self.weight[0] > 0 {
                t.axpy(1.0 / self.weight[0] as f32, sum)?;
            }
        }
        self.calls.lock().unwrap().finishes += 1;
        Ok(out)
    }
}

/// An engine under test with its own fake clock.
struct Harness {
    engine: Engine,
    spec: PoolSpec,
    now: Time,
    calls: Arc<Mutex<Calls>>,
}

impl Harness {
    fn new(config: EngineConfig) -> Self {
        Self::resumed(config, Round(0), None)
    }

    fn resumed(config: EngineConfig, start: Round, spec: Option<PoolSpec>) -> Self {
        let spec = spec.unwrap_or_else(ssf_spec);
        let (merge, calls) = MeanMerge::new(&spec);
        let global = AdapterPool::init(&spec, 1).unwrap();
        let engine = Engine::new(config, spec.clone(), Box::new(merge), start, global).unwrap();
        Self { engine, spec, now: Time::ZERO, calls }
    }

    fn at(&mut self, secs: u64) -> &mut Self {
        self.now = Time::from_secs(secs);
        self
    }

    fn event(&mut self, event: Event) -> Vec<Action> {
        self.engine.handle(self.now, event)
    }

    fn enroll(&mut self, name: &str) -> Vec<Action> {
        let enroll = enroll_msg(&self.spec);
        self.event(Event::Enroll { client: name.into(), enroll })
    }

    fn send(&mut self, name: &str, update: Update) -> Vec<Action> {
        let wire_bytes = update.delta.wire_len() as u64 + 100;
        self.event(Event::Update { client: name.into(), update, wire_bytes })
    }

    fn tick(&mut self) -> Vec<Action> {
        self.event(Event::Tick)
    }
}

/// The tasks among `actions`, by client name.
fn tasks(actions: &[Action]) -> BTreeMap<String, RoundTask> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendTask { client, task } => Some((client.0.clone(), (**task).clone())),
            _ => None,
        })
        .collect()
}

fn commits(actions: &[Action]) -> Vec<&Commit> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Commit(c) => Some(c.as_ref()),
            _ => None,
        })
        .collect()
}

pub(crate) fn rejects(actions: &[Action]) -> Vec<(String, RejectReason, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reject { client, reject } => Some((client.0.clone(), reject.reason, reject.detail.clone())),
            _ => None,
        })
        .collect()
}

pub(crate) fn acks(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Ack { client, .. } => Some(client.0.clone()),
            _ => None,
        })
        .collect()
}

fn drops(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Drop { client, reason } => Some((client.0.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

/// The global pool a client rebuilds from its task: decode, validate, apply to zeros.
fn global_of(task: &RoundTask, spec: &PoolSpec) -> AdapterPool {
    let delta = codec::decode(&task.global, &DecodeLimits::default()).unwrap();
    delta.validate(spec).unwrap();
    let mut pool = AdapterPool::zeros(spec);
    pool.apply_delta(&delta).unwrap();
    pool
}

/// An honest update for `task`: every value moved by `shift` on slots 0 and 2 (SSF) or on the
/// whole pool (LoRA), encoded with int8 quantization.
fn update_with(task: &RoundTask, spec: &PoolSpec, shift: f32, examples: u64, loss: f32) -> Update {
    let start = global_of(task, spec);
    let mut trained = start.clone();
    trained.tensors.values_mut().for_each(|t| t.data_mut().iter_mut().for_each(|v| *v += shift));
    let mut delta = trained.delta_from(&start).unwrap();
    if spec.kind == fedpool_common::AdapterKind::SsfPool {
        delta = delta.restrict_to_slots(SlotUsage { slots: vec![0, 2], counts: vec![3, 1] }).unwrap();
    }
    encoded_update(task, &delta, examples, loss)
}

fn encoded_update(task: &RoundTask, delta: &PoolDelta, examples: u64, loss: f32) -> Update {
    let cfg = CodecConfig { quantization: Quantization::Int8, ..Default::default() };
    Update {
        round: task.round,
        task_id: task.task_id,
        nonce: task.nonce,
        examples,
        delta: codec::encode(delta, &cfg, None, 3).unwrap(),
        metrics: TrainMetrics { loss, accuracy: 0.5, steps: 5, seconds: 1.0 },
        importance: vec![],
    }
}

fn honest(task: &RoundTask) -> Update {
    update_with(task, &ssf_spec(), 0.01, 10, 1.0)
}

/// Enrolls `names` at the harness's time; returns the tasks sent.
fn enroll_all(h: &mut Harness, names: &[&str]) -> BTreeMap<String, RoundTask> {
    let mut out = BTreeMap::new();
    for n in names {
        let actions = h.enroll(n);
        assert!(
            actions.iter().any(|a| matches!(a, Action::Welcome { client, .. } if client.0 == *n)),
            "{n} welcomed: {actions:?}"
        );
        out.extend(tasks(&actions));
    }
    out
}

// ---- rounds -------------------------------------------------------------------------------------

#[test]
fn quorum_reached_commits_the_round_with_the_weighted_mean() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    assert_eq!(t.len(), 2, "the round starts once two clients are connected");
    assert!(t.values().all(|t| t.round == Round(1) && t.local_steps == 5 && t.deadline_ms == 60_000));
    assert_ne!(t["a"].nonce, t["b"].nonce);
    assert_ne!(t["a"].task_id, t["b"].task_id);
    assert_eq!(h.calls.lock().unwrap().begins, 1);

    let before = h.engine.global().clone();
    let spec = ssf_spec();
    let r = h.at(5).send("a", update_with(&t["a"], &spec, 0.01, 10, 1.0));
    assert!(acks(&r).is_empty() && rejects(&r).is_empty(), "folded; its ack waits for the commit");
    assert!(commits(&r).is_empty(), "one update is below the quorum");
    let r = h.at(9).send("b", update_with(&t["b"], &spec, 0.04, 30, 2.0));
    assert_eq!(acks(&r), ["a", "b"], "both acknowledged once the round is committed");
    let c = commits(&r);
    assert_eq!(c.len(), 1, "{r:?}");
    let c = c[0];
    assert_eq!(c.round, Round(1));
    assert_eq!(c.record.round, 1);
    assert_eq!(c.record.attempt, 1);
    assert_eq!(c.record.clients, ["a", "b"]);
    assert_eq!(c.record.examples, 40);
    assert!(c.record.stragglers.is_empty());
    assert!((c.record.train_loss.unwrap() - 1.75).abs() < 1e-9, "example-weighted: (10·1 + 30·2) / 40");
    assert_eq!(c.record.started_at_secs, 0.0);
    assert_eq!(c.record.committed_at_secs, 9.0);
    assert_eq!(h.calls.lock().unwrap().folds, [10, 30]);

    // Slot 0 moved by the example-weighted mean shift (0.25·0.01 + 0.75·0.04), slot 1 not at all.
    let scale = "layer.0.output.ssf_scale";
    let moved = c.pool.tensors[scale].row(0)[0] - before.tensors[scale].row(0)[0];
    assert!((moved - 0.0325).abs() < 1e-3, "moved {moved}");
    assert_eq!(c.pool.tensors[scale].row(1), before.tensors[scale].row(1));
    assert_eq!(h.engine.global(), &c.pool);
    assert_eq!(h.engine.round(), Round(1));

    // The next round starts at once, from the new global pool.
    let next = tasks(&r);
    assert_eq!(next.len(), 2);
    assert!(next.values().all(|t| t.round == Round(2)));
    assert_eq!(global_of(&next["a"], &spec), c.pool, "lossless download codec: the client gets the pool exactly");
    let pos_commit = r.iter().position(|a| matches!(a, Action::Commit(_))).unwrap();
    let pos_task = r.iter().position(|a| matches!(a, Action::SendTask { .. })).unwrap();
    assert!(pos_commit < pos_task, "the commit comes before the next round's tasks");
}

#[test]
fn deadline_with_quorum_commits_and_lists_the_stragglers() {
    let mut h = Harness::new(EngineConfig { clients_per_round: 3, min_clients_to_start: 3, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "c"]);
    assert_eq!(t.len(), 3);
    assert_eq!(h.engine.next_wakeup(), Some(Time::from_secs(60)), "the deadline is the next timer");
    h.at(10).send("a", honest(&t["a"]));
    let r = h.at(20).send("c", honest(&t["c"]));
    assert!(commits(&r).is_empty(), "quorum, but b may still answer before the deadline");
    assert!(commits(&h.at(59).tick()).is_empty());
    let r = h.at(60).tick();
    let c = commits(&r);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].record.clients, ["a", "c"]);
    assert_eq!(c[0].record.stragglers, ["b"]);
    assert_eq!(c[0].record.committed_at_secs, 60.0);
}

#[test]
fn a_stragglers_update_after_the_commit_is_late() {
    let mut h = Harness::new(EngineConfig { clients_per_round: 3, min_clients_to_start: 3, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "c"]);
    h.at(10).send("a", honest(&t["a"]));
    h.at(20).send("c", honest(&t["c"]));
    let r = h.at(60).tick();
    assert_eq!(commits(&r).len(), 1);
    let round2 = tasks(&r);

    let r = h.at(61).send("b", honest(&t["b"]));
    assert_eq!(rejects(&r).iter().map(|r| r.1).collect::<Vec<_>>(), [RejectReason::Late]);
    assert!(acks(&r).is_empty());
    // Round 2 goes on; the refusal is counted in the round that was open when it came.
    h.at(62).send("a", honest(&round2["a"]));
    h.send("b", honest(&round2["b"]));
    let r = h.send("c", honest(&round2["c"]));
    let c = commits(&r);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].record.rejected.get("Late"), Some(&1));
}

#[test]
fn an_update_that_arrives_after_the_deadline_before_any_tick_is_late() {
    let mut h = Harness::new(EngineConfig { clients_per_round: 3, min_clients_to_start: 3, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "c"]);
    h.at(10).send("a", honest(&t["a"]));
    h.at(20).send("b", honest(&t["b"]));
    // No tick at 60: the update at 75 is judged after the deadline's commit.
    let r = h.at(75).send("c", honest(&t["c"]));
    assert_eq!(rejects(&r).iter().map(|r| r.1).collect::<Vec<_>>(), [RejectReason::Late]);
    let c = commits(&r);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].record.stragglers, ["c"]);
    assert_eq!(c[0].record.committed_at_secs, 75.0);
}

#[test]
fn a_duplicate_update_is_rejected() {
    let mut h = Harness::new(EngineConfig { clients_per_round: 3, min_clients_to_start: 3, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "c"]);
    assert!(rejects(&h.at(1).send("a", honest(&t["a"]))).is_empty());
    let r = h.at(2).send("a", honest(&t["a"]));
    assert_eq!(rejects(&r)[0].1, RejectReason::Duplicate);
    assert_eq!(h.calls.lock().unwrap().folds.len(), 1, "folded once");
}

#[test]
fn a_replayed_update_with_the_previous_rounds_nonce_is_rejected() {
    let mut h = Harness::new(config());
    let t1 = enroll_all(&mut h, &["a", "b"]);
    h.at(1).send("a", honest(&t1["a"]));
    let r = h.at(2).send("b", honest(&t1["b"]));
    let t2 = tasks(&r);
    assert_eq!(t2["a"].round, Round(2));
    // Round 1's update, relabelled as the round 2 task: the old nonce gives it away.
    let mut replay = honest(&t1["a"]);
    replay.round = Round(2);
    replay.task_id = t2["a"].task_id;
    let r = h.at(3).send("a", replay);
    assert_eq!(rejects(&r)[0].1, RejectReason::WrongNonce);
    // The original round 1 update sent again: that task already has its update.
    let r = h.send("a", honest(&t1["a"]));
    assert_eq!(rejects(&r)[0].1, RejectReason::Duplicate, "a's round 1 task already has its update");
    // The task is still open: the honest update is accepted.
    assert!(rejects(&h.send("a", honest(&t2["a"]))).is_empty());
    assert_eq!(h.calls.lock().unwrap().folds.len(), 3);
}

#[test]
fn an_update_for_the_wrong_round_is_rejected() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    let mut u = honest(&t["a"]);
    u.round = Round(5);
    let r = h.at(1).send("a", u);
    let (_, reason, detail) = &rejects(&r)[0];
    assert_eq!(*reason, RejectReason::WrongRound);
    assert!(detail.contains("round 5") && detail.contains("round 1"), "{detail}");
}

#[test]
fn an_update_for_an_unknown_or_another_clients_task_is_rejected() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    let mut u = honest(&t["a"]);
    u.task_id = TaskId(999_999);
    assert_eq!(rejects(&h.at(1).send("a", u))[0].1, RejectReason::UnknownTask);
    // b answering a's task.
    let r = h.send("b", honest(&t["a"]));
    assert_eq!(rejects(&r)[0].1, RejectReason::UnknownTask);
    // A client that never enrolled.
    let r = h.send("mallory", honest(&t["a"]));
    assert_eq!(rejects(&r)[0].1, RejectReason::Protocol);
    // a's own task is untouched by all of that.
    assert!(rejects(&h.send("a", honest(&t["a"]))).is_empty());
    assert_eq!(h.calls.lock().unwrap().folds.len(), 1);
}

#[test]
fn a_wrong_shape_update_is_rejected_as_invalid_and_the_round_goes_on() {
    let mut h = Harness::new(config());
    let spec = ssf_spec();
    let t = enroll_all(&mut h, &["a", "b"]);
    let start = global_of(&t["a"], &spec);
    let mut delta =
        start.delta_from(&start).unwrap().restrict_to_slots(SlotUsage { slots: vec![1], counts: vec![4] }).unwrap();
    delta.tensors.insert("layer.0.output.ssf_scale".into(), HostTensor::zeros(&[1, 5]));
    let r = h.at(1).send("a", encoded_update(&t["a"], &delta, 10, 1.0));
    let (_, reason, detail) = &rejects(&r)[0];
    assert_eq!(*reason, RejectReason::InvalidDelta);
    assert!(detail.contains("layer.0.output.ssf_scale") && detail.contains("[1, 5]"), "{detail}");
    assert!(h.calls.lock().unwrap().folds.is_empty(), "nothing folded");
    // b's good update is accepted; a answered (badly), so the round cannot reach its quorum of 2
    // with this attempt and is retried at once rather than waiting for the deadline — and b is
    // told its folded update is in no commit.
    let r = h.at(2).send("b", honest(&t["b"]));
    assert_eq!(h.calls.lock().unwrap().folds.len(), 1);
    assert!(acks(&r).is_empty());
    assert_eq!(
        rejects(&r).iter().map(|r| (r.0.as_str(), r.1)).collect::<Vec<_>>(),
        [("b", RejectReason::NotCommitted)]
    );
    assert!(commits(&r).is_empty());
    let retry = tasks(&r);
    assert_eq!(retry.len(), 2, "retried: {r:?}");
    assert!(retry.values().all(|t| t.round == Round(1)));
}

#[test]
fn a_nan_update_is_rejected_as_non_finite() {
    let mut h = Harness::new(EngineConfig { clients_per_round: 3, min_clients_to_start: 3, ..config() });
    let spec = ssf_spec();
    let t = enroll_all(&mut h, &["a", "b", "c"]);
    let start = global_of(&t["a"], &spec);
    let mut delta =
        start.delta_from(&start).unwrap().restrict_to_slots(SlotUsage { slots: vec![0], counts: vec![4] }).unwrap();
    delta.tensors.get_mut("pool.keys").unwrap().data_mut()[2] = f32::NAN;
    let cfg = CodecConfig::default(); // f32: the NaN travels as is
    let mut u = encoded_update(&t["a"], &delta, 10, 1.0);
    u.delta = codec::encode(&delta, &cfg, None, 0).unwrap();
    let r = h.at(1).send("a", u);
    let (_, reason, detail) = &rejects(&r)[0];
    assert_eq!(*reason, RejectReason::NonFinite);
    assert!(detail.contains("pool.keys"), "{detail}");
    // NaN in the metrics too.
    let mut u = honest(&t["b"]);
    u.metrics.loss = f32::NAN;
    assert_eq!(rejects(&h.send("b", u))[0].1, RejectReason::NonFinite);
    // The round goes on and nobody was dropped (c's update is folded; the attempt then has every
    // answer but too few good ones, so c is told it was not committed).
    let r = h.send("c", honest(&t["c"]));
    assert_eq!(rejects(&r)[0].1, RejectReason::NotCommitted);
    assert_eq!(h.calls.lock().unwrap().folds.len(), 1);
    assert!(drops(&r).is_empty());
}

#[test]
fn an_update_claiming_more_examples_than_enrolled_is_rejected() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    // Enrolled with 100 examples: a weight of 101 would outvote the others unfairly.
    let r = h.at(1).send("a", update_with(&t["a"], &ssf_spec(), 0.01, 101, 1.0));
    let (_, reason, detail) = &rejects(&r)[0];
    assert_eq!(*reason, RejectReason::InvalidDelta);
    assert!(detail.contains("101") && detail.contains("100"), "{detail}");
    h.send("b", update_with(&t["b"], &ssf_spec(), 0.01, 100, 1.0));
    assert_eq!(h.calls.lock().unwrap().folds, [100], "b's claim is what it declared");
}

#[test]
fn a_missed_quorum_is_retried_with_new_nonces_and_the_old_nonce_is_refused() {
    let mut h = Harness::new(config());
    let t1 = enroll_all(&mut h, &["a", "b"]);
    h.at(10).send("a", honest(&t1["a"]));
    let r = h.at(60).tick();
    assert!(commits(&r).is_empty(), "one update is below the quorum");
    let t2 = tasks(&r);
    assert_eq!(t2.len(), 2, "a new attempt: {r:?}");
    assert_eq!(h.engine.running(), Some((Round(1), 2)));
    assert_eq!(h.calls.lock().unwrap().begins, 2, "merge.begin again");
    for name in ["a", "b"] {
        assert_eq!(t2[name].round, Round(1));
        assert_ne!(t2[name].nonce, t1[name].nonce, "fresh nonce for {name}");
        assert_ne!(t2[name].task_id, t1[name].task_id, "fresh task for {name}");
    }
    // The old task is closed; the old nonce on the new task is a replay.
    assert_eq!(rejects(&h.at(61).send("b", honest(&t1["b"])))[0].1, RejectReason::Late);
    let mut replay = honest(&t1["b"]);
    replay.task_id = t2["b"].task_id;
    assert_eq!(rejects(&h.send("b", replay))[0].1, RejectReason::WrongNonce);

    h.at(70).send("a", honest(&t2["a"]));
    let r = h.at(71).send("b", honest(&t2["b"]));
    let c = commits(&r);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].record.attempt, 2);
    assert_eq!(c[0].record.clients, ["a", "b"]);
    assert_eq!(c[0].record.examples, 20, "only the committing attempt's updates count");
    assert_eq!(c[0].record.started_at_secs, 0.0, "the round started with its first attempt");
    assert_eq!(c[0].record.rejected.get("Late"), Some(&1));
    assert_eq!(c[0].record.rejected.get("WrongNonce"), Some(&1));
}

#[test]
fn a_round_nobody_answers_is_retried_at_every_deadline_and_never_hangs() {
    let mut h = Harness::new(config());
    enroll_all(&mut h, &["a", "b"]);
    let mut seen = std::collections::BTreeSet::new();
    for k in 1..=5u64 {
        let wake = h.engine.next_wakeup().expect("a timer is always set while a round runs");
        assert_eq!(wake, Time::from_secs(60 * k));
        let r = h.at(60 * k).tick();
        let t = tasks(&r);
        assert_eq!(t.len(), 2, "attempt {}", k + 1);
        assert!(t.values().all(|t| seen.insert(t.nonce.0)), "nonces never repeat");
    }
    assert_eq!(h.engine.running(), Some((Round(1), 6)));
}

#[test]
fn over_selection_commits_once_clients_per_round_answered() {
    let mut h = Harness::new(EngineConfig { over_selection: 1.5, ..config() });
    let t = enroll_all(&mut h, &["a", "b"]);
    assert_eq!(t.len(), 2, "only two connected: the round starts with them");
    // Rather: with three connected before the start, three are selected.
    let mut h = Harness::new(EngineConfig { over_selection: 1.5, min_clients_to_start: 3, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "c"]);
    assert_eq!(t.len(), 3, "⌈2 × 1.5⌉ = 3 selected");
    let names: Vec<&String> = t.keys().collect();
    h.at(5).send(names[0], honest(&t[names[0].as_str()]));
    let r = h.at(6).send(names[2], honest(&t[names[2].as_str()]));
    let c = commits(&r);
    assert_eq!(c.len(), 1, "two of three answered = clients_per_round: no waiting for the third");
    assert_eq!(c[0].record.stragglers, [names[1].clone()]);
    assert_eq!(c[0].record.committed_at_secs, 6.0);
}

#[test]
fn sampling_is_deterministic_in_the_seed() {
    let cfg = EngineConfig { min_clients_to_start: 6, ..config() };
    let names = ["a", "b", "c", "d", "e", "f"];
    let picks = |seed: u64| {
        let mut h = Harness::new(EngineConfig { seed, ..cfg.clone() });
        enroll_all(&mut h, &names).keys().cloned().collect::<Vec<_>>()
    };
    assert_eq!(picks(1).len(), 2);
    assert_eq!(picks(1), picks(1));
    let distinct: std::collections::BTreeSet<_> = (0..20).map(picks).collect();
    assert!(distinct.len() > 1, "different seeds pick different clients");
}

// ---- clients --------------------------------------------------------------------------------------

#[test]
fn a_client_reconnecting_mid_round_gets_its_same_task_again() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    let r = h.at(10).event(Event::Lost { client: "a".into() });
    assert!(r.is_empty(), "losing a connection closes no task: {r:?}");
    let r = h.at(25).enroll("a");
    assert!(matches!(&r[0], Action::Welcome { client, welcome } if client.0 == "a" && welcome.round == Round(0)));
    let again = tasks(&r);
    assert_eq!(again.len(), 1);
    assert_eq!(again["a"].task_id, t["a"].task_id);
    assert_eq!(again["a"].nonce, t["a"].nonce);
    assert_eq!(again["a"].global, t["a"].global);
    assert_eq!(again["a"].deadline_ms, 35_000, "the time left until the deadline");
    // The update for it is accepted and the round commits.
    h.at(30).send("a", honest(&again["a"]));
    let r = h.send("b", honest(&t["b"]));
    assert_eq!(commits(&r).len(), 1);
    assert!(commits(&r)[0].record.bytes_down > 0);
}

#[test]
fn a_client_that_already_answered_gets_no_task_when_it_reconnects() {
    let mut h = Harness::new(EngineConfig { clients_per_round: 3, min_clients_to_start: 3, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "c"]);
    h.at(1).send("a", honest(&t["a"]));
    h.event(Event::Lost { client: "a".into() });
    let r = h.at(2).enroll("a");
    assert!(tasks(&r).is_empty(), "{r:?}");
}

#[test]
fn enrollment_with_another_backbone_is_refused_naming_the_expected_model() {
    let mut h = Harness::new(config());
    let mut e = enroll_msg(&ssf_spec());
    e.backbone = BackboneFingerprint(Sha256::of(b"bert-large"));
    let r = h.event(Event::Enroll { client: "x".into(), enroll: e });
    let (client, reason, detail) = &rejects(&r)[0];
    assert_eq!((client.as_str(), *reason), ("x", RejectReason::BackboneMismatch));
    let expected = &backbone().0.to_hex()[..16];
    assert!(detail.contains(expected), "the detail names the expected model {expected}: {detail}");
    assert!(detail.contains(&Sha256::of(b"bert-large").to_hex()[..16]), "{detail}");
    assert_eq!(drops(&r).len(), 1, "then dropped");
    assert_eq!(h.engine.connected_clients(), 0);
}

#[test]
fn enrollment_with_another_spec_or_protocol_is_refused() {
    let mut h = Harness::new(config());
    let r = h.event(Event::Enroll { client: "x".into(), enroll: enroll_msg(&lora_spec()) });
    let (_, reason, detail) = &rejects(&r)[0];
    assert_eq!(*reason, RejectReason::SpecMismatch);
    assert!(detail.contains(&ssf_spec().hash().0.to_hex()[..16]), "{detail}");
    assert_eq!(drops(&r).len(), 1);

    let mut e = enroll_msg(&ssf_spec());
    e.protocol_version = 99;
    let r = h.event(Event::Enroll { client: "y".into(), enroll: e });
    let (_, reason, detail) = &rejects(&r)[0];
    assert_eq!(*reason, RejectReason::ProtocolVersion);
    assert!(detail.contains("99"), "{detail}");
    assert_eq!(drops(&r).len(), 1);
}

#[test]
fn a_silent_client_is_dropped_after_the_idle_timeout_and_heartbeats_keep_it() {
    let cfg = EngineConfig { idle_timeout: Duration::from_secs(30), min_clients_to_start: 3, ..config() };
    let mut h = Harness::new(cfg);
    enroll_all(&mut h, &["a", "b"]);
    assert_eq!(h.engine.next_wakeup(), Some(Time::from_secs(30)));
    h.at(20).event(Event::Heartbeat { client: "a".into() });
    let r = h.at(30).tick();
    assert_eq!(drops(&r).iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["b"]);
    assert!(drops(&r)[0].1.contains("idle"), "{:?}", drops(&r));
    assert_eq!(h.engine.connected_clients(), 1);
    assert_eq!(h.engine.next_wakeup(), Some(Time::from_secs(50)));
    let r = h.at(50).tick();
    assert_eq!(drops(&r).len(), 1);
    assert_eq!(h.engine.next_wakeup(), None, "nothing is timed with no client and no round");
}

// ---- resume and end -----------------------------------------------------------------------------

#[test]
fn a_resumed_engine_issues_tasks_for_the_round_after_the_last_commit() {
    let mut h = Harness::resumed(config(), Round(5), None);
    assert_eq!(h.engine.round(), Round(5));
    let r = h.enroll("a");
    assert!(matches!(&r[0], Action::Welcome { welcome, .. } if welcome.round == Round(5)));
    let t = tasks(&h.enroll("b"));
    assert_eq!(t.len(), 2);
    assert!(t.values().all(|t| t.round == Round(6)));
    h.at(1).send("a", honest(&t["a"]));
    let r = h.send("b", honest(&t["b"]));
    assert_eq!(commits(&r)[0].round, Round(6));
}

#[test]
fn after_total_rounds_the_engine_finishes() {
    let mut h = Harness::new(EngineConfig { total_rounds: 2, ..config() });
    let mut t = enroll_all(&mut h, &["a", "b"]);
    for round in 1..=2u64 {
        h.at(round * 10).send("a", honest(&t["a"]));
        let r = h.send("b", honest(&t["b"]));
        assert_eq!(commits(&r)[0].round, Round(round));
        if round == 1 {
            assert!(!r.contains(&Action::Finished));
            t = tasks(&r);
        } else {
            assert_eq!(r.last(), Some(&Action::Finished));
            assert!(tasks(&r).is_empty(), "no round 3");
        }
    }
    assert!(h.engine.is_finished());
    assert_eq!(h.engine.next_wakeup(), None);
    let r = h.at(100).enroll("c");
    assert!(tasks(&r).is_empty() && !r.contains(&Action::Finished), "Finished is announced once: {r:?}");
    // An engine resumed at its last round is finished from the start.
    let mut h = Harness::resumed(EngineConfig { total_rounds: 2, ..config() }, Round(2), None);
    assert!(h.engine.is_finished());
    assert_eq!(h.tick(), [Action::Finished]);
}

// ---- payloads and accounting ------------------------------------------------------------------------

#[test]
fn the_task_carries_the_global_pool_that_a_client_can_decode_for_ssf_and_lora() {
    for spec in [ssf_spec(), lora_spec()] {
        let mut h = Harness::resumed(config(), Round(0), Some(spec.clone()));
        let t = enroll_all(&mut h, &["a", "b"]);
        assert_eq!(&global_of(&t["a"], &spec), h.engine.global(), "{:?}", spec.kind);
        // And a LoRA round commits too.
        h.at(1).send("a", update_with(&t["a"], &spec, 0.01, 5, 1.0));
        let r = h.send("b", update_with(&t["b"], &spec, 0.03, 5, 1.0));
        assert_eq!(commits(&r).len(), 1, "{:?}: {:?}", spec.kind, rejects(&r));
    }
}

#[test]
fn bytes_are_counted_as_frames_down_and_wire_bytes_up() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    let down: u64 = t.values().map(|t| ServerMessage::Task(Box::new(t.clone())).to_frame().unwrap().len() as u64).sum();
    let ua = honest(&t["a"]);
    let ub = honest(&t["b"]);
    h.at(1).event(Event::Update { client: "a".into(), update: ua, wire_bytes: 1000 });
    let r = h.event(Event::Update { client: "b".into(), update: ub, wire_bytes: 234 });
    let c = commits(&r)[0];
    assert_eq!(c.record.bytes_down, down);
    assert_eq!(c.record.bytes_up, 1234);
}

#[test]
fn a_record_is_one_json_line_that_round_trips() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    h.at(1).send("a", honest(&t["a"]));
    let r = h.send("b", honest(&t["b"]));
    let record = &commits(&r)[0].record;
    let line = serde_json::to_string(record).unwrap();
    assert!(!line.contains('\n'));
    assert!(!line.contains("recovered"), "only recovered lines say so: {line}");
    assert_eq!(&serde_json::from_str::<fedpool_server::round::RoundRecord>(&line).unwrap(), record);
}

#[test]
fn bad_configs_are_refused() {
    let spec = ssf_spec();
    let global = AdapterPool::init(&spec, 1).unwrap();
    for (cfg, what) in [
        (EngineConfig { quorum: 3, ..config() }, "quorum"),
        (EngineConfig { quorum: 0, ..config() }, "quorum"),
        (EngineConfig { over_selection: 0.5, ..config() }, "over_selection"),
        (EngineConfig { over_selection: f64::NAN, ..config() }, "over_selection"),
        (EngineConfig { min_clients_to_start: 1, ..config() }, "min_clients_to_start"),
        (EngineConfig { deadline: Duration::ZERO, ..config() }, "deadline"),
        (EngineConfig { idle_timeout: Duration::from_secs(5), ..config() }, "idle_timeout"),
        (EngineConfig { total_rounds: 0, ..config() }, "total_rounds"),
    ] {
        let (merge, _) = MeanMerge::new(&spec);
        let err = Engine::new(cfg, spec.clone(), Box::new(merge), Round(0), global.clone()).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    let (merge, _) = MeanMerge::new(&spec);
    let other = AdapterPool::init(&lora_spec(), 1).unwrap();
    assert!(Engine::new(config(), spec, Box::new(merge), Round(0), other).is_err(), "a global pool of another spec");
}

#[test]
fn a_merge_that_fails_to_finish_retries_the_round() {
    struct FailOnce(bool, MeanMerge);
    impl Merge for FailOnce {
        fn begin(&mut self, g: &AdapterPool) -> Result<(), AggregateError> {
            self.1.begin(g)
        }
        fn fold(&mut self, d: &PoolDelta, n: u64) -> Result<(), AggregateError> {
            self.1.fold(d, n)
        }
        fn finish(&mut self, g: &AdapterPool) -> Result<AdapterPool, AggregateError> {
            if !self.0 {
                self.0 = true;
                return Err(AggregateError::SvdDiverged { target: "layer.0.query".into(), rows: 4, cols: 4 });
            }
            self.1.finish(g)
        }
    }
    let spec = ssf_spec();
    let (inner, _) = MeanMerge::new(&spec);
    let global = AdapterPool::init(&spec, 1).unwrap();
    let mut engine = Engine::new(config(), spec.clone(), Box::new(FailOnce(false, inner)), Round(0), global).unwrap();
    let mut t = BTreeMap::new();
    for n in ["a", "b"] {
        t.extend(tasks(&engine.handle(Time::ZERO, Event::Enroll { client: n.into(), enroll: enroll_msg(&spec) })));
    }
    let send = |engine: &mut Engine, n: &str, task: &RoundTask| {
        engine.handle(Time::from_secs(1), Event::Update { client: n.into(), update: honest(task), wire_bytes: 1 })
    };
    send(&mut engine, "a", &t["a"]);
    let r = send(&mut engine, "b", &t["b"]);
    assert!(commits(&r).is_empty());
    let retry = tasks(&r);
    assert_eq!(retry.len(), 2, "a failed finish retries the round: {r:?}");
    send(&mut engine, "a", &retry["a"]);
    let r = send(&mut engine, "b", &retry["b"]);
    assert_eq!(commits(&r)[0].record.attempt, 2);
}

#[test]
fn the_engine_can_move_to_a_driver_task() {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
    assert_send::<Action>();
}

// ---- robustness -------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever a client sends — any round, task, nonce, example count or payload bytes, at any
    /// time — the engine answers without panicking, and an accepted update is always an honest one.
    #[test]
    fn arbitrary_updates_never_panic_the_engine(
        steps in proptest::collection::vec(
            (0u8..4, 0u64..4, any::<u64>(), any::<[u8; 16]>(), 0u64..50, proptest::collection::vec(any::<u8>(), 0..64), 0u64..200),
            1..20,
        )
    ) {
        let mut h = Harness::new(config());
        let t = enroll_all(&mut h, &["a", "b"]);
        for (who, round, task, nonce, examples, payload, secs) in steps {
            let name = ["a", "b", "c", "a"][who as usize];
            let base = &t[if name == "b" { "b" } else { "a" }];
            let mut u = honest(base);
            match who {
                0 => { u.round = Round(round); }
                1 => { u.task_id = TaskId(task % 8); u.nonce = Nonce(nonce); }
                2 => { u.examples = examples; }
                _ => {
                    // A valid digest over garbage: the decoder must refuse it on its own.
                    u.delta = EncodedDelta::seal(u.delta.config, payload.len() as u64, payload).unwrap();
                }
            }
            let now = Time::from_secs(secs.max(h.now.0.as_secs()));
            h.now = now;
            let r = h.send(name, u);
            for a in &r {
                if let Action::Ack { client, ack } = a {
                    prop_assert_eq!(&client.0, name);
                    prop_assert_eq!(ack.task_id, base.task_id);
                }
            }
        }
    }
}

// ---- federated evaluation -----------------------------------------------------------------------

fn eval_tasks(actions: &[Action]) -> BTreeMap<String, fedpool_common::wire::EvalTask> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendEval { client, task } => Some((client.0.clone(), (**task).clone())),
            _ => None,
        })
        .collect()
}

fn recorded_evals(actions: &[Action]) -> Vec<(Round, fedpool_server::round::EvalRecord)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RecordEval { round, eval } => Some((*round, eval.clone())),
            _ => None,
        })
        .collect()
}

fn report(
    task: &fedpool_common::wire::EvalTask,
    accuracy: f32,
    macro_f1: f32,
    examples: u64,
) -> fedpool_common::wire::EvalReport {
    fedpool_common::wire::EvalReport {
        round: task.round,
        task_id: task.task_id,
        metrics: fedpool_common::wire::EvalMetrics { accuracy, macro_f1, loss: 0.5, examples },
    }
}

fn send_report(h: &mut Harness, name: &str, r: fedpool_common::wire::EvalReport) -> Vec<Action> {
    h.event(Event::EvalReport { client: name.into(), report: r, wire_bytes: 60 })
}

fn eval_config() -> EngineConfig {
    EngineConfig { total_rounds: 2, eval_deadline: Some(Duration::from_secs(20)), ..config() }
}

#[test]
fn each_commit_is_evaluated_by_every_connected_client_before_the_next_round() {
    let mut h = Harness::new(eval_config());
    let t = enroll_all(&mut h, &["a", "b"]);
    h.enroll("c"); // connected but not selected (clients_per_round 2): it evaluates too
    h.at(1).send("a", honest(&t["a"]));
    let r = h.at(2).send("b", honest(&t["b"]));
    let committed = commits(&r)[0].pool.clone();
    let ev = eval_tasks(&r);
    assert_eq!(ev.keys().collect::<Vec<_>>(), ["a", "b", "c"], "every connected client is asked");
    assert!(tasks(&r).is_empty(), "round 2 waits for the evaluation");
    assert_eq!(h.engine.evaluating(), Some(Round(1)));
    // The evaluation carries the committed pool, and round 2's tasks will carry the same bytes.
    let e = &ev["a"];
    assert_eq!((e.round, e.deadline_ms), (Round(1), 20_000));
    let decoded = codec::decode(&e.global, &DecodeLimits::default()).unwrap();
    let mut pool = AdapterPool::zeros(&h.spec);
    pool.apply_delta(&decoded).unwrap();
    assert_eq!(pool.tensors, committed.tensors);

    // Weighted by examples: (100·0.9 + 300·0.5) / 400 = 0.6 accuracy.
    assert_eq!(acks(&send_report(&mut h, "a", report(&ev["a"], 0.9, 0.8, 100))), ["a"]);
    assert_eq!(acks(&send_report(&mut h, "b", report(&ev["b"], 0.5, 0.4, 300))), ["b"]);
    let r = send_report(&mut h, "c", report(&ev["c"], 0.6, 0.6, 0)); // zero examples: refused
    assert_eq!(rejects(&r)[0].1, RejectReason::Protocol);
    let r = h.at(25).tick(); // the deadline passes without c
    let rec = recorded_evals(&r);
    assert_eq!(rec.len(), 1);
    let (round, eval) = &rec[0];
    assert_eq!(*round, Round(1));
    assert!((eval.accuracy.unwrap() - 0.6).abs() < 1e-6, "{eval:?}");
    assert!((eval.macro_f1.unwrap() - 0.5).abs() < 1e-6, "{eval:?}");
    assert_eq!(eval.examples, 400);
    assert_eq!((eval.clients.clone(), eval.missing.clone()), (vec!["a".into(), "b".into()], vec!["c".to_string()]));
    assert!(eval.bytes_down > 3 * e.global.wire_len() as u64, "three task frames counted");
    let t2 = tasks(&r);
    assert_eq!(t2.len(), 2, "round 2 starts after the evaluation: {r:?}");
    assert_eq!(t2.values().next().unwrap().global, e.global, "the next round reuses the encoding");
}

#[test]
fn evaluation_reports_are_checked_and_the_last_round_finishes_after_its_evaluation() {
    let mut h = Harness::new(EngineConfig { total_rounds: 1, ..eval_config() });
    let t = enroll_all(&mut h, &["a", "b"]);
    h.at(1).send("a", honest(&t["a"]));
    let r = h.at(2).send("b", honest(&t["b"]));
    assert!(!r.iter().any(|a| matches!(a, Action::Finished)), "not finished before the evaluation");
    assert!(!h.engine.is_finished());
    let ev = eval_tasks(&r);
    let wrong_round = fedpool_common::wire::EvalReport { round: Round(7), ..report(&ev["a"], 0.5, 0.5, 10) };
    assert_eq!(rejects(&send_report(&mut h, "a", wrong_round))[0].1, RejectReason::WrongRound);
    assert_eq!(rejects(&send_report(&mut h, "a", report(&ev["b"], 0.5, 0.5, 10)))[0].1, RejectReason::UnknownTask);
    assert_eq!(rejects(&send_report(&mut h, "a", report(&ev["a"], f32::NAN, 0.5, 10)))[0].1, RejectReason::NonFinite);
    assert_eq!(rejects(&send_report(&mut h, "a", report(&ev["a"], 1.5, 0.5, 10)))[0].1, RejectReason::NonFinite);
    assert_eq!(acks(&send_report(&mut h, "a", report(&ev["a"], 0.5, 0.5, 10))), ["a"]);
    assert_eq!(rejects(&send_report(&mut h, "a", report(&ev["a"], 0.5, 0.5, 10)))[0].1, RejectReason::Duplicate);
    // b reconnects and gets its evaluation task again; its report completes the evaluation.
    h.event(Event::Lost { client: "b".into() });
    let again = eval_tasks(&h.at(3).enroll("b"));
    assert_eq!(again["b"].task_id, ev["b"].task_id);
    let r = send_report(&mut h, "b", report(&ev["b"], 0.7, 0.7, 10));
    assert_eq!(recorded_evals(&r).len(), 1);
    assert!(r.iter().any(|a| matches!(a, Action::Finished)), "{r:?}");
    assert!(h.engine.is_finished());
}

#[test]
fn a_restart_that_lost_an_evaluation_runs_it_before_the_next_round() {
    let mut h = Harness::resumed(eval_config(), Round(2), None);
    assert!(h.engine.is_finished(), "round 2 of 2 is committed");
    h.engine.resume_evaluation();
    assert!(!h.engine.is_finished());
    assert!(eval_tasks(&h.enroll("a")).is_empty(), "it waits for min_clients_to_start like a round");
    let r = h.enroll("b");
    let ev = eval_tasks(&r);
    assert_eq!(ev.keys().collect::<Vec<_>>(), ["a", "b"], "{r:?}");
    assert!(ev.values().all(|e| e.round == Round(2)));
    assert!(tasks(&r).is_empty(), "no round 3: the federation has run its 2 rounds");
    send_report(&mut h, "a", report(&ev["a"], 0.5, 0.5, 10));
    let r = send_report(&mut h, "b", report(&ev["b"], 0.5, 0.5, 10));
    assert_eq!(recorded_evals(&r)[0].0, Round(2));
    assert!(r.iter().any(|a| matches!(a, Action::Finished)));
}

// ---- determinism --------------------------------------------------------------------------------

/// An engine driven through a scripted federation, each update and report built from the
/// engine's own latest task.
struct Scripted {
    engine: Engine,
    actions: Vec<Action>,
    tasks: BTreeMap<String, RoundTask>,
    evals: BTreeMap<String, fedpool_common::wire::EvalTask>,
}

impl Scripted {
    fn event(&mut self, secs: u64, event: Event) {
        let r = self.engine.handle(Time::from_secs(secs), event);
        self.tasks.extend(tasks(&r));
        self.evals.extend(eval_tasks(&r));
        self.actions.extend(r);
    }

    fn update(&mut self, secs: u64, name: &str) {
        let update = honest(&self.tasks[name]);
        let wire_bytes = update.delta.wire_len() as u64 + 100;
        self.event(secs, Event::Update { client: name.into(), update, wire_bytes });
    }

    fn report(&mut self, secs: u64, name: &str) {
        let report = report(&self.evals[name], 0.5, 0.5, 10);
        self.event(secs, Event::EvalReport { client: name.into(), report, wire_bytes: 50 });
    }
}

/// Every action of a two-round federation with evaluation: a duplicate update, a missed quorum
/// and its retry, two commits, their evaluations, the finish.
fn scripted_run(engine: Engine) -> Vec<Action> {
    let mut s = Scripted { engine, actions: Vec::new(), tasks: BTreeMap::new(), evals: BTreeMap::new() };
    for name in ["a", "b", "c"] {
        s.event(0, Event::Enroll { client: name.into(), enroll: enroll_msg(&ssf_spec()) });
    }
    s.update(1, "a");
    s.update(1, "a"); // a duplicate
    s.event(61, Event::Tick); // the deadline passes below quorum: attempt 2, new tasks
    s.update(62, "a");
    s.update(62, "b"); // commit, then the evaluation
    for name in ["a", "b", "c"] {
        s.report(63, name); // the evaluation recorded, then round 2
    }
    s.update(64, "c");
    s.update(64, "a"); // commit, then the evaluation
    for name in ["a", "b", "c"] {
        s.report(65, name); // the evaluation recorded, then finished
    }
    s.actions
}

/// What would go on the wire for each action that is a message.
fn frames(actions: &[Action]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .filter_map(|a| {
            let message = match a {
                Action::Welcome { welcome, .. } => ServerMessage::Welcome(welcome.clone()),
                Action::SendTask { task, .. } => ServerMessage::Task(task.clone()),
                Action::SendEval { task, .. } => ServerMessage::EvalTask(task.clone()),
                Action::Ack { ack, .. } => ServerMessage::Ack(*ack),
                Action::Reject { reject, .. } => ServerMessage::Reject(reject.clone()),
                _ => return None,
            };
            Some(message.to_frame().unwrap())
        })
        .collect()
}

#[test]
fn engines_with_the_same_seeded_nonces_fed_the_same_events_act_byte_for_byte_alike() {
    let cfg = EngineConfig { over_selection: 1.5, min_clients_to_start: 3, ..eval_config() };
    let engine = || {
        let spec = ssf_spec();
        let (merge, _) = MeanMerge::new(&spec);
        let global = AdapterPool::init(&spec, 1).unwrap();
        Engine::new(cfg.clone(), spec, Box::new(merge), Round(0), global).unwrap()
    };
    let a = scripted_run(engine().with_nonces(SeededNonces::new(42)));
    let c = commits(&a);
    assert_eq!(c.iter().map(|c| (c.round, c.record.attempt)).collect::<Vec<_>>(), [(Round(1), 2), (Round(2), 1)]);
    assert_eq!(recorded_evals(&a).len(), 2);
    assert_eq!(rejects(&a).len(), 2, "the duplicate, and attempt 1's folded update not committed");
    assert_eq!(a.last(), Some(&Action::Finished), "the script runs to the end");

    let b = scripted_run(engine().with_nonces(SeededNonces::new(42)));
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_eq!(frames(&a), frames(&b));
    // The nonces are in those bytes: another seed, or the operating system's, gives others.
    assert_ne!(frames(&a), frames(&scripted_run(engine().with_nonces(SeededNonces::new(43)))));
    assert_ne!(frames(&scripted_run(engine())), frames(&scripted_run(engine())));
}

// ---- trust: the coordinator decides what an update weighs and bounds it (issue 16) -------------

fn enroll_claiming(h: &mut Harness, name: &str, examples: u64) -> Vec<Action> {
    let enroll = Enroll { examples, ..enroll_msg(&h.spec) };
    h.event(Event::Enroll { client: name.into(), enroll })
}

fn trusting(trust: TrustConfig) -> EngineConfig {
    EngineConfig { trust, ..config() }
}

#[test]
fn a_client_claiming_a_huge_example_count_weighs_no_more_than_the_cap() {
    let mut h = Harness::new(trusting(TrustConfig { max_examples_per_update: 1000, ..TrustConfig::default() }));
    let mut t = tasks(&enroll_claiming(&mut h, "honest", 100));
    t.extend(tasks(&enroll_claiming(&mut h, "liar", 1_000_000_000_000_000)));
    let spec = h.spec.clone();
    h.at(1).send("honest", update_with(&t["honest"], &spec, 0.01, 100, 1.0));
    let r = h.at(2).send("liar", update_with(&t["liar"], &spec, 0.01, 1_000_000_000_000_000, 1.0));
    assert_eq!(commits(&r).len(), 1, "{r:?}");
    assert_eq!(h.calls.lock().unwrap().folds, [100, 1000], "the liar's claim of 10^15 weighs the cap");
    assert_eq!(commits(&r)[0].record.examples, 1100);
}

#[test]
fn re_enrolling_cannot_raise_a_clients_weight_and_a_roster_weight_is_fixed() {
    let mut roster = BTreeMap::new();
    roster.insert("fixed".to_string(), RosterEntry::Weight(5));
    let mut h = Harness::new(trusting(TrustConfig { roster, ..TrustConfig::default() }));
    enroll_claiming(&mut h, "grower", 10);
    h.event(Event::Lost { client: "grower".into() });
    let mut t = tasks(&enroll_claiming(&mut h, "grower", 1_000_000));
    t.extend(tasks(&enroll_claiming(&mut h, "fixed", 100_000)));
    let spec = h.spec.clone();
    let r = h.at(1).send("grower", update_with(&t["grower"], &spec, 0.01, 1_000_000, 1.0));
    let (who, reason, detail) = &rejects(&r)[0];
    assert_eq!((who.as_str(), *reason), ("grower", RejectReason::InvalidDelta));
    assert!(detail.contains("declared 10 at its first enrollment"), "{detail}");
    h.at(2).send("fixed", update_with(&t["fixed"], &spec, 0.01, 100_000, 1.0));
    assert_eq!(h.calls.lock().unwrap().folds, [5], "the roster's weight, not the claim");
}

#[test]
fn a_second_enroll_on_a_live_connection_is_a_protocol_error() {
    let mut h = Harness::new(config());
    h.enroll("a");
    let r = h.enroll("a");
    let (who, reason, detail) = &rejects(&r)[0];
    assert_eq!((who.as_str(), *reason), ("a", RejectReason::Protocol));
    assert!(detail.contains("already enrolled on a live connection"), "{detail}");
    assert_eq!(drops(&r).len(), 1, "the connection is closed");
    assert!(!r.iter().any(|a| matches!(a, Action::Welcome { .. })), "no second welcome (and no second model copy)");
}

#[test]
fn an_update_with_huge_finite_values_is_refused_and_the_round_commits_with_the_honest_ones() {
    let mut h = Harness::new(EngineConfig { over_selection: 1.5, min_clients_to_start: 3, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "evil"]);
    let spec = h.spec.clone();
    let r = h.at(1).send("evil", update_with(&t["evil"], &spec, 1e30, 10, 1.0));
    let (_, reason, detail) = &rejects(&r)[0];
    assert_eq!(*reason, RejectReason::InvalidDelta);
    assert!(detail.contains("max_abs_value"), "{detail}");
    h.at(2).send("a", honest(&t["a"]));
    let r = h.at(3).send("b", honest(&t["b"]));
    let c = commits(&r);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].record.clients, ["a", "b"]);
    let worst = c[0].pool.tensors.values().flat_map(|t| t.data()).fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(worst < 10.0, "the committed pool is the honest clients' ({worst})");
}

#[test]
fn an_update_far_above_the_previous_rounds_median_norm_is_scaled_to_the_bound() {
    let factor = 3.0;
    let mut h = Harness::new(trusting(TrustConfig {
        norm_bound: NormBound::Median { factor, first_round: None },
        ..TrustConfig::default()
    }));
    let spec = h.spec.clone();
    let t = enroll_all(&mut h, &["a", "b"]);
    h.at(1).send("a", update_with(&t["a"], &spec, 0.01, 10, 1.0));
    let r = h.at(2).send("b", update_with(&t["b"], &spec, 0.01, 10, 1.0));
    let before = commits(&r)[0].pool.clone();
    let t = tasks(&r);
    h.at(3).send("a", update_with(&t["a"], &spec, 0.01, 10, 1.0));
    // ×1000 the honest update: scaled to 3× the median, so the pool moves by (0.01 + 0.03) / 2.
    let r = h.at(4).send("b", update_with(&t["b"], &spec, 10.0, 10, 1.0));
    let after = &commits(&r)[0].pool;
    let scale = "layer.0.output.ssf_scale";
    let moved = after.tensors[scale].row(0)[0] - before.tensors[scale].row(0)[0];
    assert!((moved - 0.02).abs() < 2e-3, "moved {moved}: the attack is bounded to 3× the median");
    // Without the bound the same attack moves the pool by (0.01 + 10) / 2.
    let mut off = Harness::new(trusting(TrustConfig { norm_bound: NormBound::Off, ..TrustConfig::default() }));
    let t = enroll_all(&mut off, &["a", "b"]);
    off.at(1).send("a", update_with(&t["a"], &spec, 0.01, 10, 1.0));
    let r = off.at(2).send("b", update_with(&t["b"], &spec, 10.0, 10, 1.0));
    let moved =
        commits(&r)[0].pool.tensors[scale].row(0)[0] - AdapterPool::init(&spec, 1).unwrap().tensors[scale].row(0)[0];
    assert!(moved > 4.0, "unbounded: {moved}");
}

#[test]
fn a_client_refused_too_often_is_quarantined_and_the_round_commits_without_it() {
    let trust = TrustConfig { strikes: 2, strike_window: 5, ..TrustConfig::default() };
    let mut h = Harness::new(EngineConfig { over_selection: 1.5, min_clients_to_start: 3, trust, ..config() });
    let t = enroll_all(&mut h, &["a", "b", "evil"]);
    let forged = |task: &RoundTask| Update { nonce: Nonce([9; 16]), ..honest(task) };
    let r = h.at(1).send("evil", forged(&t["evil"]));
    assert_eq!(rejects(&r)[0].1, RejectReason::WrongNonce);
    assert!(drops(&r).is_empty(), "one strike is not enough");
    let r = h.at(2).send("evil", forged(&t["evil"]));
    let reasons: Vec<RejectReason> = rejects(&r).iter().map(|r| r.1).collect();
    assert_eq!(reasons, [RejectReason::WrongNonce, RejectReason::Quarantined]);
    let (who, why) = &drops(&r)[0];
    assert_eq!(who, "evil");
    assert!(why.contains("quarantined for the rest of the run"), "{why}");
    assert_eq!(h.engine.quarantined().keys().collect::<Vec<_>>(), ["evil"]);
    // It cannot come back, nor can its genuine update count.
    let r = h.at(3).enroll("evil");
    assert_eq!(rejects(&r)[0].1, RejectReason::Quarantined);
    assert_eq!(rejects(&h.at(3).send("evil", honest(&t["evil"])))[0].1, RejectReason::Quarantined);
    h.at(4).send("a", honest(&t["a"]));
    let r = h.at(5).send("b", honest(&t["b"]));
    assert_eq!(commits(&r)[0].record.clients, ["a", "b"]);
}

#[test]
fn an_ack_is_sent_only_after_the_commit_and_an_abandoned_attempt_is_not_acknowledged() {
    let mut h = Harness::new(config());
    let t = enroll_all(&mut h, &["a", "b"]);
    let r = h.at(1).send("a", honest(&t["a"]));
    assert!(acks(&r).is_empty() && rejects(&r).is_empty(), "folded, not yet committed: no answer {r:?}");
    let r = h.at(2).send("b", honest(&t["b"]));
    let commit_at = r.iter().position(|a| matches!(a, Action::Commit(_))).unwrap();
    let ack_at: Vec<usize> =
        r.iter().enumerate().filter(|(_, a)| matches!(a, Action::Ack { .. })).map(|(i, _)| i).collect();
    assert_eq!(ack_at.len(), 2);
    assert!(ack_at.iter().all(|&i| i > commit_at), "acks come after the commit: {r:?}");

    // Round 2: one update folded, then the deadline passes below quorum.
    let t = tasks(&r);
    assert!(acks(&h.at(3).send("a", honest(&t["a"]))).is_empty());
    let r = h.at(200).tick();
    let (who, reason, detail) = &rejects(&r)[0];
    assert_eq!((who.as_str(), *reason), ("a", RejectReason::NotCommitted), "{r:?}");
    assert!(detail.contains("missed its quorum"), "{detail}");
    assert!(acks(&r).is_empty());
}

#[test]
fn the_evaluation_weight_is_capped_so_the_accuracy_stays_a_mean() {
    let trust = TrustConfig { max_examples_per_update: 1000, ..TrustConfig::default() };
    let mut h = Harness::new(EngineConfig { trust, ..eval_config() });
    let t = enroll_all(&mut h, &["a", "b"]);
    h.at(1).send("a", honest(&t["a"]));
    let ev = eval_tasks(&h.at(2).send("b", honest(&t["b"])));
    send_report(&mut h, "a", report(&ev["a"], 1.0, 1.0, u64::MAX));
    let r = send_report(&mut h, "b", report(&ev["b"], 0.0, 0.0, u64::MAX));
    let (_, eval) = &recorded_evals(&r)[0];
    assert_eq!(eval.examples, 2000, "each report weighs the cap");
    assert!((eval.accuracy.unwrap() - 0.5).abs() < 1e-9, "{eval:?}");
}

#[test]
fn a_resumed_engine_bounds_its_first_round_with_the_median_the_log_kept() {
    // The commit logs the median norm; an engine resumed with it bounds round 2's first update.
    let mut h = Harness::new(config());
    let spec = h.spec.clone();
    let t = enroll_all(&mut h, &["a", "b"]);
    h.at(1).send("a", update_with(&t["a"], &spec, 0.01, 10, 1.0));
    let r = h.at(2).send("b", update_with(&t["b"], &spec, 0.01, 10, 1.0));
    let c = commits(&r)[0];
    let median = c.record.median_update_norm.expect("the record carries the median norm");
    assert!(median > 0.0);
    let line = serde_json::to_string(&c.record).unwrap();
    let back: fedpool_server::round::RoundRecord = serde_json::from_str(&line).unwrap();
    assert_eq!(back.median_update_norm, Some(median), "it round-trips through rounds.jsonl");

    let (merge, calls) = MeanMerge::new(&spec);
    let engine = Engine::new(config(), spec.clone(), Box::new(merge), Round(1), c.pool.clone())
        .unwrap()
        .with_norm_median(Some(median));
    let mut resumed = Harness { engine, spec: spec.clone(), now: Time::ZERO, calls };
    let t = enroll_all(&mut resumed, &["a", "b"]);
    resumed.at(1).send("a", update_with(&t["a"], &spec, 0.01, 10, 1.0));
    let r = resumed.at(2).send("b", update_with(&t["b"], &spec, 10.0, 10, 1.0));
    let scale = "layer.0.output.ssf_scale";
    let moved = commits(&r)[0].pool.tensors[scale].row(0)[0] - c.pool.tensors[scale].row(0)[0];
    assert!(moved < 0.05, "the first round after a restart is bounded too: moved {moved}");
}
