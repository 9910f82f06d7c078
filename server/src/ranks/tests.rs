//! Tests of the rank planner: policies, global importance, the engine's grant check.
//!
//! The engine's refusal of an update above its grant is tested where the engine is driven,
//! `server/tests/integration/rank_grants.rs`.

use super::*;

use fedpool_common::codec::{self, CodecConfig};
use fedpool_common::wire::{TrainMetrics, TripletImportance, PROTOCOL_VERSION};
use fedpool_common::{BackboneFingerprint, HeadSpec, HostTensor, Nonce, Sha256, TargetSpec, TaskId};

const DEADLINE: Duration = Duration::from_secs(10);
const ROUNDS: u64 = 10;
const COMPUTE: Duration = Duration::from_secs(1);

/// Two AdaLoRA targets `t0`, `t1` with `max_rank` triplets each.
fn adalora(max_rank: usize) -> PoolSpec {
    let targets = (0..2).map(|i| TargetSpec { name: format!("t{i}"), dim_in: 4, dim_out: 4 }).collect();
    PoolSpec::adalora(targets, max_rank, 8.0, Some(HeadSpec::new(4, 2)))
}

/// Importance settings starting at `init_rank` triplets per target (≤ the spec's max_rank).
fn importance_settings(init_rank: usize, smoothing: f64) -> ImportanceSettings {
    ImportanceSettings {
        safety_margin: 0.8,
        init_rank,
        target_rank: 2,
        warmup_rounds: 1,
        final_rounds: 1,
        smoothing,
        upload_codec: CodecConfig::default(),
    }
}

fn planner(spec: PoolSpec, policy: RankPolicy) -> RankPlanner {
    RankPlanner::new(spec, policy, DEADLINE, ROUNDS, COMPUTE).unwrap()
}

/// The `field` of a refused planner configuration.
fn refused_field(result: Result<impl std::fmt::Debug, BudgetError>) -> String {
    match result {
        Err(BudgetError::Input { field, .. }) => field,
        other => panic!("expected an input error, got {other:?}"),
    }
}

fn enroll(upload_bps: Option<u64>) -> Enroll {
    Enroll {
        protocol_version: PROTOCOL_VERSION,
        backbone: BackboneFingerprint(Sha256::of(b"ranks")),
        spec_hash: adalora(4).hash(),
        declared_upload_bps: upload_bps,
        declared_download_bps: None,
        examples: 10,
        software: "test".into(),
    }
}

/// An accepted update of `examples` examples with these triplet scores (`(target, scores)`);
/// the planner reads only its examples, training time and scores.
fn update(spec: &PoolSpec, examples: u64, scores: &[(&str, &[f32])]) -> Update {
    let delta = AdapterPool::zeros(spec).to_transfer(spec).unwrap();
    Update {
        round: Round(1),
        task_id: TaskId(1),
        nonce: Nonce([0; 16]),
        examples,
        delta: codec::encode(&delta, &CodecConfig::default(), None, 0).unwrap(),
        metrics: TrainMetrics { loss: 1.0, accuracy: 0.5, steps: 1, seconds: 1.0 },
        importance: scores
            .iter()
            .map(|(target, s)| TripletImportance { target: target.to_string(), scores: s.to_vec() })
            .collect(),
    }
}

/// A global pool whose `lora_E` of target `tI` is `e[I]` (everything else zero).
fn global_with_e(spec: &PoolSpec, e: [[f32; 3]; 2]) -> AdapterPool {
    let mut pool = AdapterPool::zeros(spec);
    for (t, values) in e.iter().enumerate() {
        pool.tensors.insert(format!("t{t}.lora_E.weight"), HostTensor::new(vec![3, 1], values.to_vec()).unwrap());
    }
    pool.validate(spec).unwrap();
    pool
}

fn assert_importance(got: &[Vec<f64>], want: &[[f64; 3]; 2]) {
    assert_eq!(got.len(), 2, "{got:?}");
    for (t, (row, expected)) in got.iter().zip(want).enumerate() {
        assert_eq!(row.len(), 3, "target {t}: {got:?}");
        for (i, (g, w)) in row.iter().zip(expected).enumerate() {
            assert!((g - w).abs() < 1e-12, "I[{t}][{i}] = {g}, expected {w} (all: {got:?}, expected {want:?})");
        }
    }
}

