//! The simulator end to end on a tiny random backbone and separable data: the server's round
//! engine on a virtual clock, virtual clients in lockstep or one after another.
//!
//! - the same seed gives the same `rounds.csv` byte for byte (wall-clock column aside), another
//!   seed a different one;
//! - lockstep and sequential training give the same rounds and the same global pool;
//! - a client whose upload cannot meet the deadline is a straggler in every round, refused as
//!   late by the engine, and the rounds commit without it;
//! - upload sizes are the real codec's: int8 uploads are about a quarter of fp32's;
//! - the centralised reference learns the task.

use std::path::Path;

use fedpool_sim::centralised::run_centralised;
use fedpool_sim::driver::{self, Quiet, RunOutput};
use fedpool_sim::experiment::{Experiment, Mode};
use fedpool_sim::outputs::write_run;
use fedpool_sim::population::Population;
use fedpool_sim::report::read_rounds_csv;

/// A tiny model and a CSV of separable texts with two groups, in `dir`.
fn fixture(dir: &Path) {
    fedpool_client::testkit::write_tiny_model(&dir.join("model"), 5).unwrap();
    let mut csv = String::from("text,label,group\n");
    for (id, text, label) in fedpool_client::testkit::separable_texts(240, 2, 9) {
        csv.push_str(&format!("{text},{label},{}\n", if id % 3 == 0 { "north" } else { "south" }));
    }
    std::fs::write(dir.join("data.csv"), csv).unwrap();
}

/// A small experiment over the fixture; `extra` is appended (later keys of a table win only if
/// the table is not repeated, so `extra` adds whole tables or top-level keys before any table).
fn experiment(dir: &Path, top: &str, tables: &str) -> Experiment {
    let text = format!(
        r#"name = "tiny"
seed = 4
model = "model"
data = "data.csv"
clients = 4
test_fraction = 0.25
{top}
[data_options]
group_column = "group"
[partition]
scheme = "iid"
[federation]
rounds = 3
local_steps = 3
deadline_s = 60.0
seconds_per_sample = 0.01
[adapter]
kind = "ssf-pool"
pool_size = 4
top_k = 2
[train]
batch_size = 4
max_len = 32
lr = 0.01
{tables}
"#
    );
    let path = dir.join("exp.toml");
    std::fs::write(&path, text).unwrap();
    Experiment::load(&path).unwrap()
}

fn simulate(exp: &Experiment) -> RunOutput {
    let pop = Population::load(exp).unwrap();
    driver::run(exp, &pop, &mut Quiet).unwrap()
}

/// `rounds.csv` without its last column (wall-clock seconds).
fn without_wall_clock(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').map_or(l, |(head, _)| head).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_same_seed_gives_the_same_rounds_csv_and_another_seed_does_not() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let exp = experiment(dir.path(), "", "");
    let a = simulate(&exp);
    let b = simulate(&exp);
    write_run(&dir.path().join("a"), &exp, &a).unwrap();
    write_run(&dir.path().join("b"), &exp, &b).unwrap();
    let csv_a = without_wall_clock(&dir.path().join("a/rounds.csv"));
    assert_eq!(csv_a, without_wall_clock(&dir.path().join("b/rounds.csv")));
    assert_eq!(csv_a.lines().count(), 4, "{csv_a}");
    let rows = read_rounds_csv(&dir.path().join("a/rounds.csv")).unwrap();
    assert!(rows.iter().all(|r| r.accuracy.is_some() && r.bytes_up > 0 && r.bytes_down > 0), "{rows:?}");
    assert!(rows.windows(2).all(|w| w[0].sim_seconds < w[1].sim_seconds), "{rows:?}");
    // The run's folder holds everything, and its config runs again.
    for file in ["summary.json", "rounds.jsonl", "config.toml", "accuracy_vs_round.png", "accuracy_vs_bytes.svg"] {
        assert!(dir.path().join("a").join(file).is_file(), "{file} missing");
    }
    let resolved = std::fs::read_to_string(dir.path().join("a/config.toml")).unwrap();
    let again = Experiment::parse(&resolved, dir.path(), "resolved").unwrap();
    assert_eq!(again.federation, exp.federation);

    let mut other = exp.clone();
    other.seed = 5;
    let c = simulate(&other);
    write_run(&dir.path().join("c"), &other, &c).unwrap();
    assert_ne!(csv_a, without_wall_clock(&dir.path().join("c/rounds.csv")));
}

