//! Standard LoRA's training options: one factor frozen (FFA-LoRA, RoLoRA) moves and uploads
//! only the other; the HF pooler head and dropout learn; AdaLoRA still learns.

use crate::train_support;

use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{train, LoraTrain, LoraVariant, QueryCache, Silent, TrainConfig, TrainData};
use fedpool_common::adapter::AdapterPool;
use fedpool_common::Pooling;
use train_support::{load, separable, tiny_model_dir};

fn run(options: AdapterOptions, config: TrainConfig) -> (AdapterPool, fedpool_client::train::TrainOutcome) {
    let dir = tiny_model_dir(8);
    let model = load(dir.path());
    let all = separable(160, 2, 21);
    let (eval, train_rows) = all.split_at(40);
    let spec = pool_spec(&BertConfig::tiny(), &options, 2).unwrap();
    let start = AdapterPool::init(&spec, 3).unwrap();
    let data = TrainData { train: train_rows, eval, pad_id: 0 };
    let mut queries = QueryCache::new(BertConfig::tiny().hidden_size);
    let out = train(&model, &spec, &start, data, &mut queries, &config, &mut Silent).unwrap();
    (start, out)
}

fn lora(pooling: Pooling) -> AdapterOptions {
    AdapterOptions { choice: AdapterChoice::Lora, rank: 4, pooling, ..Default::default() }
}

fn config() -> TrainConfig {
    TrainConfig { steps: 60, batch_size: 16, lr: 3e-2, warmup_steps: 4, ..Default::default() }
}

#[test]
fn a_frozen_factor_does_not_move_and_is_not_uploaded() {
    for (lora_train, frozen, moving) in [(LoraTrain::BOnly, "lora_A", "lora_B"), (LoraTrain::AOnly, "lora_B", "lora_A")]
    {
        // No weight decay here: it would shrink a factor with no gradient.
        let (start, out) =
            run(lora(Pooling::Mean), TrainConfig { steps: 8, lora_train, weight_decay: 0.0, ..config() });
        for (name, t) in &out.pool.tensors {
            if name.contains(frozen) {
                assert_eq!(t, &start.tensors[name], "{lora_train:?}: {name} is frozen");
                assert!(!out.delta.tensors.contains_key(name), "{lora_train:?}: {name} is not uploaded");
            }
        }
        let moved = out.delta.tensors.iter().any(|(n, t)| n.contains(moving) && t.l2_norm() > 0.0);
        // With B = 0 at the start, A alone gets no gradient: nothing moves but the head.
        assert_eq!(moved, lora_train == LoraTrain::BOnly, "{lora_train:?}: {moving} moved");
        assert!(out.delta.tensors.contains_key(fedpool_common::adapter::HEAD_WEIGHT), "the head always trains");
    }
}

#[test]
fn the_variants_choose_factors_by_round() {
    use LoraTrain::*;
    let by_round = |v: LoraVariant| (1..=4).map(|r| v.factors(r)).collect::<Vec<_>>();
    assert_eq!(by_round(LoraVariant::Both), [Both, Both, Both, Both]);
    assert_eq!(by_round(LoraVariant::Ffa), [BOnly, BOnly, BOnly, BOnly]);
    assert_eq!(by_round(LoraVariant::RoLora), [BOnly, AOnly, BOnly, AOnly]);
    assert_eq!("rolora".parse::<LoraVariant>(), Ok(LoraVariant::RoLora));
    assert!("lora-fa".parse::<LoraVariant>().unwrap_err().contains("ffa"));
}

#[test]
fn standard_lora_with_the_hf_pooler_head_and_dropout_learns() {
    let (_, out) = run(lora(Pooling::ClsPooler), TrainConfig { dropout: Some(0.1), ..config() });
    assert!(out.metrics.accuracy >= 0.9, "accuracy {}", out.metrics.accuracy);
    let (_, ffa) = run(lora(Pooling::Mean), TrainConfig { lora_train: LoraTrain::BOnly, ..config() });
    assert!(ffa.metrics.accuracy >= 0.9, "FFA-LoRA accuracy {}", ffa.metrics.accuracy);
    let ada = AdapterOptions { choice: AdapterChoice::AdaLora, ..lora(Pooling::Mean) };
    let (_, out) = run(ada, config());
    assert!(out.metrics.accuracy >= 0.9, "AdaLoRA accuracy {}", out.metrics.accuracy);
}

#[test]
fn dropout_changes_training_and_is_deterministic_in_the_seed() {
    let with =
        |p: f64, seed: u64| run(lora(Pooling::Mean), TrainConfig { steps: 6, dropout: Some(p), seed, ..config() }).1;
    let (a, b) = (with(0.3, 1), with(0.3, 1));
    assert_eq!(a.pool, b.pool, "same seed, same masks");
    assert_ne!(with(0.3, 2).pool, a.pool, "another seed, other masks");
    assert_ne!(with(0.0, 1).pool, a.pool, "dropout acts");
    let bad = TrainConfig { dropout: Some(1.0), ..config() };
    let dir = tiny_model_dir(8);
    let model = load(dir.path());
    let spec = pool_spec(&BertConfig::tiny(), &lora(Pooling::Mean), 2).unwrap();
    let start = AdapterPool::init(&spec, 3).unwrap();
    let rows = separable(16, 2, 1);
    let data = TrainData { train: &rows, eval: &[], pad_id: 0 };
    let err = train(&model, &spec, &start, data, &mut QueryCache::new(32), &bad, &mut Silent).unwrap_err();
    assert!(err.to_string().contains("dropout"), "{err}");
}