/// Every target's rank in one plan (targets in spec order), or None for a sit-out.
fn ranks(spec: &PoolSpec, plan: &Plan) -> Option<Vec<u32>> {
    match plan {
        Plan::Train(budgets) => {
            let names: Vec<&str> = budgets.iter().map(|b| b.target.as_str()).collect();
            let expected: Vec<&str> = spec.targets.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, expected, "one budget per target, in spec order");
            Some(budgets.iter().map(|b| b.rank).collect())
        }
        Plan::SitOut(_) => None,
    }
}

fn names(clients: &[&str]) -> Vec<String> {
    clients.iter().map(|c| c.to_string()).collect()
}

// ---- global importance -------------------------------------------------------------------------

#[test]
fn before_the_first_commit_the_importance_of_triplet_i_is_one_over_i_plus_one_on_every_target() {
    let p = planner(adalora(3), RankPolicy::Importance(importance_settings(3, 0.5)));
    assert_importance(p.importance(), &[[1.0, 0.5, 1.0 / 3.0], [1.0, 0.5, 1.0 / 3.0]]);
}

#[test]
fn a_commit_mixes_the_example_weighted_client_scores_and_the_globals_singular_values_half_and_half() {
    let spec = adalora(3);
    let beta = 0.25;
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(3, beta)));
    // Client a: 10 examples; client b: 30. An unknown target's scores are ignored.
    p.observe_update("a", &update(&spec, 10, &[("t0", &[4.0, 2.0, 1.0]), ("t1", &[1.0, 1.0, 0.0])]));
    p.observe_update(
        "b",
        &update(&spec, 30, &[("t0", &[0.0, 2.0, 3.0]), ("t1", &[2.0, 0.0, 1.0]), ("elsewhere", &[1e6, 1e6, 1e6])]),
    );
    p.committed(&global_with_e(&spec, [[3.0, -1.0, 0.0], [-0.5, 0.5, 0.0]]));

    // c = (10·s_a + 30·s_b) / 40:
    //   t0: (40 + 0, 20 + 60, 10 + 90) / 40 = (1, 2, 2.5)
    //   t1: (10 + 60, 10 + 0, 0 + 30) / 40 = (1.75, 0.25, 0.75)        Σc = 8.25
    // σ = |E|: t0 (3, 1, 0), t1 (0.5, 0.5, 0)                           Σσ = 5
    let c = [[1.0, 2.0, 2.5], [1.75, 0.25, 0.75]];
    let sigma = [[3.0, 1.0, 0.0], [0.5, 0.5, 0.0]];
    let before = [1.0, 0.5, 1.0 / 3.0];
    let mut want = [[0.0; 3]; 2];
    for t in 0..2 {
        for i in 0..3 {
            let u = 0.5 * c[t][i] / 8.25 + 0.5 * sigma[t][i] / 5.0;
            want[t][i] = beta * before[i] + (1.0 - beta) * u;
        }
    }
    assert_importance(p.importance(), &want);
    // Spot-check one value by hand: I[0][0] = ¼·1 + ¾·(½·1/8.25 + ½·3/5).
    assert!((p.importance()[0][0] - (0.25 + 0.75 * (0.5 / 8.25 + 0.3))).abs() < 1e-12);
}

#[test]
fn without_client_scores_only_the_singular_values_count() {
    let spec = adalora(3);
    let beta = 0.5;
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(3, beta)));
    // An update that carries no scores (a client that sent none) changes nothing of c.
    p.observe_update("a", &update(&spec, 10, &[]));
    p.committed(&global_with_e(&spec, [[2.0, 1.0, 1.0], [0.0, -4.0, 0.0]]));
    // σ/Σσ with Σσ = 8, the whole of u (the score part, total 0, is left out).
    let sigma = [[2.0, 1.0, 1.0], [0.0, 4.0, 0.0]];
    let before = [1.0, 0.5, 1.0 / 3.0];
    let want = sigma.map(|row| {
        let mut out = [0.0; 3];
        for i in 0..3 {
            out[i] = beta * before[i] + (1.0 - beta) * row[i] / 8.0;
        }
        out
    });
    assert_importance(p.importance(), &want);
}

