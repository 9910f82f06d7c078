//! A simulation on worker processes against one worker, on the real MiniLM and VADER (needs the
//! fetched assets), with the `fedpool-sim` binary itself over loopback QUIC:
//!
//! 256 virtual clients (IID, FedIns SSF pool, 25 slots, top-3; 2 rounds of 2 local steps, batch 8,
//! every client every round) on 1 worker × 256 clients, then 2 workers × 128 clients. Prints a
//! markdown table: wall time of the run, local-training wall time, each worker's peak RSS and the
//! coordinator's, and whether `rounds.csv` (wall time aside) and `rounds.jsonl` are the same.
//!
//! `cargo bench -p fedpool-sim --bench distributed`; `FEDPOOL_BENCH_CLIENTS=N` and
//! `FEDPOOL_BENCH_ROUNDS=R` change the size.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_fedpool-sim");

fn config(clients: usize, rounds: u32) -> String {
    format!(
        r#"name = "spread-minilm"
data = "vader"
clients = {clients}
max_examples_per_client = 24
eval_max_examples = 8
global_test = "unused:200"
[partition]
scheme = "iid"
[federation]
rounds = {rounds}
local_steps = 2
deadline_s = 100000.0
[adapter]
kind = "ssf-pool"
pool_size = 25
top_k = 3
[train]
batch_size = 8
max_len = 64
[upload_codec]
quantization = "int8"
top_k = 0.1
"#
    )
}

fn without_wall_clock(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Some(header) = text.lines().next() else { return String::new() };
    let Some(wall) = header.split(',').position(|c| c == "wall_seconds") else { return text };
    text.lines()
        .map(|l| l.split(',').enumerate().filter(|&(i, _)| i != wall).map(|(_, f)| f).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join("\n")
}

struct Measured {
    wall: f64,
    train_wall: f64,
    coordinator_mib: f64,
    workers_mib: Vec<f64>,
}

fn run(dir: &Path, workers: usize) -> Measured {
    let out = dir.join(format!("w{workers}"));
    let t = Instant::now();
    let status = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.join("bench.toml"))
        .arg("--out")
        .arg(&out)
        .args(["--workers", &workers.to_string(), "--listen", "127.0.0.1:0", "--spawn-workers"])
        .env("RUST_LOG", "warn")
        .status()
        .expect("run fedpool-sim");
    assert!(status.success(), "{workers} workers: {status}");
    let wall = t.elapsed().as_secs_f64();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("workers.json")).expect("workers.json")).expect("json");
    let workers_mib = report["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default();
    let train_wall = report["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["stats"]["wall_seconds"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max))
        .unwrap_or(0.0);
    Measured {
        wall,
        train_wall,
        coordinator_mib: report["coordinator_peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        workers_mib,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let clients = std::env::var("FEDPOOL_BENCH_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let rounds = std::env::var("FEDPOOL_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("bench.toml"), config(clients, rounds)).expect("write config");
    let one = run(dir.path(), 1);
    let two = run(dir.path(), 2);
    let same_csv =
        without_wall_clock(&dir.path().join("w1/rounds.csv")) == without_wall_clock(&dir.path().join("w2/rounds.csv"));
    let same_log = std::fs::read_to_string(dir.path().join("w1/rounds.jsonl")).ok()
        == std::fs::read_to_string(dir.path().join("w2/rounds.jsonl")).ok();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("{clients} clients, {rounds} rounds, MiniLM + VADER, {cpus} CPUs\n");
    println!("| workers × clients | wall s | local training s (slowest worker) | peak RSS per worker MiB | coordinator MiB |");
    println!("| --- | ---: | ---: | --- | ---: |");
    for (n, m) in [(1, &one), (2, &two)] {
        let per: Vec<String> = m.workers_mib.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "| {n} × {} | {:.1} | {:.1} | {} | {:.0} |",
            clients / n,
            m.wall,
            m.train_wall,
            per.join(", "),
            m.coordinator_mib
        );
    }
    println!("\nrounds.csv (wall time aside) the same: {same_csv}; rounds.jsonl the same: {same_log}");
    assert!(same_csv && same_log, "the distributed run gave other rounds");
}
