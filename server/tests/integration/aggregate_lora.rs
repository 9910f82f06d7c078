//! The exact LoRA merge: the merged global equals a dense Σ w_k ΔW_k / Σ w_k followed by a dense
//! truncated SVD, for clients of mixed ranks, with and without the streaming compression.

use std::collections::BTreeMap;

use faer::Mat;
use fedpool_common::adapter::{HEAD_BIAS, HEAD_WEIGHT};
use fedpool_common::{AdapterPool, HeadSpec, HostTensor, PoolDelta, PoolSpec, TargetSpec};
use fedpool_server::aggregate::{truncate_lora, AggregateConfig, Aggregator, Merge};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D_OUT: usize = 48;
const D_IN: usize = 40;
const MAX_RANK: usize = 16;
const Q: &str = "layer.0.query";
const V: &str = "layer.0.value";

fn spec() -> PoolSpec {
    let targets = vec![
        TargetSpec { name: Q.into(), dim_in: D_IN, dim_out: D_OUT },
        TargetSpec { name: V.into(), dim_in: D_IN, dim_out: 24 },
    ];
    PoolSpec::adalora(targets, MAX_RANK, 32.0, Some(HeadSpec::new(D_IN, 3)))
}

fn name(target: &str, factor: &str) -> String {
    format!("{target}.lora_{factor}.weight")
}

/// A global with non-zero singular values (E sorted descending), so the global's own triplets
/// matter to every client's product.
fn global(spec: &PoolSpec) -> AdapterPool {
    let mut g = AdapterPool::init(spec, 11).unwrap();
    for t in [Q, V] {
        let e = g.tensors.get_mut(&name(t, "E")).unwrap();
        e.data_mut().iter_mut().enumerate().for_each(|(i, x)| *x = 1.0 / (1.0 + i as f32));
    }
    g
}

fn random(rng: &mut ChaCha8Rng, shape: Vec<usize>, amp: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(shape, (0..n).map(|_| rng.random_range(-amp..amp)).collect()).unwrap()
}

/// A client's update: rank `r` on target Q (and on V if `with_v`), a full head delta.
fn update(spec: &PoolSpec, rng: &mut ChaCha8Rng, r: usize, with_v: bool) -> PoolDelta {
    let mut tensors = BTreeMap::new();
    for (t, d_out) in [(Q, D_OUT), (V, 24)] {
        if t == V && !with_v {
            continue;
        }
        tensors.insert(name(t, "A"), random(rng, vec![r, D_IN], 0.05));
        tensors.insert(name(t, "E"), random(rng, vec![r, 1], 0.5));
        tensors.insert(name(t, "B"), random(rng, vec![d_out, r], 0.05));
    }
    tensors.insert(HEAD_WEIGHT.into(), random(rng, vec![3, D_IN], 0.1));
    tensors.insert(HEAD_BIAS.into(), random(rng, vec![3], 0.1));
    let d = PoolDelta { spec_hash: spec.hash(), slots: None, tensors };
    d.validate(spec).unwrap();
    d
}

/// B diag(E) A in f64 from row-major factors of rank `r` (B `[d_out, r]`, A `[r, d_in]`).
fn product(b: &[f64], e: &[f64], a: &[f64], d_out: usize, r: usize) -> Mat<f64> {
    Mat::from_fn(d_out, D_IN, |i, j| (0..r).map(|t| b[i * r + t] * e[t] * a[t * D_IN + j]).sum())
}

/// Client k's product: the global's first r triplets plus its deltas.
fn client_product(g: &AdapterPool, d: &PoolDelta, target: &str, d_out: usize) -> Mat<f64> {
    let r = d.tensors[&name(target, "E")].numel();
    let ga = g.tensors[&name(target, "A")].data();
    let ge = g.tensors[&name(target, "E")].data();
    let gb = g.tensors[&name(target, "B")].data();
    let (da, de, db) = (
        d.tensors[&name(target, "A")].data(),
        d.tensors[&name(target, "E")].data(),
        d.tensors[&name(target, "B")].data(),
    );
    let a: Vec<f64> = (0..r * D_IN).map(|i| f64::from(ga[i]) + f64::from(da[i])).collect();
    let e: Vec<f64> = (0..r).map(|i| f64::from(ge[i]) + f64::from(de[i])).collect();
    let b: Vec<f64> = (0..d_out * r).map(|k| f64::from(gb[(k / r) * MAX_RANK + k % r]) + f64::from(db[k])).collect();
    product(&b, &e, &a, d_out, r)
}