#[test]
fn with_an_all_zero_global_only_the_client_scores_count_and_with_neither_nothing_changes() {
    let spec = adalora(3);
    let beta = 0.5;
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(3, beta)));
    p.committed(&AdapterPool::zeros(&spec));
    let before = [[1.0, 0.5, 1.0 / 3.0], [1.0, 0.5, 1.0 / 3.0]];
    assert_importance(p.importance(), &before);

    // One client, scores only on t1: c/Σc with Σc = 4 is the whole of u.
    p.observe_update("a", &update(&spec, 7, &[("t1", &[1.0, 0.0, 3.0])]));
    p.committed(&AdapterPool::zeros(&spec));
    let c = [[0.0, 0.0, 0.0], [1.0, 0.0, 3.0]];
    let mut want = before;
    for t in 0..2 {
        for i in 0..3 {
            want[t][i] = beta * before[t][i] + (1.0 - beta) * c[t][i] / 4.0;
        }
    }
    assert_importance(p.importance(), &want);
}

#[test]
fn a_second_round_smooths_with_beta_and_starts_its_scores_from_zero() {
    let spec = adalora(3);
    let beta = 0.25;
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(3, beta)));
    // Round 1: one client, scores (2, 0, 0) on t0 only; global E t0 (1, 0, 0).
    p.observe_update("a", &update(&spec, 10, &[("t0", &[2.0, 0.0, 0.0]), ("t1", &[0.0, 0.0, 0.0])]));
    p.committed(&global_with_e(&spec, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]));
    // u₁ = ½·(1, 0, 0 | 0, 0, 0) + ½·(1, 0, 0 | 0, 0, 0) = (1, 0, 0 | 0, 0, 0).
    let i0 = [1.0, 0.5, 1.0 / 3.0];
    let round_1 =
        [[beta * i0[0] + (1.0 - beta), beta * i0[1], beta * i0[2]], [beta * i0[0], beta * i0[1], beta * i0[2]]];
    assert_importance(p.importance(), &round_1);

    // Round 2: another client with 20 examples, scores (0, 0, 6) on t0; global E t0 (1, 1, 1),
    // t1 (1, 0, 0). Round 1's scores must not count again: c = (0, 0, 6 | 0, 0, 0), Σc = 6;
    // σ = (1, 1, 1 | 1, 0, 0), Σσ = 4.
    p.observe_update("b", &update(&spec, 20, &[("t0", &[0.0, 0.0, 6.0]), ("t1", &[0.0, 0.0, 0.0])]));
    p.committed(&global_with_e(&spec, [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]));
    let u2 = [[0.125, 0.125, 0.5 + 0.125], [0.125, 0.0, 0.0]];
    let mut want = [[0.0; 3]; 2];
    for t in 0..2 {
        for i in 0..3 {
            want[t][i] = beta * round_1[t][i] + (1.0 - beta) * u2[t][i];
        }
    }
    assert_importance(p.importance(), &want);
}

// ---- fixed and class policies ------------------------------------------------------------------

#[test]
fn fixed_gives_every_client_the_rank_on_every_target_whatever_its_bandwidth() {
    let spec = adalora(4);
    let mut p = planner(spec.clone(), RankPolicy::Fixed { rank: 3 });
    p.enrolled("fast", &enroll(Some(1 << 30)));
    p.enrolled("slow", &enroll(Some(1)));
    let plans = p.plan(Round(1), &names(&["fast", "slow", "unknown"]), 1 << 20).unwrap();
    assert_eq!(plans.len(), 3);
    for plan in &plans {
        assert_eq!(ranks(&spec, plan), Some(vec![3, 3]), "{plans:?}");
    }
}

fn classes() -> Vec<RankClass> {
    // Deliberately out of order; the lowest class's rank (2) is not the fallback rank 1.
    vec![
        RankClass { min_upload_bps: 100_000.0, rank: 3 },
        RankClass { min_upload_bps: 1_000_000.0, rank: 4 },
        RankClass { min_upload_bps: 10_000.0, rank: 2 },
    ]
}

/// Clients at these upload speeds (bytes/s; None: nothing known), each with its expected rank
/// under [`classes`].
const CLASS_CASES: [(&str, Option<u64>, u32); 7] = [
    ("fast", Some(5_000_000), 4),
    ("at-the-top-threshold", Some(1_000_000), 4),
    ("just-below-it", Some(999_999), 3),
    ("middle", Some(100_000), 3),
    ("lowest-class", Some(10_000), 2),
    ("below-every-class", Some(9_999), 2),
    ("no-estimate", None, 2),
];

