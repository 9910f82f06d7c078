//! Rank budgets under bandwidth: grants fit their byte budget as the real codec and framing
//! measure it, follow importance, never shrink with more bandwidth, respect the schedule, and
//! refuse bad inputs by name.

use std::time::Duration;

use fedpool_common::adapter::{HEAD_BIAS, HEAD_WEIGHT};
use fedpool_common::codec::{encode, CodecConfig, Quantization};
use fedpool_common::wire::{ClientMessage, TrainMetrics, TripletImportance, Update};
use fedpool_common::{HeadSpec, HostTensor, Nonce, PoolDelta, PoolSpec, Round, TargetSpec, TaskId};
use fedpool_server::budget::{
    allocate, allocate_knapsack, AllocationInput, BudgetError, ClientAllocation, ClientLink, CubicSchedule, Grant,
    TripletCosts,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MAX_RANK: usize = 8;
const D_IN: usize = 48;
const D_OUT: usize = 32;
const DEADLINE: Duration = Duration::from_secs(10);

fn spec_with(targets: usize, max_rank: usize) -> PoolSpec {
    let targets = (0..targets)
        .map(|i| TargetSpec { name: format!("encoder.layer.{i}.attention.self.query"), dim_in: D_IN, dim_out: D_OUT })
        .collect();
    PoolSpec::adalora(targets, max_rank, 16.0, Some(HeadSpec::new(D_IN, 2)))
}

fn spec() -> PoolSpec {
    spec_with(4, MAX_RANK)
}

fn fp32() -> CodecConfig {
    CodecConfig::default()
}

fn int8() -> CodecConfig {
    CodecConfig { quantization: Quantization::Int8, ..CodecConfig::default() }
}

fn top_k_int4_zstd() -> CodecConfig {
    CodecConfig { top_k: Some(0.1), quantization: Quantization::Int4, zstd_level: Some(3), ..CodecConfig::default() }
}

/// Importance that decreases along each target's rank index, at different speeds per target.
fn decreasing_importance(spec: &PoolSpec) -> Vec<Vec<f64>> {
    (0..spec.targets.len())
        .map(|t| (0..spec.max_rank).map(|r| 10.0 / (1.0 + r as f64 * (t + 1) as f64)).collect())
        .collect()
}

fn link(client: &str, upload_bps: f64, compute_secs: f64) -> ClientLink {
    ClientLink { client: client.into(), upload_bps, compute: Duration::from_secs_f64(compute_secs) }
}

fn input<'a>(
    spec: &'a PoolSpec,
    costs: &'a TripletCosts,
    importance: &'a [Vec<f64>],
    schedule_budget: usize,
    clients: &'a [ClientLink],
) -> AllocationInput<'a> {
    AllocationInput { spec, costs, importance, schedule_budget, deadline: DEADLINE, safety_margin: 0.9, clients }
}

fn ranks_of(a: &ClientAllocation) -> Option<Vec<usize>> {
    match &a.grant {
        Grant::Train { ranks, .. } => Some(ranks.iter().map(|b| b.rank as usize).collect()),
        Grant::SitOut { .. } => None,
    }
}

fn budget_of(a: &ClientAllocation) -> u64 {
    match a.grant {
        Grant::Train { byte_budget, .. } | Grant::SitOut { byte_budget, .. } => byte_budget,
    }
}

