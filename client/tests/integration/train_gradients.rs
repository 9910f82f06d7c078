//! Training changes only adapters: every trainable tensor gets a gradient, the backbone does not
//! change.

use crate::train_support;

use std::collections::BTreeMap;

use candle_core::Device;
use fedpool_client::model::{BertConfig, Hooks};
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{
    forward, orthogonality, train, Batch, Encoded, QueryCache, Silent, TrainConfig, TrainData, TrainableParams,
    FEDINS_LAMBDA,
};
use fedpool_common::adapter::AdapterPool;
use train_support::{load, separable, tiny_model_dir};

/// Non-zero gradient norms of every trainable tensor after one backward pass on a random batch.
fn gradient_norms(choice: AdapterChoice) -> BTreeMap<String, f32> {
    let dir = tiny_model_dir(4);
    let model = load(dir.path());
    let options = AdapterOptions { choice, pool_size: 6, top_k: 2, rank: 4, ..Default::default() };
    let spec = pool_spec(&BertConfig::tiny(), &options, 3).unwrap();
    let pool = AdapterPool::init(&spec, 2).unwrap();
    let params = TrainableParams::new(&pool, choice.head_only(), &Device::Cpu).unwrap();
    // AdaLoRA starts with λ = 0, which zeroes the gradients of P and Q: start from a non-zero λ.
    for name in params.trainable_names().iter().filter(|n| n.ends_with("lora_E.weight")) {
        let var = params.var(name).unwrap();
        var.set(&var.as_tensor().ones_like().unwrap()).unwrap();
    }
    // Standard LoRA starts with B = 0, which zeroes A's gradient: start from a non-zero B.
    if choice == AdapterChoice::Lora {
        for name in params.trainable_names().iter().filter(|n| n.ends_with("lora_B.weight")) {
            let var = params.var(name).unwrap();
            var.set(&(var.as_tensor().ones_like().unwrap() * 0.1).unwrap()).unwrap();
        }
    }
    let examples = separable(12, 3, 9);
    let mut queries = QueryCache::new(BertConfig::tiny().hidden_size);
    queries.fill(&model, &examples, 8, 0).unwrap();
    let rows: Vec<&Encoded> = examples.iter().collect();
    let batch = Batch::pad(&rows, 0, &Device::Cpu).unwrap();
    let q = queries.batch(&batch.example_ids, &Device::Cpu).unwrap();
    let adapters = params.tracked(&spec, choice.head_only());
    let out = forward(&model, &adapters, &batch, Some(&q), FEDINS_LAMBDA).unwrap();
    let loss = (out.loss().unwrap() + (orthogonality(&adapters).unwrap() * 0.5).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    params
        .trainable_names()
        .iter()
        .map(|name| {
            let var = params.var(name).unwrap();
            let norm = grads
                .get(var.as_tensor())
                .map(|g| g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap())
                .unwrap_or(0.0);
            (name.clone(), norm)
        })
        .collect()
}

fn assert_all_trained(choice: AdapterChoice) {
    let norms = gradient_norms(choice);
    assert!(norms.len() > 4 || choice.head_only(), "{choice}: {} trainable tensors", norms.len());
    for (name, norm) in &norms {
        // Softmax is invariant to a shift of every key by the same vector: that shift never gets a
        // gradient (by construction, not a bug).
        if name.ends_with("attention.self.key.ssf_shift") {
            continue;
        }
        assert!(norm.is_finite() && *norm > 0.0, "{choice}: {name} has gradient norm {norm}");
    }
}

#[test]
fn every_ssf_pool_tensor_gets_a_gradient_including_keys() {
    assert_all_trained(AdapterChoice::SsfPool);
    assert!(gradient_norms(AdapterChoice::SsfPool)["pool.keys"] > 0.0);
}

#[test]
fn every_plain_ssf_tensor_gets_a_gradient() {
    assert_all_trained(AdapterChoice::Ssf);
}

#[test]
fn every_lora_factor_gets_a_gradient() {
    for choice in [AdapterChoice::Lora, AdapterChoice::AdaLora] {
        let norms = gradient_norms(choice);
        assert!(norms.keys().any(|n| n.ends_with("lora_B.weight")));
        assert_eq!(norms.keys().any(|n| n.ends_with("lora_E.weight")), choice == AdapterChoice::AdaLora);
        assert_all_trained(choice);
    }
}

#[test]
fn linear_probe_trains_only_the_head() {
    let norms = gradient_norms(AdapterChoice::LinearProbe);
    assert_eq!(norms.keys().collect::<Vec<_>>(), ["classifier.bias", "classifier.weight"]);
    assert_all_trained(AdapterChoice::LinearProbe);
}

#[test]
fn training_leaves_the_frozen_backbone_bit_identical() {
    let dir = tiny_model_dir(5);
    let model = load(dir.path());
    let weights_before = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let examples = separable(24, 2, 1);
    let rows: Vec<&Encoded> = examples.iter().collect();
    let probe = Batch::pad(&rows, 0, &Device::Cpu).unwrap();
    let frozen = |m: &fedpool_client::model::BertEncoder| {
        m.forward(&probe.ids, &probe.mask, &Hooks::new()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let before = frozen(&model);
    for choice in [AdapterChoice::SsfPool, AdapterChoice::Lora] {
        let spec =
            pool_spec(&BertConfig::tiny(), &AdapterOptions { choice, pool_size: 5, ..Default::default() }, 2).unwrap();
        let start = AdapterPool::init(&spec, 1).unwrap();
        let config = TrainConfig { steps: 5, batch_size: 8, lr: 1e-2, warmup_steps: 0, ..Default::default() };
        let data = TrainData { train: &examples, eval: &examples, pad_id: 0 };
        let mut queries = QueryCache::new(32);
        let out = train(&model, &spec, &start, data, &mut queries, &config, &mut Silent).unwrap();
        assert!(out.delta.l2_norm() > 0.0, "{choice}: the adapters changed");
    }
    assert_eq!(frozen(&model), before, "the backbone's output is bit-identical after training");
    assert_eq!(std::fs::read(dir.path().join("model.safetensors")).unwrap(), weights_before);
}