fn class_plans(classes: Vec<RankClass>) -> Vec<Option<Vec<u32>>> {
    let spec = adalora(4);
    let mut p = planner(spec.clone(), RankPolicy::Classes { classes });
    let clients: Vec<&str> = CLASS_CASES.iter().map(|(c, ..)| *c).collect();
    for (client, bps, _) in CLASS_CASES {
        if bps.is_some() {
            p.enrolled(client, &enroll(bps));
        }
    }
    p.plan(Round(1), &names(&clients), 1 << 20).unwrap().iter().map(|plan| ranks(&spec, plan)).collect()
}

#[test]
fn a_client_gets_the_rank_of_the_highest_class_its_upload_reaches_and_otherwise_the_lowest_class() {
    let got = class_plans(classes());
    for ((client, bps, rank), plan) in CLASS_CASES.iter().zip(&got) {
        assert_eq!(plan, &Some(vec![*rank, *rank]), "{client} at {bps:?} bytes/s");
    }
}

#[test]
fn classes_plan_alike_in_any_order() {
    let reference = class_plans(classes());
    let mut sorted = classes();
    sorted.sort_by(|a, b| a.min_upload_bps.total_cmp(&b.min_upload_bps));
    let mut reversed = sorted.clone();
    reversed.reverse();
    assert_eq!(class_plans(sorted), reference);
    assert_eq!(class_plans(reversed), reference);
}

#[test]
fn a_measured_upload_moves_a_client_into_its_class() {
    let spec = adalora(4);
    let mut p = planner(spec.clone(), RankPolicy::Classes { classes: classes() });
    p.enrolled("a", &enroll(Some(20_000)));
    assert_eq!(ranks(&spec, &p.plan(Round(1), &names(&["a"]), 0).unwrap()[0]), Some(vec![2, 2]));
    // 4 MB in 2 s: 2 MB/s, the top class (the declared prior is replaced by the measurement).
    p.observe_upload("a", 4_000_000, 2.0);
    assert_eq!(ranks(&spec, &p.plan(Round(2), &names(&["a"]), 0).unwrap()[0]), Some(vec![4, 4]));
}

#[test]
fn bad_rank_configs_are_refused_naming_the_field() {
    let spec = adalora(4);
    let new = |policy| RankPlanner::new(spec.clone(), policy, DEADLINE, ROUNDS, COMPUTE);
    let class = |rank| RankClass { min_upload_bps: 0.0, rank };
    assert_eq!(refused_field(new(RankPolicy::Classes { classes: vec![] })), "budget.classes");
    assert_eq!(refused_field(new(RankPolicy::Classes { classes: vec![class(2), class(0)] })), "budget.classes");
    assert_eq!(refused_field(new(RankPolicy::Classes { classes: vec![class(5)] })), "budget.classes");
    assert_eq!(refused_field(new(RankPolicy::Fixed { rank: 0 })), "budget.rank");
    assert_eq!(refused_field(new(RankPolicy::Fixed { rank: 5 })), "budget.rank");
    let mut s = importance_settings(4, 0.5);
    s.target_rank = 5;
    assert_eq!(refused_field(new(RankPolicy::Importance(s))), "budget.init_rank");
    assert_eq!(refused_field(new(RankPolicy::Importance(importance_settings(4, 1.0)))), "budget.smoothing");
    // The edges are accepted.
    assert!(new(RankPolicy::Classes { classes: vec![class(1), class(4)] }).is_ok());
    assert!(new(RankPolicy::Fixed { rank: 4 }).is_ok());
    // The message says what is allowed.
    let err = new(RankPolicy::Classes { classes: vec![class(5)] }).unwrap_err().to_string();
    assert!(err.contains("budget.classes") && err.contains("1..=4"), "{err}");
}