#[test]
fn lockstep_and_sequential_give_the_same_rounds() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let lockstep = experiment(dir.path(), "max_rows_per_pass = 8", "");
    let sequential = Experiment { mode: Mode::Sequential, ..lockstep.clone() };
    let a = simulate(&lockstep);
    let b = simulate(&sequential);
    assert_eq!(a.rows.len(), 3);
    for (x, y) in a.rows.iter().zip(&b.rows) {
        assert_eq!(
            (x.accuracy, x.macro_f1, x.bytes_up, x.bytes_down),
            (y.accuracy, y.macro_f1, y.bytes_up, y.bytes_down)
        );
        assert_eq!(x.sim_seconds, y.sim_seconds);
    }
    assert_eq!(a.trained_samples, b.trained_samples);
    for (name, t) in &a.global.tensors {
        let u = &b.global.tensors[name];
        let diff = t.data().iter().zip(u.data()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        let scale = u.data().iter().map(|q| q.abs()).fold(1e-12f32, f32::max);
        assert!(diff / scale <= 1e-5, "{name}: {diff} / {scale}");
    }
    // Training moved the global pool away from its start.
    let start = fedpool_common::AdapterPool::init(&Population::load(&lockstep).unwrap().spec, lockstep.seed).unwrap();
    assert!(a.global.tensors.iter().any(|(n, t)| t.data() != start.tensors[n].data()));
}

#[test]
fn a_client_too_slow_for_the_deadline_is_a_straggler_and_rounds_commit_without_it() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    // How big is one update? Then give client 2 an upload that takes about 90 s (deadline 60 s),
    // so its late update reaches the engine during the next round.
    let fast = simulate(&experiment(dir.path(), "", ""));
    let update_bytes = fast.records[0].bytes_up as f64 / 4.0;
    std::fs::write(dir.path().join("bw.csv"), format!("client,up\n0,1e9\n1,1e9\n2,{}\n3,1e9\n", update_bytes / 90.0))
        .unwrap();
    let exp = experiment(
        dir.path(),
        "",
        r#"[network]
upload = { kind = "trace", file = "bw.csv", column = "up" }
download = { kind = "fixed", bytes_per_sec = 1e9 }
"#,
    );
    let out = simulate(&exp);
    assert_eq!(out.rows.len(), 3);
    assert_eq!(out.summary.missed_deadline, 3, "{:?}", out.summary);
    for r in &out.records {
        assert_eq!(r.stragglers, vec!["client-002".to_string()], "round {}", r.round);
        assert_eq!(r.clients, vec!["client-000", "client-001", "client-003"]);
        // Each round waited for the deadline.
        assert!((r.committed_at_secs - r.started_at_secs - 60.0).abs() < 1e-6, "{r:?}");
    }
    // The late updates of rounds 1 and 2 reached the engine during rounds 2 and 3 and were
    // refused (the engine's reason names them late).
    for r in &out.records[1..] {
        assert_eq!(r.rejected.values().sum::<u64>(), 1, "round {}: {:?}", r.round, r.rejected);
        let reason = r.rejected.keys().next().map(String::as_str);
        assert_eq!(reason, Some("Late"));
    }
    assert!(out.records[0].rejected.is_empty());
}

#[test]
fn residuals_carry_over_and_only_an_acknowledged_update_replaces_one() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let codec = "[upload_codec]\ntop_k = 0.25\nquantization = \"int8\"\n";
    let fast = simulate(&experiment(dir.path(), "", codec));
    assert_eq!(fast.residual_norms.len(), 4);
    assert!(
        fast.residual_norms.iter().all(|&n| n > 0.0),
        "top-k leaves every client a residual: {:?}",
        fast.residual_norms
    );
    // Client 2's uploads take ~90 s (deadline 60 s): each is refused as late, so the residual its
    // encoding left never takes effect and it ends with none.
    let update_bytes = fast.records[0].bytes_up as f64 / 4.0;
    std::fs::write(dir.path().join("bw.csv"), format!("client,up\n0,1e9\n1,1e9\n2,{}\n3,1e9\n", update_bytes / 90.0))
        .unwrap();
    let network = r#"[network]
upload = { kind = "trace", file = "bw.csv", column = "up" }
download = { kind = "fixed", bytes_per_sec = 1e9 }
"#;
    let slow = simulate(&experiment(dir.path(), "", &format!("{codec}{network}")));
    assert_eq!(slow.summary.missed_deadline, 3, "{:?}", slow.summary);
    assert_eq!(slow.residual_norms[2], 0.0, "refused updates leave the residual as it was");
    for c in [0, 1, 3] {
        assert!(slow.residual_norms[c] > 0.0, "client {c}: {:?}", slow.residual_norms);
    }
}

#[test]
fn upload_sizes_come_from_the_real_codec() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let fp32 = simulate(&experiment(dir.path(), "", "[upload_codec]\nquantization = \"fp32\"\n"));
    let int8 = simulate(&experiment(dir.path(), "", "[upload_codec]\nquantization = \"int8\"\n"));
    let ratio = int8.summary.bytes_up as f64 / fp32.summary.bytes_up as f64;
    // int8 with one fp32 scale per 64 values: a quarter and a little; frame headers and metrics.
    assert!((0.2..0.4).contains(&ratio), "int8 / fp32 upload bytes = {ratio}");
    assert_eq!(int8.summary.bytes_down, fp32.summary.bytes_down);
}

