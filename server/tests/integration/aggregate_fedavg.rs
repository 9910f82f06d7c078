//! Streaming weighted FedAvg: folding updates one at a time gives the dense weighted mean, and the
//! round protocol refuses what it cannot fold without touching the sums.

use fedpool_common::{AdapterPool, HeadSpec, HostTensor, PoolDelta, PoolSpec, SlotUsage, TargetSpec};
use fedpool_server::aggregate::{AggregateConfig, Aggregator, Merge};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Plain SSF (one slot): its pooled tensors reduce to weighted FedAvg.
fn ssf_spec() -> PoolSpec {
    let targets = vec![
        TargetSpec { name: "layer.0.query".into(), dim_in: 16, dim_out: 16 },
        TargetSpec { name: "layer.0.output".into(), dim_in: 16, dim_out: 33 },
    ];
    PoolSpec::ssf(targets, Some(HeadSpec::new(16, 3)))
}

fn random_delta(spec: &PoolSpec, rng: &mut ChaCha8Rng, examples: u64) -> PoolDelta {
    let tensors = spec
        .layout()
        .into_iter()
        .map(|l| {
            let n = l.shape.iter().product();
            let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (l.name, HostTensor::new(l.shape, data).unwrap())
        })
        .collect();
    PoolDelta { spec_hash: spec.hash(), slots: Some(SlotUsage { slots: vec![0], counts: vec![examples] }), tensors }
}

#[test]
fn streaming_fedavg_equals_dense_weighted_mean() {
    let spec = ssf_spec();
    let global = AdapterPool::init(&spec, 1).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let updates: Vec<(PoolDelta, u64)> = (0..25)
        .map(|_| {
            let examples = rng.random_range(1..1000u64);
            (random_delta(&spec, &mut rng, examples), examples)
        })
        .collect();

    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(&global).unwrap();
    for (d, n) in &updates {
        agg.fold(d, *n).unwrap();
    }
    let merged = agg.finish(&global).unwrap();
    merged.validate(&spec).unwrap();

    // The naive computation, in f64: global + Σ w Δ / Σ w.
    let total: f64 = updates.iter().map(|(_, n)| *n as f64).sum();
    for (name, g) in &global.tensors {
        let mut want: Vec<f64> = g.data().iter().map(|&x| f64::from(x)).collect();
        for (d, n) in &updates {
            for (w, &x) in want.iter_mut().zip(d.tensors[name].data()) {
                *w += *n as f64 / total * f64::from(x);
            }
        }
        let got = merged.tensors[name].data();
        let worst = want.iter().zip(got).map(|(w, &g)| (w - f64::from(g)).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "tensor {name}: max deviation {worst} from the dense weighted mean");
    }
}

#[test]
fn fold_order_does_not_change_the_mean() {
    let spec = ssf_spec();
    let global = AdapterPool::init(&spec, 2).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let updates: Vec<_> = (0..6).map(|i| (random_delta(&spec, &mut rng, 10 + i), 10 + i)).collect();
    let run = |order: &[usize]| {
        let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
        agg.begin(&global).unwrap();
        for &i in order {
            agg.fold(&updates[i].0, updates[i].1).unwrap();
        }
        agg.finish(&global).unwrap()
    };
    let a = run(&[0, 1, 2, 3, 4, 5]);
    let b = run(&[5, 3, 1, 0, 4, 2]);
    for (name, t) in &a.tensors {
        let worst = t.data().iter().zip(b.tensors[name].data()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{name}: {worst}");
    }
}

#[test]
fn refused_update_names_the_tensor_and_leaves_the_round_unchanged() {
    let spec = ssf_spec();
    let global = AdapterPool::init(&spec, 4).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let good = random_delta(&spec, &mut rng, 7);
    let mut bad = random_delta(&spec, &mut rng, 9);
    // The last tensor in name order is malformed: nothing before it may be folded either.
    bad.tensors.insert("layer.0.query.ssf_shift".into(), HostTensor::zeros(&[1, 15]));

    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(&global).unwrap();
    agg.fold(&good, 7).unwrap();
    let msg = agg.fold(&bad, 9).unwrap_err().to_string();
    assert!(msg.contains("layer.0.query.ssf_shift") && msg.contains("[1, 15]") && msg.contains("[1, 16]"), "{msg}");
    let with_refusal = agg.finish(&global).unwrap();

    agg.begin(&global).unwrap();
    agg.fold(&good, 7).unwrap();
    assert_eq!(agg.finish(&global).unwrap(), with_refusal);
}

#[test]
fn malformed_updates_are_refused_with_reasons() {
    let spec = ssf_spec();
    let global = AdapterPool::init(&spec, 6).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let good = random_delta(&spec, &mut rng, 5);
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();

    let e = agg.fold(&good, 5).unwrap_err().to_string();
    assert!(e.contains("begin"), "fold before begin: {e}");
    agg.begin(&global).unwrap();
    assert!(agg.fold(&good, 0).unwrap_err().to_string().contains("0 examples"));
    let mut d = good.clone();
    d.slots = Some(SlotUsage { slots: vec![0], counts: vec![6] });
    assert!(agg.fold(&d, 5).unwrap_err().to_string().contains("usage count 6"));
    let mut d = good.clone();
    d.tensors.insert("layer.9.query.ssf_scale".into(), HostTensor::zeros(&[1, 16]));
    assert!(agg.fold(&d, 5).unwrap_err().to_string().contains("layer.9.query.ssf_scale"));
    let mut d = good.clone();
    d.tensors.remove("classifier.bias");
    assert!(agg.fold(&d, 5).unwrap_err().to_string().contains("classifier.bias"));
    let mut d = good.clone();
    d.slots = None;
    assert!(agg.fold(&d, 5).unwrap_err().to_string().contains("slots"));
    assert_eq!(agg.updates_folded(), 0);
}

#[test]
fn a_round_without_updates_returns_the_global_unchanged() {
    let spec = ssf_spec();
    let global = AdapterPool::init(&spec, 8).unwrap();
    let mut agg = Aggregator::new(spec, AggregateConfig::default()).unwrap();
    agg.begin(&global).unwrap();
    assert_eq!(agg.finish(&global).unwrap(), global);
    assert!(agg.finish(&global).is_err(), "finish ends the round");
}

#[test]
fn invalid_configurations_are_refused() {
    use fedpool_server::aggregate::{FedAdamConfig, Rule, ServerOpt};
    let spec = ssf_spec();
    let bad = |c: AggregateConfig| Aggregator::new(spec.clone(), c).unwrap_err().to_string();
    assert!(bad(AggregateConfig { clip_norm: Some(0.0), ..Default::default() }).contains("clip_norm"));
    let trim = Rule::TrimmedMean { trim_fraction: 0.5, max_updates: 10 };
    assert!(bad(AggregateConfig { rule: trim, ..Default::default() }).contains("trim_fraction"));
    let adam = ServerOpt::FedAdam(FedAdamConfig { tau: 0.0, ..Default::default() });
    assert!(bad(AggregateConfig { server_opt: adam, ..Default::default() }).contains("tau"));
}
