//! FedIns selection per instance: a batch gives every row the logits and loss it gets alone.

use crate::train_support;

use candle_core::Device;
use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{forward, AdapterTensors, Batch, Encoded, QueryCache, FEDINS_LAMBDA};
use fedpool_common::adapter::AdapterPool;
use train_support::{load, separable, tiny_model_dir};

#[test]
fn per_instance_selection_in_one_batch_equals_each_example_alone() {
    let dir = tiny_model_dir(3);
    let model = load(dir.path());
    let options = AdapterOptions { choice: AdapterChoice::SsfPool, pool_size: 8, top_k: 3, ..Default::default() };
    let spec = pool_spec(&BertConfig::tiny(), &options, 2).unwrap();
    // A strongly random pool, so that different slots give visibly different outputs.
    let init = fedpool_common::adapter::InitOptions { ssf_std: 0.3, head_std: 0.5, ..Default::default() };
    let pool = AdapterPool::init_with(&spec, 11, &init).unwrap();
    let adapters = AdapterTensors::from_pool(&spec, &pool, false, &Device::Cpu).unwrap();

    let examples = separable(8, 2, 5);
    let mut queries = QueryCache::new(BertConfig::tiny().hidden_size);
    queries.fill(&model, &examples, 4, 0).unwrap();

    let rows: Vec<&Encoded> = examples.iter().collect();
    let batch = Batch::pad(&rows, 0, &Device::Cpu).unwrap();
    let q = queries.batch(&batch.example_ids, &Device::Cpu).unwrap();
    let together = forward(&model, &adapters, &batch, Some(&q), FEDINS_LAMBDA).unwrap();
    let distinct: std::collections::BTreeSet<&[u32]> = (0..rows.len()).map(|i| together.selection.row(i)).collect();
    assert!(distinct.len() >= 3, "rows should select different slots: {:?}", together.selection);

    let logits = together.logits.to_vec2::<f32>().unwrap();
    let losses = together.loss_per_example.to_vec1::<f32>().unwrap();
    for (i, example) in examples.iter().enumerate() {
        let alone = Batch::pad(&[example], 0, &Device::Cpu).unwrap();
        let q = queries.batch(&alone.example_ids, &Device::Cpu).unwrap();
        let out = forward(&model, &adapters, &alone, Some(&q), FEDINS_LAMBDA).unwrap();
        assert_eq!(out.selection.row(0), together.selection.row(i));
        let alone_logits = &out.logits.to_vec2::<f32>().unwrap()[0];
        for (a, b) in alone_logits.iter().zip(&logits[i]) {
            assert!((a - b).abs() < 1e-5, "example {i}: logits {alone_logits:?} vs {:?}", logits[i]);
        }
        let loss = out.loss_per_example.to_vec1::<f32>().unwrap()[0];
        assert!((loss - losses[i]).abs() < 1e-5, "example {i}: loss {loss} vs {}", losses[i]);
    }
}
