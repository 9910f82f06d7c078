//! Slot usage of an SSF pool: counts sum to examples × k, and the upload carries exactly the
//! used slots and validates against the spec.

use crate::train_support;

use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{train, QueryCache, Silent, TrainConfig, TrainData};
use fedpool_common::adapter::{AdapterPool, KEYS};
use train_support::{load, separable, tiny_model_dir};

#[test]
fn restricted_delta_validates_and_usage_sums_to_examples_times_k() {
    let dir = tiny_model_dir(2);
    let model = load(dir.path());
    let (pool_size, k) = (10, 3);
    let options = AdapterOptions { choice: AdapterChoice::SsfPool, pool_size, top_k: k, ..Default::default() };
    let spec = pool_spec(&BertConfig::tiny(), &options, 2).unwrap();
    let start = AdapterPool::init(&spec, 4).unwrap();
    let examples = separable(48, 2, 8);
    let (eval, train_rows) = examples.split_at(16);
    // One epoch exactly: 4 steps × 8 = 32 training examples, each seen once.
    let config = TrainConfig { steps: 4, batch_size: 8, lr: 1e-2, warmup_steps: 0, ..Default::default() };
    let data = TrainData { train: train_rows, eval, pad_id: 0 };
    let out = train(&model, &spec, &start, data, &mut QueryCache::new(32), &config, &mut Silent).unwrap();

    let usage = out.usage.clone().unwrap();
    assert_eq!(usage.counts.iter().sum::<u64>(), (train_rows.len() * k) as u64);
    let report = out.slot_usage.clone().unwrap();
    assert_eq!(report.counts.iter().sum::<u64>(), (train_rows.len() * k) as u64);
    assert_eq!(report.eval_counts.iter().sum::<u64>(), (eval.len() * k) as u64);
    assert_eq!(report.used_slots, usage.slots.len());
    assert!(report.entropy_bits > 0.0 && report.entropy_bits <= report.max_entropy_bits + 1e-12);

    out.delta.validate(&spec).unwrap();
    assert_eq!(out.delta.slots.as_ref(), Some(&usage));
    assert_eq!(out.delta.tensors[KEYS].shape(), &[usage.slots.len(), 32]);
    // Unused slots did not move.
    for slot in (0..pool_size as u32).filter(|s| !usage.slots.contains(s)) {
        for (name, t) in &out.pool.tensors {
            assert_eq!(t.row(slot as usize), start.tensors[name].row(slot as usize), "{name} slot {slot}");
        }
    }
    // Applying the upload to the start pool gives the trained pool.
    let mut rebuilt = start.clone();
    rebuilt.apply_delta(&out.delta).unwrap();
    for (name, t) in &out.pool.tensors {
        let d: f32 = t.data().iter().zip(rebuilt.tensors[name].data()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d < 1e-6, "{name}: {d}");
    }
}

#[test]
fn usage_counts_examples_not_visits_over_several_epochs() {
    // Three epochs: each example is counted once (its last selection), so every count is at most
    // the number of examples and the sum is examples × k — what the server's merge accepts.
    let dir = tiny_model_dir(2);
    let model = load(dir.path());
    let options = AdapterOptions { choice: AdapterChoice::SsfPool, pool_size: 6, top_k: 2, ..Default::default() };
    let spec = pool_spec(&BertConfig::tiny(), &options, 2).unwrap();
    let start = AdapterPool::init(&spec, 5).unwrap();
    let examples = separable(32, 2, 8);
    let (eval, train_rows) = examples.split_at(8);
    let config = TrainConfig { steps: 9, batch_size: 8, lr: 1e-2, warmup_steps: 0, ..Default::default() };
    let data = TrainData { train: train_rows, eval, pad_id: 0 };
    let out = train(&model, &spec, &start, data, &mut QueryCache::new(32), &config, &mut Silent).unwrap();
    let usage = out.usage.unwrap();
    assert_eq!(usage.counts.iter().sum::<u64>(), (train_rows.len() * 2) as u64);
    assert!(usage.counts.iter().all(|&c| c <= train_rows.len() as u64), "{:?}", usage.counts);
}