/// A random LoRA delta at `ranks` with the head, as a client would train it.
fn trained_delta(spec: &PoolSpec, ranks: &[usize], seed: u64) -> PoolDelta {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut random = |shape: Vec<usize>| {
        let n = shape.iter().product();
        HostTensor::new(shape, (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect()).unwrap()
    };
    let mut tensors = std::collections::BTreeMap::new();
    for (t, &r) in spec.targets.iter().zip(ranks) {
        tensors.insert(format!("{}.lora_A.weight", t.name), random(vec![r, t.dim_in]));
        tensors.insert(format!("{}.lora_E.weight", t.name), random(vec![r, 1]));
        tensors.insert(format!("{}.lora_B.weight", t.name), random(vec![t.dim_out, r]));
    }
    let head = spec.head.unwrap();
    tensors.insert(HEAD_WEIGHT.into(), random(vec![head.num_labels, head.dim_in]));
    tensors.insert(HEAD_BIAS.into(), random(vec![head.num_labels]));
    let delta = PoolDelta { spec_hash: spec.hash(), slots: None, tensors };
    delta.validate(spec).unwrap();
    delta
}

/// The bytes of the whole `Update` frame a client would send with `ranks`.
fn real_update_frame_len(spec: &PoolSpec, ranks: &[usize], codec: &CodecConfig, seed: u64) -> u64 {
    update_frame_len(spec, ranks, codec, seed, false)
}

/// As [`real_update_frame_len`]; with `longest_ids`, every id and count takes its longest varint.
fn update_frame_len(spec: &PoolSpec, ranks: &[usize], codec: &CodecConfig, seed: u64, longest_ids: bool) -> u64 {
    let delta = encode(&trained_delta(spec, ranks, seed), codec, None, seed).unwrap();
    let importance = spec
        .targets
        .iter()
        .map(|t| TripletImportance { target: t.name.clone(), scores: vec![0.25; spec.max_rank] })
        .collect();
    let mut update = Update {
        round: Round(12_345),
        task_id: TaskId(987_654_321),
        nonce: Nonce([7; 16]),
        examples: 3_546,
        delta,
        metrics: TrainMetrics { loss: 0.41, accuracy: 0.87, steps: 200, seconds: 31.5 },
        importance,
    };
    if longest_ids {
        (update.round, update.task_id, update.examples, update.metrics.steps) =
            (Round(u64::MAX), TaskId(u64::MAX), u64::MAX, u32::MAX);
    }
    ClientMessage::Update(update).to_frame().unwrap().len() as u64
}

/// Bandwidths from far too slow to more than enough for the 8 s window the clients have.
fn bandwidth_sweep(n: usize) -> Vec<ClientLink> {
    (0..n).map(|i| link(&format!("client-{i}"), 40.0 * 1.25f64.powi(i as i32), 2.0)).collect()
}

#[test]
fn grants_fit_their_budget_as_the_real_codec_encodes_them() {
    let spec = spec();
    let importance = decreasing_importance(&spec);
    let clients = bandwidth_sweep(40);
    println!("spec: 4 targets {D_IN}→{D_OUT}, max_rank {MAX_RANK}, head 2×{D_IN}");
    println!("| codec | fixed B | per triplet B | rank-1 B | full rank B | trained / sat out | bound − real B |");
    for codec in [fp32(), int8(), top_k_int4_zstd()] {
        let costs = TripletCosts::measure(&spec, &codec, 1).unwrap();
        let (mut trained, mut sat_out) = (0, 0);
        let (mut least_slack, mut most_slack) = (u64::MAX, 0);
        for schedule_budget in [4, 13, 32] {
            let allocations = allocate(&input(&spec, &costs, &importance, schedule_budget, &clients)).unwrap();
            for (i, a) in allocations.iter().enumerate() {
                let Grant::Train { expected_bytes, byte_budget, .. } = a.grant else {
                    sat_out += 1;
                    continue;
                };
                trained += 1;
                let ranks = ranks_of(a).unwrap();
                let real = real_update_frame_len(&spec, &ranks, &codec, 100 + i as u64);
                assert!(expected_bytes <= byte_budget, "{}: {expected_bytes} > {byte_budget}", a.client);
                assert!(
                    real <= expected_bytes,
                    "{} {ranks:?} with {}: real frame {real} B > bound {expected_bytes} B",
                    a.client,
                    codec.describe()
                );
                least_slack = least_slack.min(expected_bytes - real);
                most_slack = most_slack.max(expected_bytes - real);
                if codec.zstd_level.is_none() {
                    // The bound is tight for dense codecs: worst-case varints and length fields only.
                    assert!(expected_bytes <= real + 128, "{ranks:?}: bound {expected_bytes} B, real {real} B");
                }
            }
        }
        assert!(trained > 20 && sat_out > 0, "the sweep covers both outcomes: {trained} / {sat_out}");
        println!(
            "| {} | {} | {:.2} | {} | {} | {trained} / {sat_out} | {least_slack}..={most_slack} |",
            codec.describe(),
            costs.fixed(),
            costs.per_triplet()[0],
            costs.bytes(&[1; 4]),
            costs.bytes(&[MAX_RANK; 4]),
        );
    }
}

#[test]
fn the_bound_holds_at_every_rank_with_the_longest_ids() {
    // Two shapes, one with a wide output so B's value bytes cross the varint steps.
    let targets = vec![
        TargetSpec { name: "q".into(), dim_in: 40, dim_out: 24 },
        TargetSpec { name: "ffn.output.dense".into(), dim_in: 36, dim_out: 300 },
    ];
    let spec = PoolSpec::adalora(targets, MAX_RANK, 16.0, Some(HeadSpec::new(40, 5)));
    let top_k =
        CodecConfig { top_k: Some(0.25), quantization: Quantization::Int8, block_size: 16, ..CodecConfig::default() };
    let int4 = CodecConfig { quantization: Quantization::Int4, block_size: 32, ..CodecConfig::default() };
    for codec in [fp32(), int8(), int4, top_k] {
        let costs = TripletCosts::measure(&spec, &codec, 3).unwrap();
        let mut most_slack = 0;
        for a in 1..=MAX_RANK {
            for b in 1..=MAX_RANK {
                let real = update_frame_len(&spec, &[a, b], &codec, (a * 10 + b) as u64, true);
                let bound = costs.bytes(&[a, b]);
                assert!(real <= bound, "{} ranks [{a}, {b}]: {real} B > bound {bound} B", codec.describe());
                most_slack = most_slack.max(bound - real);
            }
        }
        println!("{}: bound − real ≤ {most_slack} B over all 64 rank pairs", codec.describe());
    }
}

#[test]
fn measured_costs_follow_the_codec() {
    let spec = spec();
    let triplet_values = (D_IN + 1 + D_OUT) as f64;
    let dense = TripletCosts::measure(&spec, &fp32(), 1).unwrap();
    let quantized = TripletCosts::measure(&spec, &int8(), 1).unwrap();
    for (t, (&f, &q)) in dense.per_triplet().iter().zip(quantized.per_triplet()).enumerate() {
        // fp32: 4 bytes a value; int8: 1 byte a value and a 4-byte scale per 64 values; both plus
        // the length prefixes that grow past 250 bytes.
        assert!((4.0 * triplet_values..4.0 * triplet_values + 8.0).contains(&f), "target {t}: fp32 {f}");
        assert!((triplet_values * (1.0 + 4.0 / 64.0)..triplet_values * 1.2).contains(&q), "target {t}: int8 {q}");
    }
    assert_eq!(dense, TripletCosts::measure(&spec, &fp32(), 1).unwrap(), "deterministic");
    // The fixed part carries the head, the ids and one importance score per triplet at max_rank.
    assert!(dense.fixed() > quantized.fixed());
    assert!(dense.fixed() as usize > 4 * 2 * D_IN + 4 * 4 * MAX_RANK);
}

#[test]
fn rank_one_specs_cost_one_fixed_update() {
    let spec = spec_with(3, 1);
    let costs = TripletCosts::measure(&spec, &int8(), 5).unwrap();
    assert!(costs.per_triplet().iter().all(|&c| c == 0.0));
    let importance = vec![vec![1.0]; 3];
    let clients = [link("fast", 1e6, 1.0)];
    let allocations = allocate(&input(&spec, &costs, &importance, 0, &clients)).unwrap();
    assert_eq!(ranks_of(&allocations[0]), Some(vec![1, 1, 1]));
    assert!(real_update_frame_len(&spec, &[1, 1, 1], &int8(), 9) <= costs.bytes(&[1, 1, 1]));
}

#[test]
fn a_client_too_slow_to_finish_sits_out() {
    let spec = spec();
    let costs = TripletCosts::measure(&spec, &int8(), 1).unwrap();
    let importance = decreasing_importance(&spec);
    let needed = costs.bytes(&[1; 4]);
    // Just enough for rank 1 everywhere in an 8 s window at margin 0.9, and just too little.
    let enough = needed as f64 / (8.0 * 0.9) + 1.0;
    let clients = [
        link("computes-past-the-deadline", 1e9, 10.0),
        link("no-bandwidth", 0.0, 1.0),
        link("just-too-slow", needed as f64 / (8.0 * 0.9) - 1.0, 2.0),
        link("just-fast-enough", enough, 2.0),
    ];
    let allocations = allocate(&input(&spec, &costs, &importance, 32, &clients)).unwrap();
    assert_eq!(allocations[0].grant, Grant::SitOut { byte_budget: 0, needed_bytes: needed });
    assert_eq!(allocations[1].grant, Grant::SitOut { byte_budget: 0, needed_bytes: needed });
    assert!(
        matches!(allocations[2].grant, Grant::SitOut { needed_bytes: n, byte_budget: b } if n == needed && b < needed)
    );
    assert_eq!(ranks_of(&allocations[3]), Some(vec![1; 4]));
    let names: Vec<&str> = allocations.iter().map(|a| a.client.as_str()).collect();
    assert_eq!(names, clients.iter().map(|c| c.client.as_str()).collect::<Vec<_>>(), "input order kept");
}

#[test]
fn plenty_of_bandwidth_gets_the_schedule_budget_most_important_first() {
    let spec = spec();
    let costs = TripletCosts::measure(&spec, &fp32(), 1).unwrap();
    // Target 2 matters most, then 0, then 3, then 1 (each non-increasing along its ranks).
    let weight = [3.0, 1.0, 4.0, 2.0];
    let importance: Vec<Vec<f64>> =
        weight.iter().map(|w| (0..MAX_RANK).map(|r| w * 10.0 - r as f64).collect()).collect();
    let clients = [link("fast", 1e9, 0.0)];
    let grant = |budget| ranks_of(&allocate(&input(&spec, &costs, &importance, budget, &clients)).unwrap()[0]);
    assert_eq!(grant(32), Some(vec![MAX_RANK; 4]));
    // 4 + 7 extra triplets: target 2's seven (scores 39..33) come before target 0's first (29).
    assert_eq!(grant(11), Some(vec![1, 1, 8, 1]));
    assert_eq!(grant(14), Some(vec![4, 1, 8, 1]));
    // A schedule below one triplet per target still trains rank 1 everywhere.
    assert_eq!(grant(0), Some(vec![1; 4]));
    assert_eq!(grant(3), Some(vec![1; 4]));
}

#[test]
fn the_grant_stops_at_the_first_important_triplet_that_does_not_fit() {
    // Target 0 is important and costs 100 bytes a triplet; target 1 is cheap and less important.
    let spec = spec_with(2, 4);
    let costs = TripletCosts::new(1_000, vec![100.0, 1.0]).unwrap();
    let importance = vec![vec![9.0, 9.0, 8.0, 7.0], vec![5.0, 5.0, 4.0, 3.0]];
    // 8 s × 0.9 at 175 B/s: 1,260 B. Rank 1 everywhere is 1,101 B; one more triplet of target 0
    // makes 1,201 B.
    let clients = [link("a", 175.0, 2.0)];
    let a = allocate(&input(&spec, &costs, &importance, 8, &clients)).unwrap();
    assert_eq!(ranks_of(&a[0]), Some(vec![2, 1]), "target 0's third triplet (1,301 B) does not fit");
    // Skipping it to grant target 1's cheaper but less important triplets would make a slightly
    // faster client lose them again (see `more_bandwidth_never_takes_a_triplet_away`).
}

#[test]
fn more_bandwidth_never_takes_a_triplet_away() {
    // The case that breaks "skip what does not fit": an expensive important target, a cheap one.
    let spec = spec_with(2, 8);
    let costs = TripletCosts::new(500, vec![60.0, 1.0]).unwrap();
    let importance =
        vec![(0..8).map(|r| 10.0 - r as f64 * 0.1).collect(), (0..8).map(|r| 5.0 - r as f64 * 0.1).collect()];
    let clients: Vec<ClientLink> = (0..400).map(|i| link(&format!("c{i}"), 60.0 + i as f64 * 0.5, 2.0)).collect();
    let allocations = allocate(&input(&spec, &costs, &importance, 16, &clients)).unwrap();
    let ranks: Vec<Vec<usize>> = allocations.iter().map(|a| ranks_of(a).unwrap_or_default()).collect();
    for (i, pair) in ranks.windows(2).enumerate() {
        assert!(monotone(&pair[0], &pair[1]), "client {i} {:?} → client {} {:?}", pair[0], i + 1, pair[1]);
    }
}

#[test]
fn schedule_drives_the_grants_over_a_run() {
    let spec = spec();
    let costs = TripletCosts::measure(&spec, &int8(), 1).unwrap();
    let importance = decreasing_importance(&spec);
    let schedule =
        CubicSchedule { init_budget: 8 * 4, target_budget: 2 * 4, warmup_rounds: 2, final_rounds: 3, total_rounds: 20 };
    let clients = [link("fast", 1e9, 0.0)];
    let mut last = usize::MAX;
    for round in 1..=20 {
        let budget = schedule.budget(Round(round));
        let a = allocate(&input(&spec, &costs, &importance, budget, &clients)).unwrap();
        let total: usize = ranks_of(&a[0]).unwrap().iter().sum();
        assert_eq!(total, budget, "round {round}");
        assert!(total <= last);
        last = total;
    }
    assert_eq!(last, 8);
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let spec = spec();
    let costs = TripletCosts::measure(&spec, &fp32(), 1).unwrap();
    let importance = decreasing_importance(&spec);
    let ok = [link("hospital-a", 1e5, 1.0)];
    let refuse = |i: AllocationInput<'_>| match allocate(&i) {
        Err(e @ BudgetError::Input { .. }) => e.to_string(),
        other => panic!("expected an input error, got {other:?}"),
    };
    let base = input(&spec, &costs, &importance, 32, &ok);
    allocate(&base).unwrap();

    let nan = [link("hospital-a", 1e5, 1.0), link("hospital-b", f64::NAN, 1.0)];
    let msg = refuse(AllocationInput { clients: &nan, ..base });
    assert!(msg.contains("clients[1] \"hospital-b\": upload_bps") && msg.contains("NaN"), "{msg}");
    for bad in [-1.0, f64::INFINITY] {
        let c = [link("hospital-a", bad, 1.0)];
        assert!(refuse(AllocationInput { clients: &c, ..base }).contains("upload_bps"));
    }
    let twice = [link("hospital-a", 1e5, 1.0), link("hospital-a", 2e5, 1.0)];
    assert!(refuse(AllocationInput { clients: &twice, ..base }).contains("\"hospital-a\" is also clients[0]"));

    let msg = refuse(AllocationInput { deadline: Duration::ZERO, ..base });
    assert!(msg.contains("deadline"), "{msg}");
    for m in [0.0, 1.5, f64::NAN, -0.5] {
        let msg = refuse(AllocationInput { safety_margin: m, ..base });
        assert!(msg.contains("safety_margin"), "{msg}");
    }

    let mut short = importance.clone();
    short[2].pop();
    let msg = refuse(AllocationInput { importance: &short, ..base });
    assert!(msg.contains("importance[2]") && msg.contains("encoder.layer.2") && msg.contains("7 scores"), "{msg}");
    let msg = refuse(AllocationInput { importance: &importance[..3], ..base });
    assert!(msg.contains("importance") && msg.contains("3 targets"), "{msg}");
    let mut nan_score = importance.clone();
    nan_score[1][4] = f64::NAN;
    assert!(refuse(AllocationInput { importance: &nan_score, ..base }).contains("rank index 4"));

    let three = TripletCosts::new(10, vec![1.0; 3]).unwrap();
    assert!(refuse(AllocationInput { costs: &three, ..base }).contains("costs"));
    assert!(TripletCosts::new(10, vec![1.0, f64::NAN]).unwrap_err().to_string().contains("per_triplet[1]"));

    let ssf = PoolSpec::ssf(spec.targets.clone(), None);
    assert!(matches!(allocate(&AllocationInput { spec: &ssf, ..base }), Err(BudgetError::Spec(_))));
    assert!(matches!(TripletCosts::measure(&ssf, &fp32(), 1), Err(BudgetError::Spec(_))));
    let bad_codec = CodecConfig { top_k: Some(2.0), ..fp32() };
    let err = TripletCosts::measure(&spec, &bad_codec, 1).unwrap_err();
    assert!(matches!(err, BudgetError::Codec { .. }) && err.to_string().contains("top_k"), "{err}");
}

