//! One training step of MiniLM with adapters, broken down, and side by side with PyTorch + PEFT.
//!
//! `cargo bench -p fedpool-client --bench step` (needs the fetched assets). With
//! `FEDPOOL_TORCH_VENV=DIR` (a venv with torch, transformers and peft; README) the PyTorch reference
//! (`torch_reference.py`, beside this file) runs in the same run and the tables carry the ratios.
//! `FEDPOOL_BENCH_ITERS` (default 5) steps are timed after 2 warm-ups; `FEDPOOL_BENCH_ONLY` =
//! `pairs`, `step`, `breakdown`, `eval` or `rss` runs one table. Prints markdown tables:
//! 0. the headline ratios (fused LoRA step, fixed and real lengths, and evaluation, against
//!    PyTorch) from three back-to-back pairs each, robust to this machine's drift;
//! 1. the step (forward, backward, AdamW) for LoRA r=8 on query/value, SSF and the FedIns SSF pool,
//!    at batch 32 × 64 random tokens and on real VADER sentences padded to each batch's longest
//!    (max 64), with the fused kernels and with candle's composed ops, and PyTorch's step;
//! 2. where a 32 × 64 LoRA step's time goes, op by op (each op's forward + backward at the step's
//!    shapes, times its count per step), fused and composed, with GFLOP/s per matmul shape;
//! 3. evaluation throughput (no gradient) against PyTorch's `no_grad` forward;
//! 4. peak RSS of a process that runs training steps, each measurement its own process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use fedpool_client::data::{assets_dir, load_spec, DataOptions};
use fedpool_client::model::{BertEncoder, Kernels};
use fedpool_client::setup::default_model_dir;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{
    encode_examples, evaluate, forward, orthogonality, tokenizer_for_training, AdapterTensors, Batch, BatchOrder,
    Encoded, QueryCache, TrainConfig, TrainableParams, FEDINS_LAMBDA,
};
use fedpool_common::adapter::AdapterPool;
use fedpool_kernels::attention::{attention, attention_composed, AttentionShape};
use fedpool_kernels::{activation, frozen_linear, frozen_matmul, norm};

const BATCH: usize = 32;
const LEN: usize = 64;
const EVAL_SENTENCES: usize = 1024;
const EVAL_BATCH: usize = 64;

