//! The protocol's two sans-IO cores meeting with no sockets and a fake clock (quinn-proto's
//! `Pair` idea): the server's round `Engine` with the real aggregator and a rank planner, and
//! three client `Participant`s with a lossy upload codec. Training is a stand-in (a fixed nudge
//! of every value): what is tested is the protocol — tasks, grants, updates, acks, a refusal, a
//! reconnect — and what each client keeps of its residual.

use std::collections::BTreeMap;
use std::time::Duration;

use fedpool_client::participant::{LocalResult, MemoryResidual, Participant, ParticipantConfig};
use fedpool_client::train::{LoraVariant, TrainConfig};
use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolDelta, PoolSpec, TargetSpec};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits, ErrorFeedback, Quantization};
use fedpool_common::wire::{RejectReason, RoundTask, TrainMetrics, Update};
use fedpool_common::{BackboneFingerprint, Round, Sha256, TaskId};
use fedpool_server::aggregate::{AggregateConfig, Aggregator};
use fedpool_server::ranks::{RankPlanner, RankPolicy};
use fedpool_server::round::{Action, ClientId, Engine, EngineConfig, Event, Time, TrustConfig};

const GRANTED_RANK: usize = 2;
const MAX_RANK: usize = 4;

fn spec() -> PoolSpec {
    let targets =
        (0..2).map(|i| TargetSpec { name: format!("layer.{i}.attention.query"), dim_in: 6, dim_out: 6 }).collect();
    PoolSpec::adalora(targets, MAX_RANK, 8.0, Some(HeadSpec::new(6, 2)))
}

fn backbone() -> BackboneFingerprint {
    BackboneFingerprint(Sha256::of(b"pair-backbone"))
}

/// What the driver saw of one client's messages from the engine.
#[derive(Debug, Default)]
struct Inbox {
    tasks: Vec<RoundTask>,
    acks: Vec<TaskId>,
    rejects: Vec<(Option<TaskId>, RejectReason)>,
}

struct Pair {
    engine: Engine,
    participants: Vec<Participant>,
    inboxes: Vec<Inbox>,
    now: Time,
    commits: Vec<Round>,
    finished: bool,
}

impl Pair {
    fn new(clients: usize) -> Self {
        let spec = spec();
        let config = EngineConfig {
            total_rounds: 3,
            clients_per_round: clients,
            quorum: 2,
            over_selection: 1.0,
            min_clients_to_start: clients,
            deadline: Duration::from_secs(60),
            local_steps: 4,
            seed: 11,
            download_codec: CodecConfig::default(),
            decode_limits: DecodeLimits::for_spec(&spec),
            backbone: backbone(),
            heartbeat: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(1 << 20),
            eval_deadline: None,
            trust: TrustConfig::default(),
        };
        let merge = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
        let planner = RankPlanner::new(
            spec.clone(),
            RankPolicy::Fixed { rank: GRANTED_RANK },
            config.deadline,
            config.total_rounds,
            Duration::from_secs(1),
        )
        .unwrap();
        let global = AdapterPool::init(&spec, 3).unwrap();
        let engine = Engine::new(config, spec.clone(), Box::new(merge), Round(0), global).unwrap().with_ranks(planner);
        let upload = CodecConfig { top_k: Some(0.3), quantization: Quantization::F32, ..CodecConfig::default() };
        let participants = (0..clients)
            .map(|c| {
                let config = ParticipantConfig {
                    spec: spec.clone(),
                    backbone: backbone(),
                    examples: 10 * (c as u64 + 1),
                    seed: 100 + c as u64,
                    train: TrainConfig::default(),
                    lora_variant: LoraVariant::Both,
                    codec: upload.into(),
                    declared_upload_bps: Some(1_000_000),
                    declared_download_bps: Some(1_000_000),
                    software: "pair-test".into(),
                };
                Participant::new(config, Box::new(MemoryResidual::default()))
            })
            .collect();
        let inboxes = (0..clients).map(|_| Inbox::default()).collect();
        Self { engine, participants, inboxes, now: Time::ZERO, commits: Vec::new(), finished: false }
    }

