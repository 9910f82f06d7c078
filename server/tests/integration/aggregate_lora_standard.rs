//! Standard LoRA (`B·A`, PEFT's form): the three merges against dense references — the factor mean
//! (FedIT), the exact product merge (FlexLoRA) and LoRA-FAIR's refined B.

use std::collections::BTreeMap;

use faer::Mat;
use fedpool_common::adapter::{HEAD_BIAS, HEAD_WEIGHT};
use fedpool_common::{AdapterPool, HeadSpec, HostTensor, PoolDelta, PoolSpec, TargetSpec};
use fedpool_server::aggregate::{AggregateConfig, Aggregator, LoraMerge, Merge};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D_OUT: usize = 12;
const D_IN: usize = 10;
const RANK: usize = 4;
const Q: &str = "layer.0.query";

fn spec() -> PoolSpec {
    let targets = vec![TargetSpec { name: Q.into(), dim_in: D_IN, dim_out: D_OUT }];
    PoolSpec::lora(targets, RANK, 8.0, Some(HeadSpec::new(D_IN, 2)))
}

fn name(factor: &str) -> String {
    format!("{Q}.lora_{factor}.weight")
}

fn random(rng: &mut ChaCha8Rng, shape: Vec<usize>, amp: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(shape, (0..n).map(|_| rng.random_range(-amp..amp)).collect()).unwrap()
}

/// A global with a non-zero B (after some rounds), and client deltas of every tensor.
fn setup() -> (PoolSpec, AdapterPool, Vec<(PoolDelta, u64)>) {
    let spec = spec();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut global = AdapterPool::init(&spec, 3).unwrap();
    global.tensors.insert(name("B"), random(&mut rng, vec![D_OUT, RANK], 0.3));
    let updates = [30u64, 10, 20]
        .iter()
        .map(|&examples| {
            let tensors = BTreeMap::from([
                (name("A"), random(&mut rng, vec![RANK, D_IN], 0.2)),
                (name("B"), random(&mut rng, vec![D_OUT, RANK], 0.2)),
                (HEAD_WEIGHT.to_string(), random(&mut rng, vec![2, D_IN], 0.1)),
                (HEAD_BIAS.to_string(), random(&mut rng, vec![2], 0.1)),
            ]);
            (PoolDelta { spec_hash: spec.hash(), slots: None, tensors }, examples)
        })
        .collect();
    (spec, global, updates)
}

fn mat(t: &HostTensor) -> Mat<f64> {
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    Mat::from_fn(rows, cols, |i, j| f64::from(t.data()[i * cols + j]))
}

/// A client's factor `global + delta` as a matrix.
fn client(global: &AdapterPool, delta: &PoolDelta, factor: &str) -> Mat<f64> {
    let mut t = global.tensors[&name(factor)].clone();
    t.axpy(1.0, &delta.tensors[&name(factor)]).unwrap();
    mat(&t)
}

fn merge(spec: &PoolSpec, global: &AdapterPool, updates: &[(PoolDelta, u64)], lora_merge: LoraMerge) -> AdapterPool {
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig { lora_merge, ..Default::default() }).unwrap();
    agg.begin(global).unwrap();
    for (d, n) in updates {
        agg.fold(d, *n).unwrap();
    }
    agg.finish(global).unwrap()
}

/// Σ w_k X_k / Σ w_k.
fn weighted(updates: &[(PoolDelta, u64)], f: impl Fn(&PoolDelta) -> Mat<f64>) -> Mat<f64> {
    let total: f64 = updates.iter().map(|(_, n)| *n as f64).sum();
    let mut acc: Option<Mat<f64>> = None;
    for (d, n) in updates {
        let x = f(d) * (*n as f64 / total);
        acc = Some(match acc {
            None => x,
            Some(a) => a + x,
        });
    }
    acc.unwrap()
}

fn max_abs(m: &Mat<f64>) -> f64 {
    let mut worst = 0.0f64;
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            worst = worst.max(m[(i, j)].abs());
        }
    }
    worst
}

