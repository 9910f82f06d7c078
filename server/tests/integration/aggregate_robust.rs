//! Robust aggregation and the server optimiser: norm clipping bounds every contribution, the
//! trimmed mean ignores an outlier, FedAdam's step matches a hand computation and its state
//! survives a save and restore.

use std::collections::BTreeMap;

use fedpool_common::{AdapterPool, HeadSpec, HostTensor, PoolDelta, PoolSpec, SlotUsage, TargetSpec};
use fedpool_server::aggregate::{
    AggregateConfig, Aggregator, FedAdamConfig, Merge, Rule, ServerOpt, FEDADAM_M_PREFIX, FEDADAM_V_PREFIX,
};

const SCALE: &str = "t.ssf_scale";
const SHIFT: &str = "t.ssf_shift";

/// Plain SSF on one target of width `dim`: two `[1, dim]` tensors, weighted FedAvg.
fn spec(dim: usize) -> PoolSpec {
    PoolSpec::ssf(vec![TargetSpec { name: "t".into(), dim_in: dim, dim_out: dim }], None)
}

fn global(spec: &PoolSpec) -> AdapterPool {
    let mut g = AdapterPool::zeros(spec);
    g.tensors.get_mut(SCALE).unwrap().data_mut().fill(1.0);
    g
}

/// An update moving the scale by `scale` and the shift by `shift`, from `examples` examples.
fn update(spec: &PoolSpec, scale: Vec<f32>, shift: Vec<f32>, examples: u64) -> PoolDelta {
    let dim = scale.len();
    let tensors = BTreeMap::from([
        (SCALE.to_string(), HostTensor::new(vec![1, dim], scale).unwrap()),
        (SHIFT.to_string(), HostTensor::new(vec![1, dim], shift).unwrap()),
    ]);
    PoolDelta { spec_hash: spec.hash(), slots: Some(SlotUsage { slots: vec![0], counts: vec![examples] }), tensors }
}

/// ‖a − b‖₂ over all tensors.
fn distance(a: &AdapterPool, b: &AdapterPool) -> f64 {
    a.tensors
        .iter()
        .map(|(n, t)| t.data().iter().zip(b.tensors[n].data()).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

fn run(agg: &mut Aggregator, g: &AdapterPool, updates: &[(PoolDelta, u64)]) -> AdapterPool {
    agg.begin(g).unwrap();
    for (d, n) in updates {
        agg.fold(d, *n).unwrap();
    }
    agg.finish(g).unwrap()
}

#[test]
fn clipping_bounds_every_contribution() {
    let spec = spec(50);
    let g = global(&spec);
    let clip = 1.0;
    let cfg = AggregateConfig { clip_norm: Some(clip), ..Default::default() };
    let mut agg = Aggregator::new(spec.clone(), cfg).unwrap();

    // Alone, an update of norm ~1e7 moves the global by exactly the clip norm.
    let huge = update(&spec, vec![1e6; 50], vec![-1e6; 50], 10);
    let out = run(&mut agg, &g, &[(huge.clone(), 10)]);
    assert!((distance(&out, &g) - clip).abs() < 1e-5, "moved by {}", distance(&out, &g));

    // Next to an honest update of equal weight, it moves the mean by at most clip · 10 / 20.
    let honest = update(&spec, vec![0.01; 50], vec![0.0; 50], 10);
    let honest_norm = honest.l2_norm(); // below the clip norm: unscaled
    let out = run(&mut agg, &g, &[(honest.clone(), 10), (huge, 10)]);
    let moved = distance(&out, &g);
    assert!(moved <= (honest_norm + clip) / 2.0 + 1e-6, "moved by {moved}");
    let honest_only = run(&mut agg, &g, &[(honest, 10)]);
    // The outlier's share of the mean: half its clipped norm.
    assert!(distance(&out, &honest_only) <= clip / 2.0 + honest_norm / 2.0 + 1e-6);
}

#[test]
fn trimmed_mean_ignores_an_outlier() {
    let spec = spec(3);
    let g = global(&spec);
    let rule = Rule::TrimmedMean { trim_fraction: 0.2, max_updates: 8 };
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig { rule, ..Default::default() }).unwrap();
    let values = [0.1f32, 0.2, 0.3, 0.4, 1e6];
    let updates: Vec<_> = values.iter().map(|&v| (update(&spec, vec![v; 3], vec![-v; 3], 4), 4)).collect();
    let out = run(&mut agg, &g, &updates);
    // n = 5, β = 0.2: drop one value at each end per coordinate, average 0.2, 0.3, 0.4.
    for &x in out.tensors[SCALE].data() {
        assert!((x - 1.3).abs() < 1e-6, "scale {x}, expected 1 + 0.3");
    }
    for &x in out.tensors[SHIFT].data() {
        assert!((x + 0.3).abs() < 1e-6, "shift {x}, expected −0.3");
    }
    // The plain mean would have been dragged to ~2e5.
    let mut mean = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    assert!(run(&mut mean, &g, &updates).tensors[SCALE].data()[0] > 1e5);
}

#[test]
fn trimmed_mean_with_no_trimming_equals_the_weighted_mean() {
    let spec = spec(2);
    let g = global(&spec);
    let rule = Rule::TrimmedMean { trim_fraction: 0.0, max_updates: 4 };
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig { rule, ..Default::default() }).unwrap();
    let updates =
        vec![(update(&spec, vec![1.0, 0.0], vec![0.0; 2], 1), 1), (update(&spec, vec![0.0, 2.0], vec![0.0; 2], 3), 3)];
    let out = run(&mut agg, &g, &updates);
    assert_eq!(out.tensors[SCALE].data(), &[1.25, 2.5]);
}