    fn id(c: usize) -> ClientId {
        ClientId(format!("client-{c}"))
    }

    fn index(client: &ClientId) -> usize {
        client.0.trim_start_matches("client-").parse().unwrap()
    }

    /// Hands `event` to the engine and carries out its actions as a driver does: acks and
    /// refusals reach the participants, tasks wait in the inboxes.
    fn handle(&mut self, event: Event) {
        for action in self.engine.handle(self.now, event) {
            match action {
                Action::SendTask { client, task } => self.inboxes[Self::index(&client)].tasks.push(*task),
                Action::Ack { client, ack } => {
                    let c = Self::index(&client);
                    self.inboxes[c].acks.push(ack.task_id);
                    self.participants[c].on_ack(ack.task_id).unwrap();
                }
                Action::Reject { client, reject } => {
                    let c = Self::index(&client);
                    self.inboxes[c].rejects.push((reject.task_id, reject.reason));
                    self.participants[c].on_reject(reject.task_id).unwrap();
                }
                Action::Commit(commit) => self.commits.push(commit.round),
                Action::Finished => self.finished = true,
                Action::Fatal(e) => panic!("engine stopped: {e}"),
                Action::Welcome { .. } | Action::Drop { .. } | Action::SendEval { .. } | Action::RecordEval { .. } => {}
            }
        }
    }

    fn enroll(&mut self, c: usize) {
        let enroll = self.participants[c].enroll();
        self.handle(Event::Enroll { client: Self::id(c), enroll });
    }

    /// Client `c` takes its newest task, "trains" and returns the update it would send.
    fn train(&mut self, c: usize) -> (RoundTask, Update) {
        let task = self.inboxes[c].tasks.last().cloned().expect("a task");
        let p = &mut self.participants[c];
        let (start, config) = p.begin(&task).unwrap();
        assert_eq!(config.steps, task.local_steps as usize);
        let delta = nudge(&start, c, task.round);
        let metrics = TrainMetrics { loss: 0.5, accuracy: 0.5, steps: config.steps as u32, seconds: 1.0 };
        let update = p.finish(&task, LocalResult { delta, metrics, importance: Vec::new() }).unwrap();
        assert_eq!(p.staged(), Some(task.task_id), "the residual waits for the answer");
        (task, update)
    }

    fn send(&mut self, c: usize, update: Update) {
        let wire_bytes = update.delta.wire_len() as u64;
        self.handle(Event::Update { client: Self::id(c), update, wire_bytes });
    }

    fn residual(&mut self, c: usize) -> ErrorFeedback {
        self.participants[c].residual().unwrap()
    }
}

/// A stand-in for training: every value of the pool moves by a small amount that depends on the
/// client, the round and the position.
fn nudge(start: &AdapterPool, client: usize, round: Round) -> PoolDelta {
    let mut trained = start.clone();
    for t in trained.tensors.values_mut() {
        for (i, v) in t.data_mut().iter_mut().enumerate() {
            *v += 0.01 * (((i + 3 * client + 5 * round.0 as usize) % 7) as f32 - 3.0);
        }
    }
    trained.delta_from(start).unwrap()
}

fn ranks_sent(update: &Update) -> BTreeMap<String, usize> {
    let spec = spec();
    let delta = codec::decode(&update.delta, &DecodeLimits::for_spec(&spec)).unwrap();
    delta.lora_ranks(&spec)
}