#[test]
fn the_factor_mean_averages_a_and_b_separately() {
    let (spec, global, updates) = setup();
    let out = merge(&spec, &global, &updates, LoraMerge::FactorMean);
    for f in ["A", "B"] {
        let want = weighted(&updates, |d| client(&global, d, f));
        assert!(max_abs(&(mat(&out.tensors[&name(f)]) - want)) < 1e-6, "{f}");
    }
    assert!(!out.tensors.contains_key(&name("E")));
}

#[test]
fn a_factor_left_out_keeps_its_value_and_the_mean_is_over_the_updates_that_carry_it() {
    // FFA-LoRA: every client sends B only; then one client also sends A (RoLoRA-style mixes).
    let (spec, global, mut updates) = setup();
    for (d, _) in updates.iter_mut().skip(1) {
        d.tensors.remove(&name("A"));
    }
    let out = merge(&spec, &global, &updates, LoraMerge::FactorMean);
    let a_want = client(&global, &updates[0].0, "A"); // the only update carrying A
    assert!(max_abs(&(mat(&out.tensors[&name("A")]) - a_want)) < 1e-6);
    let b_want = weighted(&updates, |d| client(&global, d, "B"));
    assert!(max_abs(&(mat(&out.tensors[&name("B")]) - b_want)) < 1e-6);
    for (d, _) in updates.iter_mut() {
        d.tensors.remove(&name("A"));
    }
    let out = merge(&spec, &global, &updates, LoraMerge::FactorMean);
    assert_eq!(out.tensors[&name("A")], global.tensors[&name("A")], "no update carried A");
}

#[test]
fn the_exact_merge_keeps_the_mean_product_when_its_rank_fits() {
    // 3 clients of rank 4 on a 12×10 target: the mean product has rank ≤ 10, cut to 4 — so check
    // against the dense best rank-4 approximation, and with one client (rank 4) exactly.
    let (spec, global, updates) = setup();
    let product = |d: &PoolDelta| client(&global, d, "B") * client(&global, d, "A");
    let one = &updates[..1];
    let out = merge(&spec, &global, one, LoraMerge::Exact);
    let got = mat(&out.tensors[&name("B")]) * mat(&out.tensors[&name("A")]);
    assert!(max_abs(&(got - weighted(one, product))) < 1e-5, "one client's product survives exactly");

    let out = merge(&spec, &global, &updates, LoraMerge::Exact);
    let got = mat(&out.tensors[&name("B")]) * mat(&out.tensors[&name("A")]);
    let m = weighted(&updates, product);
    let svd = m.thin_svd().unwrap();
    let sigma = svd.S().column_vector();
    let scaled = Mat::from_fn(D_OUT, RANK, |i, j| svd.U()[(i, j)] * sigma[j]);
    let best = scaled * svd.V().subcols(0, RANK).transpose();
    assert!(max_abs(&(got - best)) < 1e-5, "the best rank-4 approximation of the mean product");
    // Split evenly: B's columns and A's rows have the same norms.
    let (b, a) = (mat(&out.tensors[&name("B")]), mat(&out.tensors[&name("A")]));
    for j in 0..RANK {
        let (nb, na) = (b.col(j).norm_l2(), a.row(j).norm_l2());
        assert!((nb - na).abs() < 1e-5 * nb.max(1.0), "column {j}: |B| {nb} vs |A| {na}");
    }
}