/// The merged global's product (full max_rank).
fn merged_product(p: &AdapterPool, target: &str, d_out: usize) -> Mat<f64> {
    let f = |x: &str| p.tensors[&name(target, x)].data().iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    product(&f("B"), &f("E"), &f("A"), d_out, MAX_RANK)
}

/// Dense reference: Σ w ΔW / Σ w, then the best rank-`MAX_RANK` approximation by a dense SVD.
fn dense_reference(g: &AdapterPool, updates: &[(PoolDelta, u64)]) -> Mat<f64> {
    let total: f64 = updates.iter().map(|(_, w)| *w as f64).sum();
    let mut m = Mat::<f64>::zeros(D_OUT, D_IN);
    for (d, w) in updates {
        let p = client_product(g, d, Q, D_OUT);
        m += faer::Scale(*w as f64 / total) * &p;
    }
    let svd = m.thin_svd().unwrap();
    let s = svd.S().column_vector();
    let (u, v) = (svd.U(), svd.V());
    Mat::from_fn(D_OUT, D_IN, |i, j| (0..MAX_RANK).map(|t| u[(i, t)] * s[t] * v[(j, t)]).sum())
}

fn rel_frobenius(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    (a - b).norm_l2() / b.norm_l2()
}

fn merge(spec: &PoolSpec, g: &AdapterPool, updates: &[(PoolDelta, u64)]) -> (AdapterPool, usize) {
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(g).unwrap();
    for (d, w) in updates {
        agg.fold(d, *w).unwrap();
    }
    let stacked = agg.lora_stacked_rank(Q).unwrap();
    let out = agg.finish(g).unwrap();
    out.validate(spec).unwrap();
    (out, stacked)
}

fn mixed_rank_updates(spec: &PoolSpec, n: usize, seed: u64) -> Vec<(PoolDelta, u64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|k| (update(spec, &mut rng, [4, 8, 16][k % 3], k.is_multiple_of(2)), rng.random_range(1..500u64)))
        .collect()
}

/// B's columns and A's rows orthonormal, E non-negative and descending.
fn assert_svd_form(p: &AdapterPool, target: &str, d_out: usize) {
    let b = p.tensors[&name(target, "B")].data();
    let a = p.tensors[&name(target, "A")].data();
    let e = p.tensors[&name(target, "E")].data();
    for i in 0..MAX_RANK {
        for j in 0..MAX_RANK {
            let want = if i == j { 1.0 } else { 0.0 };
            let bb: f64 = (0..d_out).map(|k| f64::from(b[k * MAX_RANK + i]) * f64::from(b[k * MAX_RANK + j])).sum();
            let aa: f64 = (0..D_IN).map(|k| f64::from(a[i * D_IN + k]) * f64::from(a[j * D_IN + k])).sum();
            assert!((bb - want).abs() < 1e-5 && (aa - want).abs() < 1e-5, "({i}, {j}): BᵀB {bb}, AAᵀ {aa}");
        }
    }
    assert!(e.iter().all(|&x| x >= 0.0) && e.windows(2).all(|w| w[0] >= w[1]), "E = {e:?}");
}

#[test]
fn exact_lora_merge_equals_dense_merge_then_truncated_svd_for_mixed_ranks() {
    let spec = spec();
    let g = global(&spec);
    let updates = mixed_rank_updates(&spec, 3, 1);
    let (out, stacked) = merge(&spec, &g, &updates);
    assert_eq!(stacked, 4 + 8 + 16, "3 updates stay below the compression threshold");
    let err = rel_frobenius(&merged_product(&out, Q, D_OUT), &dense_reference(&g, &updates));
    assert!(err < 1e-4, "relative Frobenius error {err}");
    assert_svd_form(&out, Q, D_OUT);

    // The head is plain weighted FedAvg.
    let total: f64 = updates.iter().map(|(_, w)| *w as f64).sum();
    for (i, &got) in out.tensors[HEAD_WEIGHT].data().iter().enumerate() {
        let want = f64::from(g.tensors[HEAD_WEIGHT].data()[i])
            + updates.iter().map(|(d, w)| *w as f64 * f64::from(d.tensors[HEAD_WEIGHT].data()[i])).sum::<f64>() / total;
        assert!((f64::from(got) - want).abs() < 1e-6, "head[{i}]: {got} vs {want}");
    }
}