#[test]
fn the_budget_table_refuses_bad_classes_and_ranks_naming_the_field() {
    let spec = adalora(4);
    let section = |policy: &str, rank: Option<usize>, classes: Vec<RankClass>| BudgetSection {
        policy: policy.into(),
        rank,
        classes,
        ..BudgetSection::default()
    };
    let plan = |s: BudgetSection| s.planner(&spec, DEADLINE, ROUNDS);
    let class = |rank| RankClass { min_upload_bps: 1.0, rank };
    assert_eq!(refused_field(plan(section("classes", None, vec![]))), "budget.classes");
    assert_eq!(refused_field(plan(section("classes", None, vec![class(0)]))), "budget.classes");
    assert_eq!(refused_field(plan(section("classes", None, vec![class(1), class(9)]))), "budget.classes");
    assert_eq!(refused_field(plan(section("fixed", None, vec![]))), "budget.rank");
    assert_eq!(refused_field(plan(section("fixed", Some(0), vec![]))), "budget.rank");
    assert_eq!(refused_field(plan(section("fixed", Some(5), vec![]))), "budget.rank");
    assert_eq!(refused_field(plan(section("ranked", None, vec![]))), "budget.policy");
    assert!(plan(section("none", None, vec![])).unwrap().is_none());

    // A `[budget]` table read from TOML plans as the classes say.
    let toml = r#"
        policy = "classes"
        merge = "zero-pad"
        [[classes]]
        min_upload_bps = 1e6
        rank = 4
        [[classes]]
        min_upload_bps = 0.0
        rank = 1
    "#;
    let section: BudgetSection = toml::from_str(toml).unwrap();
    let mut p = section.planner(&spec, DEADLINE, ROUNDS).unwrap().expect("a planner");
    p.enrolled("fast", &enroll(Some(2_000_000)));
    p.enrolled("slow", &enroll(Some(1_000)));
    let plans = p.plan(Round(1), &names(&["fast", "slow"]), 0).unwrap();
    assert_eq!(
        plans.iter().map(|plan| ranks(&spec, plan)).collect::<Vec<_>>(),
        vec![Some(vec![4, 4]), Some(vec![1, 1])]
    );
}

#[test]
fn fixed_and_class_ranks_cut_either_lora_form_and_importance_only_adalora() {
    let targets = adalora(4).targets;
    let lora = PoolSpec::lora(targets.clone(), 4, 8.0, None);
    let new = |spec: &PoolSpec, policy| RankPlanner::new(spec.clone(), policy, DEADLINE, ROUNDS, COMPUTE);
    assert!(new(&lora, RankPolicy::Fixed { rank: 2 }).is_ok());
    assert!(new(&lora, RankPolicy::Classes { classes: classes() }).is_ok());
    assert_eq!(refused_field(new(&lora, RankPolicy::Importance(importance_settings(4, 0.5)))), "budget");
    let ssf = PoolSpec::ssf(targets, None);
    assert_eq!(refused_field(new(&ssf, RankPolicy::Fixed { rank: 1 })), "budget");
}

// ---- importance policy -------------------------------------------------------------------------

#[test]
fn under_importance_a_client_with_no_bandwidth_known_trains_rank_one_everywhere() {
    let spec = adalora(4);
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(4, 0.5)));
    p.enrolled("declared-nothing", &enroll(None));
    p.enrolled("fast", &enroll(Some(1 << 30)));
    let plans = p.plan(Round(1), &names(&["declared-nothing", "fast", "never-enrolled"]), 1 << 10).unwrap();
    assert_eq!(ranks(&spec, &plans[0]), Some(vec![1, 1]));
    assert_eq!(ranks(&spec, &plans[2]), Some(vec![1, 1]));
    // The fast client, planned in the same call, gets the schedule's whole budget (round 1:
    // init_rank 4 on each of the 2 targets).
    assert_eq!(ranks(&spec, &plans[1]), Some(vec![4, 4]), "{plans:?}");
}

#[test]
fn under_importance_a_client_too_slow_for_rank_one_sits_out() {
    let spec = adalora(4);
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(4, 0.5)));
    // 1 byte/s for the 9 s left after 1 s of compute, × 0.8: 7 bytes, far below any update.
    p.enrolled("slow", &enroll(Some(1)));
    p.enrolled("fast", &enroll(Some(1 << 30)));
    let plans = p.plan(Round(1), &names(&["slow", "fast"]), 0).unwrap();
    match &plans[0] {
        Plan::SitOut(why) => assert!(why.contains("rank 1") && why.contains("allows 7 before the deadline"), "{why}"),
        other => panic!("the slow client should sit out, got {other:?}"),
    }
    assert!(matches!(plans[1], Plan::Train(_)), "{plans:?}");
}