#[test]
fn trimmed_mean_refuses_updates_beyond_max_updates() {
    let spec = spec(2);
    let g = global(&spec);
    let rule = Rule::TrimmedMean { trim_fraction: 0.1, max_updates: 2 };
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig { rule, ..Default::default() }).unwrap();
    agg.begin(&g).unwrap();
    let d = update(&spec, vec![0.0; 2], vec![0.0; 2], 1);
    agg.fold(&d, 1).unwrap();
    agg.fold(&d, 1).unwrap();
    let e = agg.fold(&d, 1).unwrap_err().to_string();
    assert!(e.contains("max_updates") && e.contains('2'), "{e}");
    assert_eq!(agg.updates_folded(), 2);
}

#[test]
fn trimmed_mean_and_fedadam_are_refused_for_lora() {
    let targets = vec![TargetSpec { name: "q".into(), dim_in: 4, dim_out: 4 }];
    let lora = PoolSpec::adalora(targets, 2, 4.0, Some(HeadSpec::new(4, 2)));
    let rule = Rule::TrimmedMean { trim_fraction: 0.1, max_updates: 10 };
    let e = Aggregator::new(lora.clone(), AggregateConfig { rule, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("trimmed mean"), "{e}");
    let server_opt = ServerOpt::FedAdam(FedAdamConfig::default());
    let e = Aggregator::new(lora, AggregateConfig { server_opt, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("FedAdam"), "{e}");
}

#[test]
fn fedadam_step_matches_a_hand_computation() {
    let spec = spec(2);
    let g = global(&spec);
    let cfg = FedAdamConfig { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 };
    let mut agg =
        Aggregator::new(spec.clone(), AggregateConfig { server_opt: ServerOpt::FedAdam(cfg), ..Default::default() })
            .unwrap();
    // Weighted mean of the scale deltas: (1·[0.4, −0.8] + 3·[0, 0]) / 4 = [0.1, −0.2]; shift: 0.
    let updates =
        vec![(update(&spec, vec![0.4, -0.8], vec![0.0; 2], 1), 1), (update(&spec, vec![0.0, 0.0], vec![0.0; 2], 3), 3)];
    let round1 = run(&mut agg, &g, &updates);

    // By hand, m₀ = 0, v₀ = τ² = 1e-6:
    //   m₁ = 0.1 Δ,  v₁ = 0.99e-6 + 0.01 Δ²,  x₁ = x₀ + 0.1 m₁ / (√v₁ + 1e-3)
    let x1 = |d: f64| 1.0 + 0.1 * (0.1 * d) / ((0.99e-6 + 0.01 * d * d).sqrt() + 1e-3);
    let want1 = [x1(0.1), x1(-0.2)];
    for (got, want) in round1.tensors[SCALE].data().iter().zip(want1) {
        assert!((f64::from(*got) - want).abs() < 1e-6, "round 1: {got} vs {want}");
    }
    // x₁(0.1) ≈ 1 + 0.1 · 0.01 / 0.011049 ≈ 1.0905: a sanity check on the formula itself.
    assert!((want1[0] - 1.090_502).abs() < 1e-5);
    assert_eq!(round1.tensors[SHIFT].data(), &[0.0, 0.0], "a zero pseudo-gradient does not move");

    // The state: m₁ and v₁ under their names.
    let state = agg.server_state();
    assert_eq!(state.len(), 4);
    let m = state[&format!("{FEDADAM_M_PREFIX}{SCALE}")].data().to_vec();
    let v = state[&format!("{FEDADAM_V_PREFIX}{SCALE}")].data().to_vec();
    assert!((m[0] - 0.01).abs() < 1e-7 && (m[1] + 0.02).abs() < 1e-7, "m = {m:?}");
    assert!((f64::from(v[0]) - (0.99e-6 + 1e-4)).abs() < 1e-9, "v = {v:?}");

    // Round 2 from round 1's pool, same updates: m₂ = 0.9 m₁ + 0.1 Δ, v₂ = 0.99 v₁ + 0.01 Δ².
    let round2 = run(&mut agg, &round1, &updates);
    for (i, d) in [0.1f64, -0.2].into_iter().enumerate() {
        let (m1, v1) = (0.1 * d, 0.99e-6 + 0.01 * d * d);
        let (m2, v2) = (0.9 * m1 + 0.1 * d, 0.99 * v1 + 0.01 * d * d);
        let want = f64::from(round1.tensors[SCALE].data()[i]) + 0.1 * m2 / (v2.sqrt() + 1e-3);
        let got = f64::from(round2.tensors[SCALE].data()[i]);
        assert!((got - want).abs() < 1e-6, "round 2, coordinate {i}: {got} vs {want}");
    }

    // A fresh aggregator restored from round 1's state takes the same second step.
    let mut restored =
        Aggregator::new(spec.clone(), AggregateConfig { server_opt: ServerOpt::FedAdam(cfg), ..Default::default() })
            .unwrap();
    restored.load_server_state(&state).unwrap();
    assert_eq!(run(&mut restored, &round1, &updates), round2);
    let mut broken = state.clone();
    broken.remove(&format!("{FEDADAM_V_PREFIX}{SHIFT}"));
    assert!(restored.load_server_state(&broken).unwrap_err().to_string().contains("fedadam.v.t.ssf_shift"));
}

#[test]
fn fedadam_leaves_slots_nobody_used_and_their_moments_alone() {
    let spec = PoolSpec::ssf_pool(vec![TargetSpec { name: "t".into(), dim_in: 1, dim_out: 1 }], 1, 3, 1, None);
    let g = AdapterPool::zeros(&spec);
    let server_opt = ServerOpt::FedAdam(FedAdamConfig::default());
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig { server_opt, ..Default::default() }).unwrap();
    let tensors = spec
        .layout()
        .into_iter()
        .map(|l| (l.name, HostTensor::full(&[1, l.shape[1]], 0.5)))
        .collect::<BTreeMap<_, _>>();
    let d = PoolDelta { spec_hash: spec.hash(), slots: Some(SlotUsage { slots: vec![1], counts: vec![2] }), tensors };
    let out = run(&mut agg, &g, &[(d, 2)]);
    let scale = out.tensors[SCALE].data();
    assert!(scale[0] == 0.0 && scale[2] == 0.0 && scale[1] > 0.0, "{scale:?}");
    let m = &agg.server_state()[&format!("{FEDADAM_M_PREFIX}{SCALE}")];
    assert_eq!(m.data()[0], 0.0);
    assert_eq!(m.data()[2], 0.0);
}

// ---- Byzantine clients: 8 honest + 2 attackers (issue 16) ---------------------------------------

/// A standard LoRA pool shaped like the tiny test BERT's (2 layers, q and v, width 32, head 2).
fn tiny_lora_spec() -> PoolSpec {
    let targets = (0..2)
        .flat_map(|l| {
            ["query", "value"].map(|m| TargetSpec { name: format!("layer.{l}.{m}"), dim_in: 32, dim_out: 32 })
        })
        .collect();
    PoolSpec::lora(targets, 4, 8.0, Some(HeadSpec::new(32, 2)))
}

/// A deterministic N(0, 1)-ish value from a seed and an index (a sum of uniforms).
fn noise(seed: u64, i: usize) -> f32 {
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut s = 0.0f32;
    for _ in 0..4 {
        z ^= z >> 31;
        z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
        s += (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    }
    s * 1.7
}

/// Honest client `k`'s delta: a common direction (the task's) plus its own noise of the same size.
fn honest_delta(spec: &PoolSpec, k: u64) -> PoolDelta {
    let zeros = AdapterPool::zeros(spec);
    let mut trained = zeros.clone();
    for (t, (_, tensor)) in trained.tensors.iter_mut().enumerate() {
        for (i, v) in tensor.data_mut().iter_mut().enumerate() {
            *v = 0.01 * (noise(1000 + t as u64, i) + noise(k, t * 100_000 + i));
        }
    }
    trained.delta_from(&zeros).unwrap()
}

fn scaled(d: &PoolDelta, factor: f32) -> PoolDelta {
    let mut d = d.clone();
    d.tensors.values_mut().for_each(|t| t.scale(factor));
    d
}

#[test]
fn robust_rules_keep_the_global_near_the_honest_one_under_two_attackers_and_fedavg_does_not() {
    let spec = tiny_lora_spec();
    let g = AdapterPool::init(&spec, 3).unwrap();
    let honest: Vec<PoolDelta> = (0..8).map(|k| honest_delta(&spec, k)).collect();
    // Attacker 1 sends 100× an honest delta; attacker 2 its honest delta sign-flipped.
    let attackers = [scaled(&honest_delta(&spec, 8), 100.0), scaled(&honest_delta(&spec, 9), -1.0)];
    let weighted = |ds: &[PoolDelta]| -> Vec<(PoolDelta, u64)> { ds.iter().map(|d| (d.clone(), 100)).collect() };
    let mut plain = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    let honest_global = run(&mut plain, &g, &weighted(&honest));
    let step = distance(&honest_global, &g);
    let all: Vec<PoolDelta> = honest.iter().chain(&attackers).cloned().collect();

    let rules = [
        ("fedavg", Rule::Mean),
        ("trimmed-mean β=0.2", Rule::TrimmedMean { trim_fraction: 0.2, max_updates: 64 }),
        ("median", Rule::Median { max_updates: 64 }),
        ("krum f=2", Rule::Krum { byzantine: 2, select: 1, max_updates: 64 }),
        ("multi-krum f=2 m=6", Rule::Krum { byzantine: 2, select: 6, max_updates: 64 }),
    ];
    println!("8 honest + 2 attackers (×100, sign-flipped); honest step ‖Δ‖ = {step:.4}");
    println!("| rule | ‖global − honest-only global‖ | ÷ honest step |");
    let mut ratios = BTreeMap::new();
    for (name, rule) in rules {
        let mut agg = Aggregator::new(spec.clone(), AggregateConfig { rule, ..Default::default() }).unwrap();
        let out = run(&mut agg, &g, &weighted(&all));
        let d = distance(&out, &honest_global);
        println!("| {name} | {d:.4} | {:.3} |", d / step);
        ratios.insert(name, d / step);
    }
    assert!(ratios["fedavg"] > 5.0, "FedAvg is taken over: {ratios:?}");
    // Stated bounds: the averaging rules stay within 0.35 of one honest step of the honest-only
    // global; Krum alone keeps a single honest client's delta (its own noise is as large as the
    // step), so within 1 step.
    for (name, r) in &ratios {
        let bound = match *name {
            "fedavg" => continue,
            "krum f=2" => 1.0,
            _ => 0.35,
        };
        assert!(*r < bound, "{name}: {r} of the honest step");
    }
}

#[test]
fn median_and_krum_buffer_at_most_max_updates_and_refuse_the_exact_lora_merge() {
    let spec = tiny_lora_spec();
    let g = AdapterPool::init(&spec, 3).unwrap();
    for rule in [Rule::Median { max_updates: 2 }, Rule::Krum { byzantine: 0, select: 1, max_updates: 2 }] {
        let mut agg = Aggregator::new(spec.clone(), AggregateConfig { rule, ..Default::default() }).unwrap();
        agg.begin(&g).unwrap();
        agg.fold(&honest_delta(&spec, 0), 10).unwrap();
        agg.fold(&honest_delta(&spec, 1), 10).unwrap();
        let e = agg.fold(&honest_delta(&spec, 2), 10).unwrap_err();
        assert!(e.to_string().contains("max_updates"), "{e}");
        let exact =
            AggregateConfig { rule, lora_merge: fedpool_server::aggregate::LoraMerge::Exact, ..Default::default() };
        assert!(Aggregator::new(spec.clone(), exact).is_err());
    }
}

#[test]
fn a_capped_weight_scales_an_updates_slot_counts_like_its_examples() {
    // Two SSF updates: 10 examples weighed fully and one claiming 1000 weighed 10 by the
    // coordinator: the merge is their plain mean, as if both had 10.
    let spec = spec(4);
    let g = global(&spec);
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(&g).unwrap();
    agg.fold(&update(&spec, vec![0.1; 4], vec![0.0; 4], 10), 10).unwrap();
    agg.fold_weighted(&update(&spec, vec![0.3; 4], vec![0.0; 4], 1000), 1000, 10).unwrap();
    let out = agg.finish(&g).unwrap();
    let moved = out.tensors[SCALE].data()[0] - 1.0;
    assert!((moved - 0.2).abs() < 1e-6, "moved {moved}");
    agg.begin(&g).unwrap();
    assert!(agg.fold_weighted(&update(&spec, vec![0.3; 4], vec![0.0; 4], 10), 10, 11).is_err(), "weight above claim");
}