#[test]
fn engine_and_participants_run_rounds_with_acks_a_refusal_a_reconnect_and_rank_grants() {
    let mut pair = Pair::new(3);
    for c in 0..3 {
        pair.enroll(c);
    }

    // Round 1: every client gets a task granting rank 2 of 4; its update carries only that.
    for c in 0..3 {
        let task = pair.inboxes[c].tasks.last().cloned().expect("round 1's task");
        assert_eq!(task.round, Round(1));
        assert!(task.granted_ranks().values().all(|&r| r == GRANTED_RANK), "{:?}", task.granted_ranks());
        let (_, update) = pair.train(c);
        assert!(ranks_sent(&update).values().all(|&r| r == GRANTED_RANK), "{:?}", ranks_sent(&update));
        assert!(pair.residual(c).tensors().is_empty(), "nothing acknowledged yet");
        pair.send(c, update);
        if c < 2 {
            // Folded, not yet committed: no ack, so the residual stays staged.
            assert!(pair.inboxes[c].acks.is_empty(), "client {c} is acknowledged only at the commit");
            assert_eq!(pair.participants[c].staged(), Some(task.task_id));
        }
    }
    assert_eq!(pair.commits, vec![Round(1)]);
    for c in 0..3 {
        assert_eq!(pair.inboxes[c].acks.len(), 1, "client {c}'s update is in the commit");
        assert_eq!(pair.participants[c].staged(), None);
        assert!(pair.residual(c).l2_norm() > 0.0, "top-30% left client {c} a residual");
    }
    let after_round_1: Vec<ErrorFeedback> = (0..3).map(|c| pair.residual(c)).collect();

    // Round 2. Client 0: accepted (acknowledged at the commit).
    let (_, update) = pair.train(0);
    pair.send(0, update);
    assert_eq!(pair.inboxes[0].acks.len(), 1);
    // Client 1 trains, loses its connection before uploading, enrolls again: the engine sends the
    // same task, and the result waiting for it is sent and accepted.
    let (task, update) = pair.train(1);
    pair.handle(Event::Lost { client: Pair::id(1) });
    pair.enroll(1);
    let resent = pair.inboxes[1].tasks.last().cloned().unwrap();
    assert_eq!((resent.task_id, resent.nonce), (task.task_id, task.nonce), "a reconnecting client gets its task again");
    assert_eq!(pair.participants[1].staged(), Some(task.task_id));
    pair.send(1, update);
    assert_eq!(pair.inboxes[1].acks.len(), 1, "folded; the ack waits for the commit");
    assert_eq!(pair.residual(1).tensors(), after_round_1[1].tensors(), "no ack, no new residual");
    // Client 2 trains but its update arrives after the deadline: the round commits without it and
    // the late update is refused; the client keeps the residual of round 1.
    let (task2, late) = pair.train(2);
    pair.now = pair.now + Duration::from_secs(61);
    pair.handle(Event::Tick);
    assert_eq!(pair.commits, vec![Round(1), Round(2)], "quorum 2 at the deadline");
    assert_eq!((pair.inboxes[0].acks.len(), pair.inboxes[1].acks.len()), (2, 2), "acknowledged by the commit");
    assert_ne!(pair.residual(1).tensors(), after_round_1[1].tensors(), "the ack replaced the residual");
    pair.send(2, late);
    assert_eq!(pair.inboxes[2].rejects.last(), Some(&(Some(task2.task_id), RejectReason::Late)));
    assert_eq!(pair.participants[2].staged(), None, "a refusal drops the staged residual");
    assert_eq!(pair.residual(2).tensors(), after_round_1[2].tensors(), "a refused update changes no residual");

    // Round 3: everyone, client 2 included, is accepted; the federation finishes.
    for c in 0..3 {
        let (task, update) = pair.train(c);
        assert_eq!(task.round, Round(3));
        pair.send(c, update);
    }
    assert_ne!(pair.residual(2).tensors(), after_round_1[2].tensors());
    assert_eq!(pair.commits, vec![Round(1), Round(2), Round(3)]);
    assert!(pair.finished);
    let start = AdapterPool::init(&spec(), 3).unwrap();
    assert_ne!(pair.engine.global(), &start, "the global learned");
}