#[test]
fn lora_fair_refines_b_toward_the_mean_product_and_keeps_the_mean_a() {
    let (spec, global, updates) = setup();
    let lambda = 0.01;
    let fedit = merge(&spec, &global, &updates, LoraMerge::FactorMean);
    let fair = merge(&spec, &global, &updates, LoraMerge::Fair { lambda });
    let a_bar = mat(&fedit.tensors[&name("A")]);
    let b_bar = mat(&fedit.tensors[&name("B")]);
    assert!(max_abs(&(mat(&fair.tensors[&name("A")]) - &a_bar)) < 1e-6, "A is the factor mean");
    assert_eq!(fair.tensors[HEAD_WEIGHT], fedit.tensors[HEAD_WEIGHT], "the head is averaged as usual");
    let m = weighted(&updates, |d| client(&global, d, "B") * client(&global, d, "A"));
    let b = mat(&fair.tensors[&name("B")]);
    // Optimality of the ridge problem: (B Ā − M) Āᵀ + λ' (B − B̄) = 0.
    let gram = &a_bar * a_bar.transpose();
    let ridge = lambda * (0..RANK).map(|i| gram[(i, i)]).sum::<f64>() / RANK as f64;
    let gradient = (&b * &a_bar - &m) * a_bar.transpose() + (&b - &b_bar) * ridge;
    assert!(max_abs(&gradient) < 1e-5, "stationary: {}", max_abs(&gradient));
    // Closer to the mean product than FedIT's B̄ Ā.
    let err = |x: &Mat<f64>| (x * &a_bar - &m).norm_l2();
    assert!(err(&b) < err(&b_bar), "{} vs FedIT {}", err(&b), err(&b_bar));
    // A huge λ gives back FedIT's B̄.
    let stiff = merge(&spec, &global, &updates, LoraMerge::Fair { lambda: 1e9 });
    assert!(max_abs(&(mat(&stiff.tensors[&name("B")]) - &b_bar)) < 1e-5);
}

#[test]
fn standard_lora_updates_with_an_e_or_a_missing_factor_are_refused() {
    let (spec, global, updates) = setup();
    for lora_merge in [LoraMerge::FactorMean, LoraMerge::Exact, LoraMerge::Fair { lambda: 0.01 }] {
        let mut agg = Aggregator::new(spec.clone(), AggregateConfig { lora_merge, ..Default::default() }).unwrap();
        agg.begin(&global).unwrap();
        let mut with_e = updates[0].0.clone();
        with_e.tensors.insert(name("E"), HostTensor::zeros(&[RANK, 1]));
        let msg = agg.fold(&with_e, 10).unwrap_err().to_string();
        assert!(msg.contains("lora_E"), "{lora_merge:?}: {msg}");
        assert_eq!(agg.updates_folded(), 0, "{lora_merge:?}: nothing folded");
        // One factor alone (FFA-LoRA, RoLoRA) is for the factor mean only: the product merges
        // need both.
        let mut no_b = updates[0].0.clone();
        no_b.tensors.remove(&name("B"));
        assert_eq!(agg.fold(&no_b, 10).is_ok(), lora_merge == LoraMerge::FactorMean, "{lora_merge:?}");
    }
    let bad = AggregateConfig { lora_merge: LoraMerge::Fair { lambda: 0.0 }, ..Default::default() };
    assert!(Aggregator::new(spec, bad).unwrap_err().to_string().contains("lambda"));
}

#[test]
fn the_factor_mean_takes_fedadam_and_the_trimmed_mean_the_product_merges_do_not() {
    use fedpool_server::aggregate::{FedAdamConfig, Rule, ServerOpt};
    let spec = spec();
    let adam = ServerOpt::FedAdam(FedAdamConfig::default());
    let trim = Rule::TrimmedMean { trim_fraction: 0.1, max_updates: 8 };
    for (lora_merge, ok) in
        [(LoraMerge::FactorMean, true), (LoraMerge::Exact, false), (LoraMerge::Fair { lambda: 0.01 }, false)]
    {
        let with = |config: AggregateConfig| Aggregator::new(spec.clone(), AggregateConfig { lora_merge, ..config });
        assert_eq!(with(AggregateConfig { server_opt: adam, ..Default::default() }).is_ok(), ok, "{lora_merge:?}");
        assert_eq!(with(AggregateConfig { rule: trim, ..Default::default() }).is_ok(), ok, "{lora_merge:?}");
    }
}
