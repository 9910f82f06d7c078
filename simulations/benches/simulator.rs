//! The simulator's speed and memory, measured with the `fedpool-sim` binary itself on the real
//! MiniLM and VADER (needs the fetched assets), each run in its own process:
//!
//! 1. samples/s of local training for 32 clients × batch 8 (FedIns SSF pool, 25 slots, top-3,
//!    3 local steps, one round): lockstep with passes of 8, 32, 64 and 256 rows per step against
//!    `--sequential` (one client after another, as Flower and OpenFedLLM run virtual clients);
//! 2. peak RSS of one round (batch 1, one local step) for 1, 64 and 256 virtual clients, FedIns
//!    SSF pool and LoRA r=8, with lockstep groups of ≤ 1, ≤ 8 and ≤ 64 rows per pass (≤ 1 row:
//!    one client at a time).
//!
//! `cargo bench -p fedpool-sim --bench simulator` prints both tables (markdown).
//! `FEDPOOL_BENCH_ONLY=speed` or `=rss` runs one of them.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fedpool-sim");

/// An experiment over VADER, IID, one round, no deadline pressure.
fn config(name: &str, clients: usize, batch: usize, steps: u32, adapter: &str, max_rows: usize) -> String {
    format!(
        r#"name = "{name}"
data = "vader"
clients = {clients}
max_examples_per_client = {examples}
eval_max_examples = 1
max_rows_per_pass = {max_rows}
[partition]
scheme = "iid"
[federation]
rounds = 1
local_steps = {steps}
deadline_s = 100000.0
[adapter]
{adapter}
[train]
batch_size = {batch}
max_len = 64
[upload_codec]
quantization = "int8"
"#,
        examples = (batch * steps as usize * 2).max(8)
    )
}

/// Runs the binary on `text` and returns (train samples/s from its table, peak RSS MiB from its log).
fn run(dir: &Path, text: &str, extra: &[&str]) -> (f64, f64) {
    let path = dir.join("bench.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .arg("--out")
        .arg(dir.join("out"))
        .args(extra)
        .env("RUST_LOG", "info,fedpool_server=warn")
        .output()
        .expect("run fedpool-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fedpool-sim failed:\n{stderr}");
    let speed = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| run") && !l.starts_with("| ---"))
        .find_map(|l| l.trim_end_matches(" |").rsplit("| ").next()?.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let rss = stderr
        .lines()
        .find_map(|l| l.split("peak memory (RSS) ").nth(1)?.split(" MiB").next()?.parse().ok())
        .unwrap_or(f64::NAN);
    (speed, rss)
}

fn speed(dir: &Path) {
    let pool = "kind = \"ssf-pool\"\npool_size = 25\ntop_k = 3";
    println!("| 32 clients × batch 8, 3 steps, FedIns SSF pool P=25 k=3, MiniLM, CPU | local training samples/s | vs `--sequential` |");
    println!("| --- | ---: | ---: |");
    let (sequential, _) = run(dir, &config("speed", 32, 8, 3, pool, 8), &["--sequential"]);
    for rows in [8usize, 32, 64, 256] {
        let (lockstep, _) = run(dir, &config("speed", 32, 8, 3, pool, rows), &[]);
        let clients = rows / 8;
        println!(
            "| lockstep, passes of {rows} rows ({clients} client(s) per pass) | {lockstep:.2} | {:.2}× |",
            lockstep / sequential
        );
    }
    println!("| `--sequential` (one client after another, its own trainer) | {sequential:.2} | 1.00× |");
    println!();
}

fn rss(dir: &Path) {
    let adapters = [
        ("SSF pool P=25", "kind = \"ssf-pool\"\npool_size = 25\ntop_k = 3"),
        ("LoRA r=8", "kind = \"lora\"\nrank = 8"),
    ];
    let passes = [1usize, 8, 64];
    let mut header = String::from("| virtual clients (one round, one step, batch 1) |");
    for (name, _) in &adapters {
        for rows in passes {
            header.push_str(&format!(" {name}, passes ≤ {rows} rows |"));
        }
    }
    println!("{header}");
    println!("| ---: |{}", " ---: |".repeat(adapters.len() * passes.len()));
    for k in [1usize, 64, 256] {
        let mut line = format!("| {k} |");
        for (_, adapter) in &adapters {
            for rows in passes {
                let (_, mib) = run(dir, &config("rss", k, 1, 1, adapter, rows), &[]);
                line.push_str(&format!(" {mib:.0} MiB |"));
            }
        }
        println!("{line}");
    }
    println!();
}

fn main() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let only = std::env::var("FEDPOOL_BENCH_ONLY").unwrap_or_default();
    if only != "rss" {
        speed(dir.path());
    }
    if only != "speed" {
        rss(dir.path());
    }
}
