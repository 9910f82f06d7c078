//! The ungranted-triplet rule, on the client: under a task's rank budget of `r < max_rank` the
//! client trains the rank-`r` truncation of the global (as HetLoRA and FlexLoRA do). The global it
//! rebuilds has triplets `≥ r` exactly zero, they are still exactly zero after local training
//! (a zero triplet has a zero gradient: `P_i λ_i Q_i` with all three zero; AdaLoRA's
//! orthogonality term and the decoupled weight decay keep a zero row zero), and the update
//! carries exactly `r` triplets per target. They are not frozen at the global's values.

use std::collections::BTreeMap;

use fedpool_client::data::Example;
use fedpool_client::device::DeviceChoice;
use fedpool_client::learner::{Examples, Learner};
use fedpool_client::participant::{LocalResult, MemoryResidual, Participant, ParticipantConfig};
use fedpool_client::setup::Backbone;
use fedpool_client::spec::{AdapterChoice, AdapterOptions};
use fedpool_client::testkit;
use fedpool_client::train::{LoraVariant, QueryCache, TrainConfig};
use fedpool_common::adapter::{AdapterKind, AdapterPool, PoolSpec};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits};
use fedpool_common::wire::{RoundTask, TargetBudget, TrainMetrics};
use fedpool_common::{Nonce, Round, TaskId};

const MAX_RANK: usize = 4;
const GRANT: usize = 2;

/// The values of triplet `i` of `target` in `pool`: row `i` of `A`, row `i` of `E` (AdaLoRA) and
/// column `i` of `B`.
fn triplet(spec: &PoolSpec, pool: &AdapterPool, target: &str, i: usize) -> Vec<f32> {
    let a = &pool.tensors[&format!("{target}.lora_A.weight")];
    let b = &pool.tensors[&format!("{target}.lora_B.weight")];
    let (rank, d_in) = (a.shape()[0], a.shape()[1]);
    assert_eq!(rank, spec.max_rank, "a pool holds every triplet");
    let mut out = a.data()[i * d_in..(i + 1) * d_in].to_vec();
    if spec.kind == AdapterKind::AdaLora {
        out.push(pool.tensors[&format!("{target}.lora_E.weight")].data()[i]);
    }
    out.extend(b.data().chunks(rank).map(|row| row[i]));
    out
}

/// A global as after some rounds: every value of every LoRA factor moved off its initialisation
/// (standard LoRA's zero `B` and AdaLoRA's zero `E` included), so that no triplet is zero.
fn live_global(spec: &PoolSpec) -> AdapterPool {
    let mut pool = AdapterPool::init(spec, 17).unwrap();
    for (name, t) in pool.tensors.iter_mut() {
        if name.contains(".lora_") {
            for (k, v) in t.data_mut().iter_mut().enumerate() {
                *v += 0.02 * ((k % 7) as f32 - 3.0) + 0.01;
            }
        }
    }
    for target in &spec.targets {
        for i in 0..spec.max_rank {
            assert!(triplet(spec, &pool, &target.name, i).iter().any(|&v| v != 0.0), "{} {i} is live", target.name);
        }
    }
    pool
}