#[test]
fn exact_lora_merge_stays_exact_when_the_stack_is_compressed() {
    let spec = spec();
    let g = global(&spec);
    // 15 updates stack 140 columns, past 2 · min(48, 40) = 80: the stack is compressed on the way.
    let updates = mixed_rank_updates(&spec, 15, 2);
    let (out, stacked) = merge(&spec, &g, &updates);
    assert!(stacked <= 2 * D_IN + MAX_RANK, "stacked rank {stacked} of 140 columns: no compression happened");
    let err = rel_frobenius(&merged_product(&out, Q, D_OUT), &dense_reference(&g, &updates));
    assert!(err < 1e-4, "relative Frobenius error {err}");
    assert_svd_form(&out, Q, D_OUT);
}

#[test]
fn one_client_merge_reproduces_its_adapter() {
    let spec = spec();
    let g = global(&spec);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for r in [16, 4] {
        let updates = vec![(update(&spec, &mut rng, r, true), 7)];
        let (out, _) = merge(&spec, &g, &updates);
        for (t, d_out) in [(Q, D_OUT), (V, 24)] {
            let err = rel_frobenius(&merged_product(&out, t, d_out), &client_product(&g, &updates[0].0, t, d_out));
            assert!(err < 1e-5, "rank {r}, target {t}: relative error {err}");
            // Triplets beyond the client's rank add nothing but stay orthonormal (trainable).
            assert_svd_form(&out, t, d_out);
            assert!(out.tensors[&name(t, "E")].data()[r..].iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn a_lora_target_no_client_sent_stays_unchanged() {
    let spec = spec();
    let g = global(&spec);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let updates: Vec<_> = (0..3).map(|_| (update(&spec, &mut rng, 8, false), 5)).collect();
    let (out, _) = merge(&spec, &g, &updates);
    for f in ["A", "E", "B"] {
        assert_eq!(out.tensors[&name(V, f)], g.tensors[&name(V, f)], "lora_{f} of the target nobody sent");
    }
    assert_ne!(out.tensors[&name(Q, "A")], g.tensors[&name(Q, "A")]);
}

#[test]
fn truncated_global_holds_the_first_triplets_and_validates() {
    let spec = spec();
    let g = global(&spec);
    let ranks = BTreeMap::from([(Q.to_string(), 4), (V.to_string(), 0)]);
    let t = truncate_lora(&g, &spec, &ranks).unwrap();
    t.validate(&spec).unwrap();
    assert!(!t.tensors.contains_key(&name(V, "A")), "rank 0 leaves the target out");
    assert_eq!(t.tensors[&name(Q, "A")].data(), &g.tensors[&name(Q, "A")].data()[..4 * D_IN]);
    assert_eq!(t.tensors[&name(Q, "E")].data(), &g.tensors[&name(Q, "E")].data()[..4]);
    let b = t.tensors[&name(Q, "B")].data();
    let gb = g.tensors[&name(Q, "B")].data();
    assert!((0..D_OUT).all(|i| b[i * 4..(i + 1) * 4] == gb[i * MAX_RANK..i * MAX_RANK + 4]));
    assert_eq!(t.tensors[HEAD_WEIGHT], g.tensors[HEAD_WEIGHT]);
    // A target not named keeps max_rank.
    let full = truncate_lora(&g, &spec, &BTreeMap::new()).unwrap();
    assert_eq!(full.tensors[&name(V, "B")], g.tensors[&name(V, "B")]);
    assert!(truncate_lora(&g, &spec, &BTreeMap::from([(Q.to_string(), 17)])).is_err());
    assert!(truncate_lora(&g, &spec, &BTreeMap::from([("nope".to_string(), 1)])).is_err());
}

#[test]
fn lora_updates_with_broken_triplets_are_refused() {
    let spec = spec();
    let g = global(&spec);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(&g).unwrap();
    let mut d = update(&spec, &mut rng, 8, true);
    d.tensors.insert(name(Q, "B"), HostTensor::zeros(&[D_OUT, 7]));
    let e = agg.fold(&d, 3).unwrap_err().to_string();
    assert!(e.contains(&name(Q, "B")) && e.contains("[48, 7]"), "{e}");
    let mut d = update(&spec, &mut rng, 8, true);
    d.tensors.remove(&name(Q, "E"));
    assert!(agg.fold(&d, 3).unwrap_err().to_string().contains(Q));
    assert_eq!(agg.lora_stacked_rank(Q), Some(0));
}