#[test]
fn centralised_training_learns_the_task() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let exp = experiment(dir.path(), "", "");
    let pop = Population::load(&exp).unwrap();
    let c = run_centralised(&exp, &pop).unwrap();
    assert_eq!(c.steps, 3 * 4 * 3);
    assert_eq!(c.examples, pop.clients.iter().map(|c| c.eval.len() as u64).sum::<u64>());
    assert!(c.accuracy > 0.75, "{c:?}");
}

#[test]
fn a_split_file_deals_exactly_its_examples_to_its_named_clients() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let split = r#"{"hospital-b": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22],
                   "hospital-a": [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27],
                   "lab-c": [100, 101, 102, 103, 104, 105, 106, 107],
                   "bank-d": [200, 201, 202, 203, 204, 205, 206, 207, 208, 209]}"#;
    std::fs::write(dir.path().join("split.json"), split).unwrap();
    let mut exp = experiment(dir.path(), "", "");
    exp.partition = fedpool_sim::experiment::PartitionScheme::File { file: "split.json".into() };
    let pop = Population::load(&exp).unwrap();
    let names: Vec<&str> = pop.clients.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["hospital-b", "hospital-a", "lab-c", "bank-d"]);
    let ids = |c: usize| {
        let mut v: Vec<u64> = pop.clients[c].train.iter().chain(&pop.clients[c].eval).map(|e| e.id).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(ids(0), (0..24).step_by(2).collect::<Vec<u64>>());
    assert_eq!(ids(2), (100..108).collect::<Vec<u64>>());
    // The run's rounds name the file's clients.
    let out = driver::run(&exp, &pop, &mut Quiet).unwrap();
    assert_eq!(out.records[0].clients, ["bank-d", "hospital-a", "hospital-b", "lab-c"]);

    exp.clients = 5;
    let err = Population::load(&exp).unwrap_err().to_string();
    assert!(err.contains("split.json") && err.contains("4 clients") && err.contains("clients = 5"), "{err}");
}

#[test]
fn importance_budgets_keep_a_slow_client_within_the_deadline_where_a_fixed_rank_misses_it() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let lora = "[adapter]\nkind = \"lora\"\nrank = 4\n[train]\nbatch_size = 4\nmax_len = 32\nlr = 0.01\n";
    let spec = {
        let mut e = experiment(dir.path(), "", "");
        e.adapter.kind = "lora".into();
        e.adapter.rank = 4;
        Population::load(&e).unwrap().spec
    };
    let targets = spec.targets.len();
    let costs = fedpool_server::budget::TripletCosts::measure(&spec, &Default::default(), 0).unwrap();
    // Client 1 can send rank 2 everywhere in 55 of the 60 s, not rank 4.
    let slow = costs.bytes(&vec![2; targets]) as f64 / 55.0;
    std::fs::write(dir.path().join("bw.csv"), format!("client,up\n0,1e9\n1,{slow}\n2,1e9\n3,1e9\n")).unwrap();
    let network = "[network]\nupload = { kind = \"trace\", file = \"bw.csv\", column = \"up\" }\n\
                   download = { kind = \"fixed\", bytes_per_sec = 1e9 }\nlatency_ms = 0.0\n";
    let run = |budget: &str| {
        // `experiment` writes [adapter] and [train] itself: replace them with LoRA's.
        let mut e = experiment(dir.path(), "", &format!("{network}{budget}"));
        let lora_exp = Experiment::parse(lora, dir.path(), "lora").unwrap();
        e.adapter = lora_exp.adapter;
        e.train = lora_exp.train;
        e.federation.local_steps = 2;
        simulate(&e)
    };
    let fixed = run("[budget]\npolicy = \"fixed\"\nrank = 4\n");
    assert_eq!(fixed.summary.missed_deadline, 3, "rank 4 everywhere does not fit client 1's link");
    assert!(fixed.records.iter().all(|r| r.stragglers == ["client-001"]));

    let budgets = run("[budget]\npolicy = \"importance\"\nsafety_margin = 0.95\nexpected_compute_s = 0.1\ninit_rank = 4\ntarget_rank = 4\n");
    assert_eq!(
        budgets.summary.missed_deadline,
        0,
        "{:?}",
        budgets.records.iter().map(|r| &r.stragglers).collect::<Vec<_>>()
    );
    assert!(budgets.records.iter().all(|r| r.clients.len() == 4), "every client's update is merged");
}