/// Trains one task granting `GRANT` of `MAX_RANK` triplets on every target, through the
/// participant (decode, train, cut, encode) as the daemon does, and checks the rule.
fn ungranted_triplets_stay_zero(choice: AdapterChoice) {
    let dir = tempfile::tempdir().unwrap();
    testkit::write_tiny_model(dir.path(), 11).unwrap();
    let backbone = Backbone::load(dir.path(), DeviceChoice::Cpu, 64).unwrap();
    let spec = backbone.pool_spec(&AdapterOptions { choice, rank: MAX_RANK, ..Default::default() }, 2).unwrap();
    assert!(spec.kind.is_lora() && spec.max_rank == MAX_RANK, "{spec:?}");
    let examples: Vec<Example> = testkit::separable_texts(32, 2, 5)
        .into_iter()
        .map(|(id, text, label)| Example { id, text, label, group: None })
        .collect();
    let rows = Examples::Encoded(backbone.encode(&examples).unwrap());
    let fingerprint = backbone.fingerprint;
    let learner = Learner::Encoder(Box::new(backbone));

    // The task as the server sends it: the global truncated to the grant.
    let global = live_global(&spec);
    let grant: BTreeMap<String, usize> = spec.targets.iter().map(|t| (t.name.clone(), GRANT)).collect();
    let truncated = global.to_transfer(&spec).unwrap().truncate_lora(&spec, &grant).unwrap();
    let task = RoundTask {
        round: Round(3),
        task_id: TaskId(7),
        nonce: Nonce([7; 16]),
        global: codec::encode(&truncated, &CodecConfig::default(), None, 0).unwrap(),
        local_steps: 4,
        rank_budget: spec.targets.iter().map(|t| TargetBudget { target: t.name.clone(), rank: GRANT as u32 }).collect(),
        deadline_ms: 60_000,
    };
    let mut participant = Participant::new(
        ParticipantConfig {
            spec: spec.clone(),
            backbone: fingerprint,
            examples: rows.len() as u64,
            seed: 3,
            train: TrainConfig { batch_size: 8, lr: 1e-2, warmup_steps: 0, ..Default::default() },
            lora_variant: LoraVariant::Both,
            codec: CodecConfig::default().into(),
            declared_upload_bps: None,
            declared_download_bps: None,
            software: "ungranted-triplets-test".into(),
        },
        Box::new(MemoryResidual::default()),
    );

    // What the client trains from: the granted triplets are the global's, the others zero.
    let (start, config) = participant.begin(&task).unwrap();
    for t in &spec.targets {
        for i in 0..MAX_RANK {
            let got = triplet(&spec, &start, &t.name, i);
            if i < GRANT {
                assert_eq!(got, triplet(&spec, &global, &t.name, i), "{} triplet {i}: the global's", t.name);
            } else {
                assert!(got.iter().all(|&v| v == 0.0), "{} triplet {i} of the start is zero: {got:?}", t.name);
            }
        }
    }

    let mut queries = QueryCache::new(learner.hidden_size());
    let outcome = learner.train(&spec, &start, &rows, &mut queries, &config).unwrap();
    assert_eq!(outcome.metrics.steps, 4);
    let mut moved = 0;
    for t in &spec.targets {
        for i in 0..MAX_RANK {
            let (before, after) = (triplet(&spec, &start, &t.name, i), triplet(&spec, &outcome.pool, &t.name, i));
            if i < GRANT {
                moved += usize::from(before != after);
            } else {
                assert!(after.iter().all(|&v| v == 0.0), "{} triplet {i} stayed zero in training: {after:?}", t.name);
            }
        }
    }
    assert_eq!(moved, spec.targets.len() * GRANT, "every granted triplet trained");
    // AdaLoRA's scores of a zero triplet are zero (its sensitivity |w·∇w| is 0).
    if spec.kind == AdapterKind::AdaLora {
        assert_eq!(outcome.importance.len(), spec.targets.len());
    }
    for imp in &outcome.importance {
        assert!(imp.scores[GRANT..].iter().all(|&s| s == 0.0), "{imp:?}");
        assert!(imp.scores[..GRANT].iter().any(|&s| s > 0.0), "{imp:?}");
    }

    // The update carries exactly the granted triplets of every target.
    let metrics = TrainMetrics { loss: 0.5, accuracy: 0.5, steps: 4, seconds: 1.0 };
    let update = participant
        .finish(&task, LocalResult { delta: outcome.delta, metrics, importance: outcome.importance })
        .unwrap();
    let sent = codec::decode(&update.delta, &DecodeLimits::for_spec(&spec)).unwrap();
    assert_eq!(sent.lora_ranks(&spec), grant);
    // Only the granted triplets' scores go up: the others were not trained, so the planner's
    // mean over clients must not count their zeros.
    for imp in &update.importance {
        assert_eq!(imp.scores.len(), GRANT, "{imp:?}");
    }
    for t in &spec.targets {
        let shape = |factor: &str| sent.tensors[&format!("{}.{factor}.weight", t.name)].shape().to_vec();
        assert_eq!(shape("lora_A"), vec![GRANT, t.dim_in]);
        assert_eq!(shape("lora_B"), vec![t.dim_out, GRANT]);
        if spec.kind == AdapterKind::AdaLora {
            assert_eq!(shape("lora_E"), vec![GRANT, 1]);
        }
    }
}

#[test]
fn adalora_triplets_outside_the_grant_are_zero_before_and_after_training_and_never_uploaded() {
    ungranted_triplets_stay_zero(AdapterChoice::AdaLora);
}

#[test]
fn standard_lora_pairs_outside_the_grant_are_zero_before_and_after_training_and_never_uploaded() {
    ungranted_triplets_stay_zero(AdapterChoice::Lora);
}