fn iters() -> usize {
    std::env::var("FEDPOOL_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(5)
}

fn only(table: &str) -> bool {
    std::env::var("FEDPOOL_BENCH_ONLY").map_or(true, |o| o == table)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Random token rows of exactly `LEN` tokens, or real VADER sentences.
struct Inputs {
    random: Vec<Encoded>,
    real: Vec<Encoded>,
    pad_id: u32,
}

impl Inputs {
    fn load(model_dir: &Path) -> Result<Self, String> {
        let mut state = 7u64;
        let random = (0..BATCH * 8)
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
        let data = load_spec("vader", &DataOptions::default()).map_err(|e| e.to_string())?;
        let tokenizer = tokenizer_for_training(&model_dir.join("tokenizer.json"), LEN).map_err(|e| e.to_string())?;
        let pad_id = tokenizer.inner().get_padding().map_or(0, |p| p.pad_id);
        let real = encode_examples(&tokenizer, data.examples.iter().map(|e| (e.id, e.text.as_str(), e.label)))
            .map_err(|e| e.to_string())?;
        Ok(Self { random, real, pad_id })
    }

    fn rows(&self, real: bool) -> &[Encoded] {
        if real {
            &self.real
        } else {
            &self.random
        }
    }
}

/// Median seconds of (forward, backward, optimizer) over `iters` steps after 2 warm-ups.
fn step_phases(model: &BertEncoder, choice: AdapterChoice, inputs: &Inputs, real: bool, iters: usize) -> [f64; 3] {
    let cfg = model.config();
    let options = AdapterOptions { choice, ..Default::default() };
    let spec = pool_spec(cfg, &options, 2).expect("spec");
    let pool = AdapterPool::init(&spec, 0).expect("pool");
    let params = TrainableParams::new(&pool, false, &Device::Cpu).expect("params");
    let adamw = ParamsAdamW { lr: 5e-4, weight_decay: 0.0, ..Default::default() };
    let mut optimizer = AdamW::new(params.trainable_vars(), adamw).expect("optimizer");
    let rows = inputs.rows(real);
    let mut order = BatchOrder::new(rows.len(), BATCH, 0);
    let mut queries = QueryCache::new(cfg.hidden_size);
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..iters + 2 {
        let picked: Vec<&Encoded> = order.next_batch().into_iter().map(|j| &rows[j]).collect();
        // The frozen queries are cached once per example by the trainer: not part of a step.
        queries.fill(model, picked.iter().copied(), BATCH, inputs.pad_id).expect("queries");
        let batch = Batch::pad(&picked, inputs.pad_id, &Device::Cpu).expect("batch");
        let q = queries.batch(&batch.example_ids, &Device::Cpu).expect("query batch");
        let t0 = Instant::now();
        let adapters = params.tracked(&spec, false);
        let out = forward(model, &adapters, &batch, Some(&q), FEDINS_LAMBDA).expect("forward");
        let mut loss = out.loss().expect("loss");
        if choice == AdapterChoice::Lora {
            loss = (loss + (orthogonality(&adapters).expect("orth") * 0.5).expect("scale")).expect("add");
        }
        loss.to_scalar::<f32>().expect("loss value");
        let t1 = Instant::now();
        let grads = loss.backward().expect("backward");
        let t2 = Instant::now();
        optimizer.step(&grads).expect("step");
        let t3 = Instant::now();
        if i >= 2 {
            times[0].push((t1 - t0).as_secs_f64());
            times[1].push((t2 - t1).as_secs_f64());
            times[2].push((t3 - t2).as_secs_f64());
        }
    }
    times.map(median)
}

/// Runs the PyTorch reference; `None` when no venv is named or it fails (said on stderr).
fn torch(model_dir: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let venv = std::env::var_os("FEDPOOL_TORCH_VENV")?;
    let python = PathBuf::from(venv).join("bin").join("python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches").join("torch_reference.py");
    let vader = assets_dir().join("vader");
    let out = Command::new(python).arg(script).arg(model_dir).arg(vader).args(args).output().ok()?;
    if !out.status.success() {
        eprintln!("torch reference {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().rev().find_map(|l| serde_json::from_str(l).ok())
}

fn step_table(models: &[(Kernels, BertEncoder)], inputs: &Inputs, model_dir: &Path) {
    let iters = iters();
    println!("### Training step (forward + backward + AdamW), batch {BATCH}, s per step (median of {iters})\n");
    println!("| adapter | input | kernels | forward | backward | AdamW | step | vs composed | vs PyTorch |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for real in [false, true] {
        let input = if real { "VADER, dynamic padding ≤ 64" } else { "random 32 × 64" };
        let it = iters.to_string();
        let mut args = vec!["--case", "step", "--iters", &it];
        if real {
            args.push("--real");
        }
        // PyTorch before and after fedpool's cases (this machine's speed drifts within minutes):
        // the ratios use the mean of the two.
        let torch_step = || torch(model_dir, &args).and_then(|v| v["s_per_step_median"].as_f64());
        let torch_before = torch_step();
        let mut rows = Vec::new();
        for choice in [AdapterChoice::Lora, AdapterChoice::Ssf, AdapterChoice::SsfPool] {
            let mut composed = None;
            for (kernels, model) in models {
                let [f, b, o] = step_phases(model, choice, inputs, real, iters);
                let total = f + b + o;
                if *kernels == Kernels::Composed {
                    composed = Some(total);
                }
                rows.push((choice, *kernels, [f, b, o], composed));
            }
        }
        let torch_after = torch_step();
        let torch_s = torch_before.zip(torch_after).map(|(a, b)| (a + b) / 2.0).or(torch_before).or(torch_after);
        for (choice, kernels, [f, b, o], composed) in rows {
            let total = f + b + o;
            let vs_composed = composed.map_or("—".into(), |c| format!("{:.2}×", total / c));
            let vs_torch = torch_s.map_or("—".into(), |t| format!("{:.2}×", total / t));
            println!(
                "| {choice} | {input} | {kernels:?} | {f:.3} | {b:.3} | {o:.4} | {total:.3} | {vs_composed} | {vs_torch} |"
            );
        }
        if let Some(t) = torch_s {
            let each = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.3}"));
            println!(
                "| PyTorch + PEFT LoRA r=8 (before {}, after {}) | {input} | eager | | | | {t:.3} | | 1.00× |",
                each(torch_before),
                each(torch_after)
            );
        }
    }
    println!();
}

/// Seconds per sentence of fedpool's evaluation (best of 2) on `examples` with `model`.
fn eval_seconds(model: &BertEncoder, examples: &[Encoded], pad_id: u32) -> f64 {
    let spec = pool_spec(model.config(), &AdapterOptions { choice: AdapterChoice::Lora, ..Default::default() }, 2)
        .expect("spec");
    let pool = AdapterPool::init(&spec, 0).expect("pool");
    let adapters = AdapterTensors::from_pool(&spec, &pool, false, &Device::Cpu).expect("adapters");
    let config = TrainConfig { eval_batch_size: EVAL_BATCH, ..TrainConfig::default() };
    let queries = QueryCache::new(model.config().hidden_size);
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t0 = Instant::now();
        evaluate(model, &adapters, examples, &queries, &config, pad_id).expect("evaluate");
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best / examples.len() as f64
}

/// The headline ratios, robust to this machine's drift: `PAIRS` pairs of (PyTorch, then fedpool's
/// fused LoRA) run back to back, one ratio per pair; prints each pair and the median.
fn pairs_table(fused: &BertEncoder, inputs: &Inputs, model_dir: &Path) {
    const PAIRS: usize = 3;
    let iters = iters();
    println!(
        "### fedpool fused LoRA r=8 / PyTorch + PEFT, {PAIRS} back-to-back pairs (median of {iters} steps each)\n"
    );
    println!("| case | PyTorch s | fedpool s | ratio per pair | median ratio |");
    println!("| --- | --- | --- | --- | ---: |");
    let it = iters.to_string();
    let eval_batch = EVAL_BATCH.to_string();
    // (name, what the reference runs, real sentences?, evaluation?)
    let cases: [(&str, Vec<&str>, bool, bool); 3] = [
        ("step, random 32 × 64", vec!["--case", "step", "--iters", &it], false, false),
        ("step, VADER dynamic padding", vec!["--case", "step", "--iters", &it, "--real"], true, false),
        ("evaluation, s per 1,000 sentences", vec!["--case", "eval", "--batch", &eval_batch], true, true),
    ];
    for (name, args, real, eval) in cases {
        let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..PAIRS {
            let Some(t) = torch(model_dir, &args) else { return };
            let (t, f) = if eval {
                let Some(rate) = t["sentences_per_s"].as_f64() else { return };
                let examples = &inputs.real[..EVAL_SENTENCES.min(inputs.real.len())];
                (1000.0 / rate, 1000.0 * eval_seconds(fused, examples, inputs.pad_id))
            } else {
                let Some(t) = t["s_per_step_median"].as_f64() else { return };
                (t, step_phases(fused, AdapterChoice::Lora, inputs, real, iters).iter().sum::<f64>())
            };
            theirs.push(format!("{t:.3}"));
            ours.push(format!("{f:.3}"));
            ratios.push(f / t);
        }
        let each = ratios.iter().map(|r| format!("{r:.2}×")).collect::<Vec<_>>().join(", ");
        println!("| {name} | {} | {} | {each} | **{:.2}×** |", theirs.join(", "), ours.join(", "), median(ratios));
    }
    println!();
}

/// Median seconds of `f` (forward) and of the backward of its output, over 5 runs after a warm-up.
fn time_op(x: &Var, f: impl Fn(&Tensor) -> Tensor) -> (f64, f64) {
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for i in 0..6 {
        let t0 = Instant::now();
        let y = f(x.as_tensor());
        let t1 = Instant::now();
        let grads = y.backward().expect("backward");
        let t2 = Instant::now();
        assert!(grads.get(x.as_tensor()).is_some(), "no gradient reached the input");
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
    }
    (median(fwd), median(bwd))
}

fn breakdown_table(models: &[(Kernels, BertEncoder)], inputs: &Inputs) {
    let cfg = models[0].1.config().clone();
    let (h, inner, layers) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers);
    let n = BATCH * LEN;
    let dev = Device::Cpu;
    let var =
        |shape: (usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).expect("x")).expect("var");
    let weight = |o: usize, i: usize| Tensor::randn(0f32, 0.05, (o, i), &dev).expect("w");
    let vec = |d: usize| Tensor::randn(0f32, 0.1, d, &dev).expect("b");
    println!(
        "### Where a LoRA step's time goes (batch {BATCH} × {LEN} random tokens, ms per step = ms per call × calls)\n"
    );
    println!(
        "| op | shape | calls | composed fwd+bwd ms | fused fwd+bwd ms | speed-up | composed GFLOP/s | fused GFLOP/s |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut sums = [0.0f64; 2];
    let mut row = |op: &str, shape: String, calls: usize, flops: f64, c: (f64, f64), f: (f64, f64)| {
        let (c, f) = ((c.0 + c.1) * calls as f64, (f.0 + f.1) * calls as f64);
        sums[0] += c;
        sums[1] += f;
        let rate = |s: f64| if flops > 0.0 { format!("{:.1}", flops * calls as f64 / s / 1e9) } else { "".into() };
        println!(
            "| {op} | {shape} | {calls} | {:.1} | {:.1} | {:.2}× | {} | {} |",
            c * 1e3,
            f * 1e3,
            c / f,
            rate(c),
            rate(f)
        );
    };
    for (d_in, d_out, calls) in [(h, h, 4 * layers), (h, inner, layers), (inner, h, layers)] {
        let x = var((n, d_in));
        let (w, b) = (weight(d_out, d_in), vec(d_out));
        let c = time_op(&x, |x| frozen_matmul(x, &w.t().expect("t")).expect("mm").broadcast_add(&b).expect("bias"));
        let f = time_op(&x, |x| frozen_linear(x, &w, Some(&b)).expect("linear"));
        // Forward and the input gradient: two products of 2·n·d_in·d_out FLOPs.
        row("linear + bias", format!("{n}×{d_in} → {d_out}"), calls, 4.0 * (n * d_in * d_out) as f64, c, f);
    }
    {
        let shape = AttentionShape {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            causal: false,
            scale: 1.0 / ((h / cfg.num_attention_heads) as f32).sqrt(),
        };
        let x = var((n, 3 * h));
        let lengths = vec![LEN; BATCH];
        let split = |x: &Tensor, fused: bool| {
            let qkv = x.reshape((BATCH, LEN, 3 * h)).expect("reshape");
            let part = |i: usize| qkv.narrow(2, i * h, h).expect("narrow");
            let run = if fused { attention } else { attention_composed };
            run(&part(0), &part(1), &part(2), &lengths, &shape).expect("attention")
        };
        let c = time_op(&x, |x| split(x, false));
        let f = time_op(&x, |x| split(x, true));
        // QKᵀ and PV forward, four products backward: 6 · 2·B·T²·H FLOPs.
        row(
            "attention",
            format!("{BATCH}×{LEN}, {} heads", shape.num_heads),
            layers,
            12.0 * (n * LEN * h) as f64,
            c,
            f,
        );
    }
    {
        let x = var((n, h));
        let (w, b) = (vec(h), vec(h));
        let c = time_op(&x, |x| norm::layer_norm_composed(x, &w, &b, 1e-12).expect("ln"));
        let f = time_op(&x, |x| norm::layer_norm(x, &w, &b, 1e-12).expect("ln"));
        row("LayerNorm", format!("{n}×{h}"), 2 * layers + 1, 0.0, c, f);
    }
    {
        let x = var((n, inner));
        let b = vec(inner);
        let c = time_op(&x, |x| x.broadcast_add(&b).expect("bias").gelu_erf().expect("gelu"));
        let f = time_op(&x, |x| activation::bias_gelu_erf(x, &b).expect("gelu"));
        row("bias + GELU (erf)", format!("{n}×{inner}"), layers, 0.0, c, f);
    }
    let [c_step, f_step] = [Kernels::Composed, Kernels::Fused].map(|k| {
        let model = &models.iter().find(|(m, _)| *m == k).expect("model").1;
        step_phases(model, AdapterChoice::Lora, inputs, false, 3)[..2].iter().sum::<f64>()
    });
    // Each op timed alone pays its own allocations and seed gradient: the parts can add up to
    // more than the step, and then there is no "rest" to show.
    let rest = |step: f64, sum: f64| if step > sum { format!("{:.1}", (step - sum) * 1e3) } else { "< 0".into() };
    println!(
        "| the rest (LoRA, residual adds, embeddings, pooling, head, loss, autograd) | | | {} | {} | | | |",
        rest(c_step, sums[0]),
        rest(f_step, sums[1])
    );
    println!(
        "| **forward + backward, measured** | | | {:.1} | {:.1} | {:.2}× | | |\n",
        c_step * 1e3,
        f_step * 1e3,
        c_step / f_step
    );
}

fn eval_table(models: &[(Kernels, BertEncoder)], inputs: &Inputs, model_dir: &Path) {
    println!("### Evaluation: {EVAL_SENTENCES} VADER sentences, no gradient, length-sorted batches of {EVAL_BATCH}\n");
    println!("| implementation | sentences/s | vs PyTorch |");
    println!("| --- | ---: | ---: |");
    let torch_rate = torch(model_dir, &["--case", "eval", "--batch", &EVAL_BATCH.to_string()])
        .and_then(|v| v["sentences_per_s"].as_f64());
    let examples = &inputs.real[..EVAL_SENTENCES.min(inputs.real.len())];
    for (kernels, model) in models {
        let rate = 1.0 / eval_seconds(model, examples, inputs.pad_id);
        let vs = torch_rate.map_or("—".into(), |t| format!("{:.2}×", rate / t));
        println!("| fedpool LoRA, {kernels:?} | {rate:.1} | {vs} |");
    }
    if let Some(t) = torch_rate {
        println!("| PyTorch + PEFT LoRA, `no_grad` | {t:.1} | 1.00× |");
    }
    println!();
}

/// In a child process: 3 steps of one case at 32 × 64, then the peak RSS on stdout.
fn rss_child(case: &str, model_dir: &Path) {
    let (choice, kernels) = case.split_once(':').expect("case is ADAPTER:KERNELS");
    let choice: AdapterChoice = choice.parse().expect("adapter");
    let kernels = if kernels == "Fused" { Kernels::Fused } else { Kernels::Composed };
    let model = BertEncoder::load(model_dir, &Device::Cpu).expect("model").with_kernels(kernels);
    let inputs = Inputs::load(model_dir).expect("inputs");
    // With FEDPOOL_BENCH_ITERS set it times that many steps (stderr): A/B runs of whole processes.
    let steps = if std::env::var_os("FEDPOOL_BENCH_ITERS").is_some() { iters() } else { 1 };
    let phases = step_phases(&model, choice, &inputs, false, steps);
    println!("{:.1}", fedpool_client::malloc::peak_rss_mib().unwrap_or(f64::NAN));
    eprintln!("s per step {:.3}", phases.iter().sum::<f64>());
}

fn rss_table(model_dir: &Path) {
    println!("### Peak RSS of a process training 3 steps at batch {BATCH} × {LEN} (MiB; model and data loaded)\n");
    println!("| adapter | composed | fused | fused / composed | PyTorch + PEFT |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let torch_rss = torch(model_dir, &["--case", "step", "--iters", "1"]).and_then(|v| v["peak_rss_mib"].as_f64());
    let exe = std::env::current_exe().expect("bench executable");
    for choice in [AdapterChoice::Lora, AdapterChoice::Ssf, AdapterChoice::SsfPool] {
        let measure = |kernels: Kernels| -> f64 {
            let out = Command::new(&exe)
                .env("FEDPOOL_BENCH_CHILD", format!("{choice}:{kernels:?}"))
                .output()
                .expect("child process");
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN)
        };
        let (c, f) = (measure(Kernels::Composed), measure(Kernels::Fused));
        let t = if choice == AdapterChoice::Lora {
            torch_rss.map_or("—".into(), |t| format!("{t:.0}"))
        } else {
            "".into()
        };
        println!("| {choice} | {c:.0} | {f:.0} | {:.2} | {t} |", f / c);
    }
    println!();
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
    // As the binaries do; FEDPOOL_BENCH_GLIBC_DEFAULTS=1 leaves glibc's defaults (A/B runs).
    if std::env::var_os("FEDPOOL_BENCH_GLIBC_DEFAULTS").is_none() {
        fedpool_client::malloc::tune_for_training();
    }
    let model_dir = default_model_dir();
    if let Ok(case) = std::env::var("FEDPOOL_BENCH_CHILD") {
        return rss_child(&case, &model_dir);
    }
    let load = |k: Kernels| BertEncoder::load(&model_dir, &Device::Cpu).map(|m| (k, m.with_kernels(k)));
    let models = match (load(Kernels::Composed), load(Kernels::Fused)) {
        (Ok(c), Ok(f)) => vec![c, f],
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("skipping the step benchmark: {e} (fetch the assets first)");
            return;
        }
    };
    let inputs = match Inputs::load(&model_dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("skipping the step benchmark: {e} (fetch the assets first)");
            return;
        }
    };
    println!("## fedpool-client training step\n");
    println!("- machine: {} ({} threads)", cpu_model(), candle_core::utils::get_num_threads());
    println!("- command: `FEDPOOL_TORCH_VENV=~/torch-venv cargo bench -p fedpool-client --bench step`");
    println!(
        "- PyTorch reference: {}\n",
        std::env::var("FEDPOOL_TORCH_VENV")
            .map_or("not run (set FEDPOOL_TORCH_VENV)".into(), |v| format!("{v}, 2 threads"))
    );
    if only("pairs") {
        pairs_table(&models[1].1, &inputs, &model_dir);
    }
    if only("step") {
        step_table(&models, &inputs, &model_dir);
    }
    if only("breakdown") {
        breakdown_table(&models, &inputs);
    }
    if only("eval") {
        eval_table(&models, &inputs, &model_dir);
    }
    if only("rss") {
        rss_table(&model_dir);
    }
}
