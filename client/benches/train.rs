//! Forward + backward throughput of adapter training on the real MiniLM, next to the FLOP floor
//! of this machine (its measured f32 matmul rate).
//!
//! `cargo bench -p fedpool-client --bench train` (needs the fetched model: `$FEDPOOL_ASSETS/minilm`
//! or `./assets/minilm`). Prints a markdown table.

use std::time::Instant;

use candle_core::{Device, Tensor};
use fedpool_client::cli::default_model_dir;
use fedpool_client::model::{BertConfig, BertEncoder};
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{forward, orthogonality, Batch, Encoded, QueryCache, TrainableParams, FEDINS_LAMBDA};
use fedpool_common::adapter::AdapterPool;

const BATCH: usize = 32;
const LEN: usize = 64;
const MATMUL_N: usize = 1024;
const ITERS: usize = 2;

/// Forward FLOPs of one sequence of `t` tokens (multiply-adds count 2): per layer the four
/// h×h projections, the two FFN matmuls and the two attention matmuls (QKᵀ and PV).
fn forward_flops(cfg: &BertConfig, t: usize) -> f64 {
    let (t, h, i) = (t as f64, cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let per_layer = 2.0 * t * (4.0 * h * h + 2.0 * h * i) + 2.0 * 2.0 * t * t * h;
    per_layer * cfg.num_hidden_layers as f64
}

/// Best-of-N f32 matmul rate of an N³ product, in GFLOP/s.
fn matmul_gflops() -> f64 {
    let a = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), &Device::Cpu).expect("random matrix");
    let b = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), &Device::Cpu).expect("random matrix");
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let c = a.matmul(&b).expect("matmul");
        c.sum_all().and_then(|s| s.to_scalar::<f32>()).expect("sum");
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * (MATMUL_N as f64).powi(3) / best / 1e9
}

/// Seconds per forward + backward step of `choice` on a random full batch (mean of `ITERS` after
/// one warm-up).
fn step_seconds(model: &BertEncoder, choice: AdapterChoice) -> f64 {
    let cfg = model.config();
    let options = AdapterOptions { choice, ..Default::default() };
    let spec = pool_spec(cfg, &options, 2).expect("spec");
    let pool = AdapterPool::init(&spec, 0).expect("pool");
    let params = TrainableParams::new(&pool, false, &Device::Cpu).expect("params");
    let mut state = 7u64;
    let examples: Vec<Encoded> = (0..BATCH)
        .map(|i| {
            let tokens = (0..LEN)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    1000 + (state >> 33) as u32 % 20000
                })
                .collect();
            Encoded { id: i as u64, tokens, label: i % 2 }
        })
        .collect();
    let mut queries = QueryCache::new(cfg.hidden_size);
    queries.fill(model, &examples, BATCH, 0).expect("queries");
    let rows: Vec<&Encoded> = examples.iter().collect();
    let batch = Batch::pad(&rows, 0, &Device::Cpu).expect("batch");
    let q = queries.batch(&batch.example_ids, &Device::Cpu).expect("query batch");
    let mut times = Vec::new();
    for _ in 0..=ITERS {
        let t0 = Instant::now();
        let adapters = params.tracked(&spec, false);
        let out = forward(model, &adapters, &batch, Some(&q), FEDINS_LAMBDA).expect("forward");
        let mut loss = out.loss().expect("loss");
        if choice == AdapterChoice::Lora {
            loss = (loss + (orthogonality(&adapters).expect("orth") * 0.5).expect("scale")).expect("add");
        }
        let grads = loss.backward().expect("backward");
        std::hint::black_box(grads);
        times.push(t0.elapsed().as_secs_f64());
    }
    times[1..].iter().sum::<f64>() / ITERS as f64
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let dir = default_model_dir();
    let model = match BertEncoder::load(&dir, &Device::Cpu) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipping the training benchmark: {e} (fetch the assets first)");
            return;
        }
    };
    let gflops = matmul_gflops();
    let flops_per_sample = 3.0 * forward_flops(model.config(), LEN);
    let floor = gflops * 1e9 / flops_per_sample;
    let threads = candle_core::utils::get_num_threads();
    println!("## fedpool-client training throughput\n");
    println!("- machine: {} ({} threads used by candle)", cpu_model(), threads);
    println!("- command: `cargo bench -p fedpool-client --bench train`");
    println!(
        "- model: {} ({} layers, hidden {})",
        dir.display(),
        model.config().num_hidden_layers,
        model.config().hidden_size
    );
    println!("- f32 matmul {MATMUL_N}³: {gflops:.1} GFLOP/s (best of 5)");
    println!(
        "- FLOP floor: 3 × forward FLOPs = {:.2} GFLOP per sample at length {LEN} → {floor:.1} samples/s at the matmul rate\n",
        flops_per_sample / 1e9
    );
    println!(
        "| adapter | batch × len | fwd+bwd s/step | samples/s | effective GFLOP/s | floor samples/s | ratio to floor |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for choice in [AdapterChoice::SsfPool, AdapterChoice::Lora] {
        let s = step_seconds(&model, choice);
        let sps = BATCH as f64 / s;
        println!(
            "| {choice} | {BATCH} × {LEN} | {s:.3} | {sps:.1} | {:.1} | {floor:.1} | {:.2} |",
            sps * flops_per_sample / 1e9,
            sps / floor
        );
    }
}