#[test]
fn under_importance_a_faster_client_never_gets_fewer_triplets_on_any_target() {
    let spec = adalora(4);
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(4, 0.5)));
    // Upload speeds from 1 byte/s up, ×1.15 a step, to well past the full grant.
    let mut speeds: Vec<u64> = std::iter::successors(Some(1.0f64), |b| Some(b * 1.15))
        .take_while(|b| *b < 1e7)
        .map(|b| b.ceil() as u64)
        .collect();
    speeds.dedup();
    let clients: Vec<String> = speeds.iter().map(|b| format!("client-{b}")).collect();
    for (c, b) in clients.iter().zip(&speeds) {
        p.enrolled(c, &enroll(Some(*b)));
    }
    let grants: Vec<Vec<u32>> = p
        .plan(Round(1), &clients, 1 << 10)
        .unwrap()
        .iter()
        .map(|plan| ranks(&spec, plan).unwrap_or_else(|| vec![0, 0]))
        .collect();
    for (w, pair) in grants.windows(2).enumerate() {
        assert!(
            pair[0].iter().zip(&pair[1]).all(|(slow, fast)| slow <= fast),
            "{} → {} bytes/s: {:?} then {:?}",
            speeds[w],
            speeds[w + 1],
            pair[0],
            pair[1]
        );
    }
    // The sweep covers sitting out, partial grants and the schedule's whole budget.
    let totals: Vec<u32> = grants.iter().map(|g| g.iter().sum()).collect();
    assert_eq!(totals.first(), Some(&0), "the slowest sits out: {totals:?}");
    assert_eq!(totals.last(), Some(&8), "the fastest gets init_rank everywhere: {totals:?}");
    assert!(totals.iter().any(|&t| t > 2 && t < 8), "some grant is partial: {totals:?}");
}

#[test]
fn a_triplet_is_averaged_over_the_clients_that_scored_it_so_low_rank_clients_do_not_dilute_it() {
    // Client a (rank 3, 10 examples) scores all three triplets; b (rank 1, 30 examples) scores
    // only its first (the participant sends the granted triplets' scores only). Triplet 2's mean
    // is a's score alone, not diluted by b's weight. The global is zero: σ drops out, and β = 0.
    let spec = adalora(3);
    let mut p = planner(spec.clone(), RankPolicy::Importance(importance_settings(3, 0.0)));
    p.observe_update("a", &update(&spec, 10, &[("t0", &[1.0, 2.0, 4.0]), ("t1", &[1.0, 1.0, 1.0])]));
    p.observe_update("b", &update(&spec, 30, &[("t0", &[3.0]), ("t1", &[1.0])]));
    p.committed(&AdapterPool::zeros(&spec));
    // c(t0) = ((10·1 + 30·3)/40, 2, 4) = (2.5, 2, 4); c(t1) = (1, 1, 1); Σc = 11.5.
    let c = [[2.5, 2.0, 4.0], [1.0, 1.0, 1.0]];
    assert_importance(p.importance(), &c.map(|row| row.map(|v| v / 11.5)));
}

#[test]
fn the_knapsack_policy_is_read_from_the_budget_table_and_plans_with_the_knapsack() {
    // `policy = "knapsack"` takes importance's settings; its plans are `allocate_knapsack`'s:
    // a fast client the whole schedule, a slow one a sit-out, an unknown one rank 1 everywhere.
    let spec = adalora(4);
    let table: BudgetSection =
        toml::from_str("policy = \"knapsack\"\ninit_rank = 4\ntarget_rank = 2\nexpected_compute_s = 1.0").unwrap();
    let mut p = table.planner(&spec, DEADLINE, ROUNDS).unwrap().unwrap();
    assert!(matches!(p.policy(), RankPolicy::Knapsack(s) if s.init_rank == 4 && s.target_rank == 2));
    p.enrolled("fast", &enroll(Some(1 << 30)));
    p.enrolled("slow", &enroll(Some(1)));
    let plans = p.plan(Round(1), &names(&["fast", "slow", "unknown"]), 1 << 10).unwrap();
    assert_eq!(ranks(&spec, &plans[0]), Some(vec![4, 4]), "{plans:?}");
    assert!(matches!(plans[1], Plan::SitOut(_)), "{plans:?}");
    assert_eq!(ranks(&spec, &plans[2]), Some(vec![1, 1]));
    let lora = PoolSpec::lora(spec.targets.clone(), 4, 8.0, spec.head);
    assert_eq!(refused_field(table.planner(&lora, DEADLINE, ROUNDS)), "budget", "knapsack scores AdaLoRA triplets");
}