/// `b` has at least the rank of `a` on every target (a sit-out is the empty grant).
fn monotone(a: &[usize], b: &[usize]) -> bool {
    a.is_empty() || (a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x <= y))
}

/// A random allocation problem: targets, max rank, costs, importance (not necessarily sorted),
/// schedule budget, margin.
fn problem() -> impl Strategy<Value = (PoolSpec, TripletCosts, Vec<Vec<f64>>, usize, f64)> {
    (1usize..5, 1usize..10).prop_flat_map(|(targets, max_rank)| {
        (
            0u64..2_000,
            prop::collection::vec(0.0f64..500.0, targets),
            prop::collection::vec(prop::collection::vec(0.0f64..10.0, max_rank), targets),
            0usize..targets * max_rank + 3,
            0.05f64..=1.0,
        )
            .prop_map(move |(fixed, per, importance, schedule, margin)| {
                (spec_with(targets, max_rank), TripletCosts::new(fixed, per).unwrap(), importance, schedule, margin)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn grants_fit_and_never_shrink_with_bandwidth(
        (spec, costs, importance, schedule, margin) in problem(),
        slow in 0.0f64..20_000.0,
        extra in 0.0f64..20_000.0,
        compute in 0.0f64..12.0,
    ) {
        let clients = [link("slow", slow, compute), link("fast", slow + extra, compute)];
        let i = AllocationInput { safety_margin: margin, ..input(&spec, &costs, &importance, schedule, &clients) };
        let out = allocate(&i).unwrap();
        prop_assert_eq!(&out, &allocate(&i).unwrap(), "deterministic");
        let cap = schedule.max(spec.targets.len());
        for a in &out {
            if let Grant::Train { ranks, expected_bytes, byte_budget } = &a.grant {
                let r: Vec<usize> = ranks.iter().map(|b| b.rank as usize).collect();
                prop_assert_eq!(costs.bytes(&r), *expected_bytes);
                prop_assert!(expected_bytes <= byte_budget);
                prop_assert!(r.iter().all(|&x| (1..=spec.max_rank).contains(&x)), "{:?}", r);
                prop_assert!(r.iter().sum::<usize>() <= cap);
                prop_assert!(compute < DEADLINE.as_secs_f64());
                prop_assert_eq!(ranks.iter().map(|b| b.target.as_str()).collect::<Vec<_>>(),
                    spec.targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
            }
        }
        prop_assert!(budget_of(&out[0]) <= budget_of(&out[1]));
        let (s, f) = (ranks_of(&out[0]).unwrap_or_default(), ranks_of(&out[1]).unwrap_or_default());
        prop_assert!(monotone(&s, &f), "slow {:?}, fast {:?}", s, f);
        prop_assert!(s.iter().sum::<usize>() <= f.iter().sum::<usize>());
    }

    #[test]
    fn no_left_out_triplet_outranks_a_granted_one(
        (spec, costs, mut importance, schedule, margin) in problem(),
        bps in 0.0f64..20_000.0,
    ) {
        // The engine keeps each target's triplets sorted by importance. Then the grant is the
        // most important set: a triplet left out that outranks a granted one would have had to
        // not fit, and the prefix rule stops at the first that does not, so there is none.
        importance.iter_mut().for_each(|s| s.sort_by(|a, b| b.total_cmp(a)));
        let clients = [link("k", bps, 1.0)];
        let i = AllocationInput { safety_margin: margin, ..input(&spec, &costs, &importance, schedule, &clients) };
        let out = allocate(&i).unwrap();
        let Some(r) = ranks_of(&out[0]) else { return Ok(()) };
        for (t, &rt) in r.iter().enumerate().filter(|(_, &rt)| rt >= 2) {
            // The least important triplet granted on t beyond rank 1 is index rt − 1.
            let granted = importance[t][rt - 1];
            for (u, &ru) in r.iter().enumerate().filter(|&(u, &ru)| u != t && ru < spec.max_rank) {
                prop_assert!(
                    importance[u][ru] <= granted,
                    "target {} index {} (score {}) left out, target {} index {} (score {}) granted",
                    u, ru, importance[u][ru], t, rt - 1, granted
                );
            }
        }
    }
}

/// The importance of a grant: Σ_t Σ_{i < r_t} I_t,i.
fn value(importance: &[Vec<f64>], ranks: &[usize]) -> f64 {
    importance.iter().zip(ranks).map(|(s, &r)| s[..r].iter().sum::<f64>()).sum()
}

/// Every rank vector in 1..=max_rank per target.
fn every_grant(targets: usize, max_rank: usize) -> Vec<Vec<usize>> {
    let mut all = vec![Vec::new()];
    for _ in 0..targets {
        all = all.into_iter().flat_map(|r| (1..=max_rank).map(move |x| [r.clone(), vec![x]].concat())).collect();
    }
    all
}

#[test]
fn the_knapsack_buys_a_later_triplet_worth_more_than_the_prefix_reaches() {
    // Target 0's second triplet is worth little, its third a lot; target 1 falls steadily. With
    // room for two triplets beyond rank 1, the greedy prefix takes target 1's two (0.5 + 0.4),
    // the knapsack target 0's two (0.05 + 0.9).
    let spec = spec_with(2, 4);
    let costs = TripletCosts::new(100, vec![50.0, 50.0]).unwrap();
    let importance = vec![vec![1.0, 0.05, 0.9, 0.01], vec![1.0, 0.5, 0.4, 0.3]];
    // Rank 1 everywhere: 100 + 2·50 = 200 B; the budget ⌊38 B/s × 9 s × 0.9⌋ = 307 B holds two
    // more triplets (300 B), not three.
    let clients = [link("k", 38.0, 1.0)];
    let i = input(&spec, &costs, &importance, 8, &clients);
    let greedy = ranks_of(&allocate(&i).unwrap()[0]).unwrap();
    let knapsack = ranks_of(&allocate_knapsack(&i).unwrap()[0]).unwrap();
    assert_eq!(greedy, [1, 3]);
    assert_eq!(knapsack, [3, 1]);
    assert!(value(&importance, &knapsack) > value(&importance, &greedy));
    // With importance falling along every target both agree.
    let sorted = decreasing_importance(&spec);
    let i = input(&spec, &costs, &sorted, 8, &clients);
    let (g, k) = (ranks_of(&allocate(&i).unwrap()[0]).unwrap(), ranks_of(&allocate_knapsack(&i).unwrap()[0]).unwrap());
    assert!((value(&sorted, &g) - value(&sorted, &k)).abs() < 1e-12, "greedy {g:?}, knapsack {k:?}");
    // Too slow for rank 1 everywhere: both sit the client out.
    let slow = [link("s", 1.0, 1.0)];
    let i = input(&spec, &costs, &importance, 8, &slow);
    assert!(matches!(allocate_knapsack(&i).unwrap()[0].grant, Grant::SitOut { needed_bytes: 200, .. }));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_knapsack_grant_is_the_most_important_that_fits(
        targets in 1usize..4,
        max_rank in 1usize..5,
        fixed in 0u64..200,
        per in prop::collection::vec(1u32..300, 3),
        importance in prop::collection::vec(prop::collection::vec(0.0f64..10.0, 4), 3),
        schedule in 0usize..14,
        bps in 0.0f64..220.0,
    ) {
        // Whole-byte costs and budgets under 2,048 bytes: the table's units are single bytes,
        // so the optimum over every rank vector (brute force) is what the table must find.
        let spec = spec_with(targets, max_rank);
        let costs = TripletCosts::new(fixed, per[..targets].iter().map(|&c| f64::from(c)).collect()).unwrap();
        let importance: Vec<Vec<f64>> = importance[..targets].iter().map(|s| s[..max_rank].to_vec()).collect();
        let clients = [link("k", bps, 1.0)];
        let i = input(&spec, &costs, &importance, schedule, &clients);
        let out = allocate_knapsack(&i).unwrap();
        prop_assert_eq!(&out, &allocate_knapsack(&i).unwrap(), "deterministic");
        let cap = schedule.clamp(targets, targets * max_rank);
        let budget = budget_of(&out[0]);
        let best = every_grant(targets, max_rank)
            .into_iter()
            .filter(|r| r.iter().sum::<usize>() <= cap && costs.bytes(r) < budget)
            .map(|r| value(&importance, &r))
            .fold(f64::NEG_INFINITY, f64::max);
        match (&out[0].grant, ranks_of(&out[0])) {
            (Grant::Train { expected_bytes, byte_budget, .. }, Some(r)) => {
                prop_assert!(expected_bytes <= byte_budget && costs.bytes(&r) == *expected_bytes);
                prop_assert!(r.iter().sum::<usize>() <= cap, "{:?} over the cap {}", r, cap);
                prop_assert!((value(&importance, &r) - best).abs() < 1e-9, "{:?}: {} < optimum {}", r, value(&importance, &r), best);
                if let Some(g) = ranks_of(&allocate(&i).unwrap()[0]) {
                    if costs.bytes(&g) < budget {
                        prop_assert!(value(&importance, &r) >= value(&importance, &g) - 1e-9);
                    }
                }
            }
            _ => prop_assert!(costs.bytes(&vec![1; targets]) > budget || budget == 0),
        }
    }
}
