//! Rank grants at the round engine, driven with a fake clock, the real aggregator and a rank
//! planner: each task carries the global truncated to its grant; an update with a LoRA rank above
//! its task's grant is refused as `InvalidDelta` (the client's own grant counts, not another
//! client's) while the round commits with the clients that uploaded exactly their grant.

use std::collections::BTreeMap;
use std::time::Duration;

use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolSpec, TargetSpec};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits};
use fedpool_common::wire::{Enroll, RejectReason, RoundTask, TargetBudget, TrainMetrics, Update, PROTOCOL_VERSION};
use fedpool_common::{BackboneFingerprint, Round, Sha256};
use fedpool_server::aggregate::{AggregateConfig, Aggregator};
use fedpool_server::ranks::{RankClass, RankPlanner, RankPolicy};
use fedpool_server::round::{Action, Commit, Engine, EngineConfig, Event, SeededNonces, Time, TrustConfig};

use crate::round_engine::{acks, rejects};

const MAX_RANK: usize = 4;
const QUERY: &str = "layer.0.query";
const VALUE: &str = "layer.0.value";

fn spec() -> PoolSpec {
    let targets = [QUERY, VALUE].iter().map(|n| TargetSpec { name: n.to_string(), dim_in: 4, dim_out: 4 }).collect();
    PoolSpec::adalora(targets, MAX_RANK, 8.0, Some(HeadSpec::new(4, 2)))
}

fn backbone() -> BackboneFingerprint {
    BackboneFingerprint(Sha256::of(b"rank-grants"))
}

/// An engine for `clients` clients (all selected, quorum 2) granting ranks by `policy`.
fn engine(policy: RankPolicy, clients: usize) -> Engine {
    let spec = spec();
    let config = EngineConfig {
        total_rounds: 2,
        clients_per_round: clients,
        quorum: 2,
        over_selection: 1.0,
        min_clients_to_start: clients,
        deadline: Duration::from_secs(60),
        local_steps: 3,
        seed: 5,
        download_codec: CodecConfig::default(),
        decode_limits: DecodeLimits::for_spec(&spec),
        backbone: backbone(),
        heartbeat: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(1 << 20),
        eval_deadline: None,
        trust: TrustConfig::default(),
    };
    let merge = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    let planner =
        RankPlanner::new(spec.clone(), policy, config.deadline, config.total_rounds, Duration::from_secs(1)).unwrap();
    let global = AdapterPool::init(&spec, 3).unwrap();
    Engine::new(config, spec, Box::new(merge), Round(0), global)
        .unwrap()
        .with_ranks(planner)
        .with_nonces(SeededNonces::new(9))
}

fn enroll(engine: &mut Engine, name: &str, upload_bps: u64) -> Vec<Action> {
    let enroll = Enroll {
        protocol_version: PROTOCOL_VERSION,
        backbone: backbone(),
        spec_hash: spec().hash(),
        declared_upload_bps: Some(upload_bps),
        declared_download_bps: None,
        examples: 10,
        software: "rank-grants-test".into(),
    };
    engine.handle(Time::ZERO, Event::Enroll { client: name.into(), enroll })
}

/// Enrolls `clients` (name, declared upload bytes/s); returns the tasks sent, by client.
fn enroll_all(engine: &mut Engine, clients: &[(&str, u64)]) -> BTreeMap<String, RoundTask> {
    let mut tasks = BTreeMap::new();
    for (name, bps) in clients {
        for action in enroll(engine, name, *bps) {
            if let Action::SendTask { client, task } = action {
                tasks.insert(client.0, *task);
            }
        }
    }
    assert_eq!(tasks.len(), clients.len(), "every client got a task: {tasks:?}");
    tasks
}

/// The ranks of a task's grant, by target.
fn granted(task: &RoundTask) -> BTreeMap<String, usize> {
    task.granted_ranks()
}

fn ranks(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(t, r)| (t.to_string(), *r)).collect()
}

/// What a client "trains" from its task: every value of the global it rebuilds moves by a small
/// amount (including the zero triplets it was not granted), and it uploads the delta cut to
/// `upload` ranks.
fn update(task: &RoundTask, upload: &BTreeMap<String, usize>) -> Update {
    let spec = spec();
    let sent = codec::decode(&task.global, &DecodeLimits::for_spec(&spec)).unwrap();
    let start = AdapterPool::from_transfer(&sent, &spec).unwrap();
    let mut trained = start.clone();
    for t in trained.tensors.values_mut() {
        for (i, v) in t.data_mut().iter_mut().enumerate() {
            *v += 0.01 * ((i % 5) as f32 - 2.0);
        }
    }
    let delta = trained.delta_from(&start).unwrap().truncate_lora(&spec, upload).unwrap();
    assert_eq!(&delta.lora_ranks(&spec), upload, "the update carries the ranks asked for");
    Update {
        round: task.round,
        task_id: task.task_id,
        nonce: task.nonce,
        examples: 10,
        delta: codec::encode(&delta, &CodecConfig::default(), None, 1).unwrap(),
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.5, steps: 3, seconds: 1.0 },
        importance: Vec::new(),
    }
}

fn send(engine: &mut Engine, name: &str, update: Update) -> Vec<Action> {
    let wire_bytes = update.delta.wire_len() as u64;
    engine.handle(Time::from_secs(1), Event::Update { client: name.into(), update, wire_bytes })
}

fn commit(actions: &[Action]) -> Option<&Commit> {
    actions.iter().find_map(|a| match a {
        Action::Commit(c) => Some(c.as_ref()),
        _ => None,
    })
}

