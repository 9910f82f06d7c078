//! Learning works: a few dozen steps on a tiny separable dataset reach high held-out accuracy,
//! for every adapter kind.

use crate::train_support;

use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{train, QueryCache, Silent, TrainConfig, TrainData};
use fedpool_common::adapter::{AdapterPool, InitOptions};
use train_support::{load, separable, tiny_model_dir};

fn held_out_accuracy(choice: AdapterChoice) -> f64 {
    let dir = tiny_model_dir(8);
    let model = load(dir.path());
    let all = separable(160, 2, 21);
    let (eval, train_rows) = all.split_at(40);
    let options = AdapterOptions { choice, pool_size: 6, top_k: 2, rank: 4, ..Default::default() };
    let spec = pool_spec(&BertConfig::tiny(), &options, 2).unwrap();
    let init =
        if choice.head_only() { InitOptions { ssf_std: 0.0, ..Default::default() } } else { InitOptions::default() };
    let start = AdapterPool::init_with(&spec, 3, &init).unwrap();
    let config = TrainConfig {
        steps: 60,
        batch_size: 16,
        lr: 3e-2,
        warmup_steps: 4,
        head_only: choice.head_only(),
        ..Default::default()
    };
    let data = TrainData { train: train_rows, eval, pad_id: 0 };
    let mut queries = QueryCache::new(BertConfig::tiny().hidden_size);
    let out = train(&model, &spec, &start, data, &mut queries, &config, &mut Silent).unwrap();
    assert_eq!(out.metrics.eval_examples, 40);
    assert!(out.metrics.train_loss.is_finite());
    out.metrics.accuracy
}

#[test]
fn ssf_pool_learns_a_separable_task() {
    let acc = held_out_accuracy(AdapterChoice::SsfPool);
    assert!(acc >= 0.9, "accuracy {acc}");
}

#[test]
fn plain_ssf_learns_a_separable_task() {
    let acc = held_out_accuracy(AdapterChoice::Ssf);
    assert!(acc >= 0.9, "accuracy {acc}");
}

#[test]
fn lora_learns_a_separable_task() {
    let acc = held_out_accuracy(AdapterChoice::Lora);
    assert!(acc >= 0.9, "accuracy {acc}");
}

#[test]
fn linear_probe_learns_a_separable_task() {
    let acc = held_out_accuracy(AdapterChoice::LinearProbe);
    assert!(acc >= 0.9, "accuracy {acc}");
}
