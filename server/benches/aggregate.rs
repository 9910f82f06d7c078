//! Streaming aggregation throughput and memory: 1,000 updates of 5 M parameters folded by
//! weighted FedAvg, next to a memcpy of one update measured in the same run, with the peak RSS
//! (VmHWM) after 10, 100 and 1,000 updates — it must not grow with the number of updates.
//! Also: FedAvg with norm clipping (one more pass per update), and the exact LoRA merge on
//! MiniLM-sized targets. Prints markdown tables:
//! `cargo bench -p fedpool-server --bench aggregate`.
//!
//! The updates cycle through a few pre-generated buffers so that the benchmark's own memory does
//! not grow. Throughput is fp32 update bytes folded per second. Where the last-level cache holds
//! the buffers and the sums (~80 MB; some server CPUs have hundreds of MB of L3), both the fold
//! and the memcpy baseline run from cache, so compare the two numbers of one run, not runs on
//! different machines.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use fedpool_common::{AdapterPool, HostTensor, PoolDelta, PoolSpec, SlotUsage, TargetSpec};
use fedpool_server::aggregate::{AggregateConfig, Aggregator, Merge};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// 100 SSF tensors (scale and shift of 50 targets) of 50,000 values: 5 M parameters.
const TARGETS: usize = 50;
const WIDTH: usize = 50_000;
const UPDATES: usize = 1_000;
const BUFFERS: usize = 3;
const CHECKPOINTS: [usize; 3] = [10, 100, 1_000];

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

fn ssf_spec() -> PoolSpec {
    let targets =
        (0..TARGETS).map(|i| TargetSpec { name: format!("layer.{i}.out"), dim_in: WIDTH, dim_out: WIDTH }).collect();
    PoolSpec::ssf(targets, None)
}

fn ssf_delta(spec: &PoolSpec, seed: u64) -> PoolDelta {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tensors = spec
        .layout()
        .into_iter()
        .map(|l| {
            let data = (0..WIDTH).map(|_| rng.random_range(-1e-3f32..1e-3)).collect();
            (l.name, HostTensor::new(l.shape, data).expect("shape fits"))
        })
        .collect();
    PoolDelta { spec_hash: spec.hash(), slots: Some(SlotUsage { slots: vec![0], counts: vec![100] }), tensors }
}

/// Best-of-5 memcpy bandwidth (bytes copied per second) of `bytes` bytes.
fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1.0f32; bytes / 4];
    let mut dst = vec![0.0f32; bytes / 4];
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        best = best.min(t.elapsed());
    }
    bytes as f64 / best.as_secs_f64() / 1e9
}

struct Run {
    label: &'static str,
    updates: usize,
    fold: Duration,
    finish: Duration,
    hwm: Vec<(usize, u64)>,
}

fn fold_ssf(label: &'static str, cfg: AggregateConfig, updates: usize, spec: &PoolSpec, g: &AdapterPool) -> Run {
    let buffers: Vec<PoolDelta> = (0..BUFFERS as u64).map(|s| ssf_delta(spec, s)).collect();
    let mut agg = Aggregator::new(spec.clone(), cfg).expect("valid config");
    agg.begin(g).expect("valid global");
    let mut hwm = Vec::new();
    let mut fold = Duration::ZERO;
    for i in 0..updates {
        let t = Instant::now();
        agg.fold(&buffers[i % BUFFERS], 100).expect("valid update");
        fold += t.elapsed();
        if CHECKPOINTS.contains(&(i + 1)) {
            hwm.push((i + 1, status_kib("VmHWM:")));
        }
    }
    let t = Instant::now();
    let out = agg.finish(g).expect("merge");
    let finish = t.elapsed();
    black_box(out);
    Run { label, updates, fold, finish, hwm }
}

/// MiniLM-like LoRA: 12 targets of 384 × 384, max rank 8, clients of rank 8.
fn lora_run(updates: usize) -> (Duration, Duration, usize) {
    let targets = (0..12).map(|i| TargetSpec { name: format!("layer.{i}.attn"), dim_in: 384, dim_out: 384 }).collect();
    let spec = PoolSpec::adalora(targets, 8, 16.0, None);
    let g = AdapterPool::init(&spec, 1).expect("valid spec");
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let delta = |rng: &mut ChaCha8Rng| {
        let tensors: BTreeMap<String, HostTensor> = spec
            .layout()
            .into_iter()
            .map(|l| {
                let n = l.shape.iter().product();
                (
                    l.name,
                    HostTensor::new(l.shape, (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()).expect("fits"),
                )
            })
            .collect();
        PoolDelta { spec_hash: spec.hash(), slots: None, tensors }
    };
    let buffers: Vec<PoolDelta> = (0..BUFFERS).map(|_| delta(&mut rng)).collect();
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).expect("valid config");
    agg.begin(&g).expect("valid global");
    let t = Instant::now();
    for i in 0..updates {
        agg.fold(&buffers[i % BUFFERS], 50).expect("valid update");
    }
    let fold = t.elapsed();
    let stacked = agg.lora_stacked_rank("layer.0.attn").unwrap_or(0);
    let t = Instant::now();
    black_box(agg.finish(&g).expect("merge"));
    (fold, t.elapsed(), stacked)
}

fn main() {
    let spec = ssf_spec();
    let params = spec.num_params();
    let update_bytes = params * 4;
    let g = AdapterPool::zeros(&spec);
    let memcpy = memcpy_gbps(update_bytes);
    let base = status_kib("VmHWM:");

    let runs = [
        fold_ssf("FedAvg", AggregateConfig::default(), UPDATES, &spec, &g),
        fold_ssf("FedAvg + clip", AggregateConfig { clip_norm: Some(1.0), ..Default::default() }, 200, &spec, &g),
    ];

    println!("## Streaming aggregation: {params} parameters per update ({:.0} MB fp32)\n", update_bytes as f64 / 1e6);
    println!("machine: {}; command: `cargo bench -p fedpool-server --bench aggregate`\n", machine());
    println!("memcpy of one update: {memcpy:.2} GB/s (best of 5, same run)\n");
    println!("| rule | updates | fold time | GB/s folded | vs memcpy | finish |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &runs {
        let gbps = (update_bytes * r.updates) as f64 / r.fold.as_secs_f64() / 1e9;
        println!(
            "| {} | {} | {:.2} s | {gbps:.2} | {:.0}% | {:.1} ms |",
            r.label,
            r.updates,
            r.fold.as_secs_f64(),
            100.0 * gbps / memcpy,
            r.finish.as_secs_f64() * 1e3
        );
    }
    println!("\n| peak RSS (VmHWM) | MiB |");
    println!("| --- | ---: |");
    println!("| before aggregating (spec, global, memcpy buffers) | {:.0} |", mib(base));
    for (n, kib) in &runs[0].hwm {
        println!("| FedAvg, after {n} updates | {:.0} |", mib(*kib));
    }
    println!(
        "\n(the FedAvg run holds the global, the running sums and {BUFFERS} update buffers of {:.0} MB each)",
        update_bytes as f64 / 1e6
    );

    let (fold, finish, stacked) = lora_run(200);
    println!("\n## Exact LoRA merge: 12 targets 384×384, max rank 8, 200 updates of rank 8\n");
    println!("| fold, per update | finish (QR + SVD + re-factorisation) | stacked rank at finish |");
    println!("| ---: | ---: | ---: |");
    println!(
        "| {:.2} ms | {:.1} ms | {stacked} (bound {}) |",
        fold.as_secs_f64() * 1e3 / 200.0,
        finish.as_secs_f64() * 1e3,
        2 * 384 + 8
    );
}