/// Sends `update` and checks it is refused as `InvalidDelta` with a detail containing `detail`,
/// and that nothing commits.
fn assert_refused(engine: &mut Engine, name: &str, update: Update, detail: &str) {
    let actions = send(engine, name, update);
    let got = rejects(&actions);
    assert_eq!(got.len(), 1, "{actions:?}");
    assert_eq!((got[0].0.as_str(), got[0].1), (name, RejectReason::InvalidDelta), "{got:?}");
    assert!(got[0].2.contains(detail), "detail {:?} should contain {detail:?}", got[0].2);
    assert!(commit(&actions).is_none(), "a refusal commits nothing");
}

#[test]
fn an_update_above_its_rank_grant_is_refused_as_invalid_and_the_round_commits_with_the_honest_clients() {
    let mut engine = engine(RankPolicy::Fixed { rank: 2 }, 4);
    let clients =
        [("honest-a", 1_000_000), ("honest-b", 1_000_000), ("greedy", 1_000_000), ("ignores-grant", 1_000_000)];
    let tasks = enroll_all(&mut engine, &clients);
    let spec = spec();
    let grant = ranks(&[(QUERY, 2), (VALUE, 2)]);
    for (client, task) in &tasks {
        assert_eq!(
            task.rank_budget,
            vec![TargetBudget { target: QUERY.into(), rank: 2 }, TargetBudget { target: VALUE.into(), rank: 2 }],
            "{client}"
        );
        let sent = codec::decode(&task.global, &DecodeLimits::for_spec(&spec)).unwrap();
        assert_eq!(sent.lora_ranks(&spec), grant, "{client}'s task carries only the granted triplets");
    }

    // One triplet too many on one target.
    let greedy = update(&tasks["greedy"], &ranks(&[(QUERY, 3), (VALUE, 2)]));
    assert_refused(&mut engine, "greedy", greedy, "rank 3 on LoRA target \"layer.0.query\", but the task granted 2");
    // Every triplet of the spec, the grant ignored.
    let whole = update(&tasks["ignores-grant"], &ranks(&[(QUERY, MAX_RANK), (VALUE, MAX_RANK)]));
    assert_refused(&mut engine, "ignores-grant", whole, "rank 4 on LoRA target");

    // Exactly the grant: accepted (no refusal), acknowledged at the commit.
    let first = send(&mut engine, "honest-a", update(&tasks["honest-a"], &grant));
    assert!(rejects(&first).is_empty() && commit(&first).is_none(), "{first:?}");
    let last = send(&mut engine, "honest-b", update(&tasks["honest-b"], &grant));
    assert!(rejects(&last).is_empty(), "{last:?}");
    let commit = commit(&last).expect("every selected client answered, two accepted: the round commits");
    assert_eq!(commit.round, Round(1));
    let mut folded = commit.record.clients.clone();
    folded.sort();
    assert_eq!(folded, vec!["honest-a".to_string(), "honest-b".to_string()]);
    assert_eq!(commit.record.rejected, BTreeMap::from([("InvalidDelta".to_string(), 2)]));
    let mut acked = acks(&last);
    acked.sort();
    assert_eq!(acked, vec!["honest-a".to_string(), "honest-b".to_string()], "only the accepted are acknowledged");
    assert_ne!(&commit.pool, &AdapterPool::init(&spec, 3).unwrap(), "the honest updates moved the global");

    // The refused task is closed: a compliant retry of it is a duplicate, not a second chance.
    let retry = update(&tasks["greedy"], &grant);
    let after = send(&mut engine, "greedy", retry);
    let refused = rejects(&after);
    assert_eq!(refused.len(), 1, "{after:?}");
    assert_eq!(refused[0].1, RejectReason::Duplicate, "{refused:?}");
}

#[test]
fn the_grant_checked_is_the_clients_own_so_a_slow_clients_rank_three_is_refused_where_a_fast_clients_is_accepted() {
    let classes = vec![RankClass { min_upload_bps: 1_000_000.0, rank: 3 }, RankClass { min_upload_bps: 0.0, rank: 1 }];
    let mut engine = engine(RankPolicy::Classes { classes }, 3);
    let tasks = enroll_all(&mut engine, &[("fast", 2_000_000), ("slow", 10_000), ("slow-greedy", 10_000)]);
    let spec = spec();
    let (three, one) = (ranks(&[(QUERY, 3), (VALUE, 3)]), ranks(&[(QUERY, 1), (VALUE, 1)]));
    assert_eq!(granted(&tasks["fast"]), three);
    assert_eq!(granted(&tasks["slow"]), one);
    assert_eq!(granted(&tasks["slow-greedy"]), one);
    for (client, want) in [("fast", &three), ("slow", &one)] {
        let sent = codec::decode(&tasks[client].global, &DecodeLimits::for_spec(&spec)).unwrap();
        assert_eq!(&sent.lora_ranks(&spec), want, "{client}'s global is cut to its own grant");
    }

    // The slow client uploads what the fast one may: refused, naming its own grant.
    let greedy = update(&tasks["slow-greedy"], &three);
    assert_refused(
        &mut engine,
        "slow-greedy",
        greedy,
        "rank 3 on LoRA target \"layer.0.query\", but the task granted 1",
    );

    let fast = send(&mut engine, "fast", update(&tasks["fast"], &three));
    assert!(rejects(&fast).is_empty(), "the fast client's rank 3 is its grant: {fast:?}");
    let slow = send(&mut engine, "slow", update(&tasks["slow"], &one));
    assert!(rejects(&slow).is_empty(), "{slow:?}");
    let commit = commit(&slow).expect("the round commits with fast and slow");
    let mut folded = commit.record.clients.clone();
    folded.sort();
    assert_eq!(folded, vec!["fast".to_string(), "slow".to_string()]);
    assert_eq!(commit.record.rejected, BTreeMap::from([("InvalidDelta".to_string(), 1)]));
}
