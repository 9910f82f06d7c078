//! Lockstep tenancy against training the same virtual clients one after another (as Flower and
//! OpenFedLLM run virtual clients), on the real MiniLM and VADER, on this machine's CPU.
//!
//! `cargo bench -p fedpool-sim --bench tenancy` (needs the fetched assets). Prints a markdown
//! table: samples/s of 32 clients × batch 8 (FedIns SSF pool, 25 slots, top-3) trained in lockstep
//! and sequentially, the ratio, and the peak RSS of one lockstep step (passes of ≤ 64 rows) for
//! 1, 64 and 256 clients, SSF pool and LoRA, each in a child process so every peak is its own.
//! `FEDPOOL_BENCH_STEPS` (default 3) sets the local steps; `FEDPOOL_BENCH_ONLY_RSS=1` skips the
//! speed part.

use std::time::Instant;

use candle_core::Device;
use fedpool_client::cli::default_model_dir;
use fedpool_client::data::{load_spec, DataOptions};
use fedpool_client::model::BertEncoder;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{self, encode_examples, tokenizer_for_training, Encoded, QueryCache, Silent, TrainConfig};
use fedpool_common::adapter::{AdapterPool, PoolSpec};
use fedpool_sim::tenancy::{train_lockstep, train_lockstep_bounded, VirtualClient};

const CLIENTS: usize = 32;
const PER_CLIENT: usize = 64;
const BATCH: usize = 8;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

struct Setup {
    model: BertEncoder,
    spec: PoolSpec,
    data: Vec<Encoded>,
}

fn setup(clients: usize, choice: AdapterChoice) -> Setup {
    let dir = default_model_dir();
    let model = BertEncoder::load(&dir, &Device::Cpu).expect("MiniLM (run scripts/fetch-assets.sh)");
    let spec = pool_spec(model.config(), &AdapterOptions { choice, ..Default::default() }, 2).expect("spec");
    let vader = load_spec("vader", &DataOptions::default()).expect("VADER (run scripts/fetch-assets.sh)");
    let tokenizer = tokenizer_for_training(&dir.join("tokenizer.json"), 64).expect("tokenizer");
    let n = (clients * PER_CLIENT).min(vader.examples.len());
    let data = encode_examples(&tokenizer, vader.examples[..n].iter().map(|e| (e.id, e.text.as_str(), e.label)))
        .expect("encode");
    Setup { model, spec, data }
}

fn config(c: usize, steps: usize, batch: usize) -> TrainConfig {
    TrainConfig { steps, batch_size: batch, warmup_steps: 0, seed: c as u64, ..TrainConfig::default() }
}

fn clients<'a>(
    s: &'a Setup,
    starts: &'a [AdapterPool],
    k: usize,
    steps: usize,
    batch: usize,
) -> Vec<VirtualClient<'a>> {
    let per = PER_CLIENT.min(s.data.len());
    (0..k)
        .map(|c| {
            let at = (c * per) % (s.data.len() - per + 1);
            VirtualClient { train: &s.data[at..at + per], start: &starts[c], config: config(c, steps, batch) }
        })
        .collect()
}

/// Child mode: one step of `k` clients (batch 1 each) in passes of at most 64 rows, then print the
/// peak RSS: the backbone once, every client's adapters and AdamW moments, one pass's activations.
fn rss_child(k: usize, choice: AdapterChoice) {
    let s = setup(k.min(CLIENTS), choice);
    let starts: Vec<AdapterPool> = (0..k).map(|c| AdapterPool::init(&s.spec, c as u64).expect("pool")).collect();
    let vc = clients(&s, &starts, k, 1, 1);
    let mut q = QueryCache::new(s.model.config().hidden_size);
    train_lockstep_bounded(&s.model, &s.spec, &vc, &mut q, 0, 64).expect("lockstep");
    println!("{:.0}", peak_rss_mib());
}

fn main() {
    if let Ok(k) = std::env::var("FEDPOOL_BENCH_RSS_CLIENTS") {
        let choice = std::env::var("FEDPOOL_BENCH_RSS_ADAPTER").unwrap_or_default().parse().expect("adapter");
        rss_child(k.parse().expect("client count"), choice);
        return;
    }
    if std::env::var("FEDPOOL_BENCH_ONLY_RSS").is_err() {
        speed();
    }
    rss_table();
}

fn speed() {
    let steps: usize = std::env::var("FEDPOOL_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let s = setup(CLIENTS, AdapterChoice::SsfPool);
    let starts: Vec<AdapterPool> = (0..CLIENTS).map(|c| AdapterPool::init(&s.spec, c as u64).expect("pool")).collect();
    let samples = (CLIENTS * BATCH * steps) as f64;

    let vc = clients(&s, &starts, CLIENTS, steps, BATCH);
    let mut shared = QueryCache::new(s.model.config().hidden_size);
    let t = Instant::now();
    train_lockstep(&s.model, &s.spec, &vc, &mut shared, 0).expect("lockstep");
    let lockstep = t.elapsed().as_secs_f64();

    let t = Instant::now();
    for v in &vc {
        let mut own = QueryCache::new(s.model.config().hidden_size);
        let data = train::TrainData { train: v.train, eval: &[], pad_id: 0 };
        train::train(&s.model, &s.spec, v.start, data, &mut own, &v.config, &mut Silent).expect("train");
    }
    let sequential = t.elapsed().as_secs_f64();

    println!("| mode ({CLIENTS} clients × batch {BATCH}, {steps} steps, SSF pool P=25 k=3, MiniLM, CPU) | seconds | samples/s |");
    println!("| --- | ---: | ---: |");
    println!("| lockstep (one batched pass per step) | {lockstep:.1} | {:.1} |", samples / lockstep);
    println!("| sequential (one client after another) | {sequential:.1} | {:.1} |", samples / sequential);
    println!("| speed-up | | {:.2}× |", sequential / lockstep);
    println!();
}

/// Peak RSS per client count and adapter, each in a child process.
fn rss_table() {
    println!("| virtual clients (one step, batch 1 each, passes of ≤ 64 rows) | SSF pool P=25: peak RSS MiB | LoRA r=8: peak RSS MiB |");
    println!("| ---: | ---: | ---: |");
    let exe = std::env::current_exe().expect("exe");
    let rss = |k: usize, adapter: &str| {
        let out = std::process::Command::new(&exe)
            .env("FEDPOOL_BENCH_RSS_CLIENTS", k.to_string())
            .env("FEDPOOL_BENCH_RSS_ADAPTER", adapter)
            .output();
        out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    };
    for k in [1usize, 64, 256] {
        println!("| {k} | {} | {} |", rss(k, "ssf-pool"), rss(k, "lora"));
    }
}
