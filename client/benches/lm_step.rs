//! A decoder's training step (SmolLM2-135M-Instruct, the fetched Q4_1 GGUF), side by side with
//! PyTorch + PEFT on the same model and batch, time and peak memory.
//!
//! `cargo bench -p fedpool-client --bench lm_step` (needs the fetched assets). Each case runs in a
//! process of its own (this binary again, `FEDPOOL_LM_BENCH_CASE=...`), so its peak RSS (VmHWM) is
//! its own: the 4-bit base, with and without gradient checkpointing, and the same model
//! dequantized to f32 (an f32 copy, what transformers holds). With `FEDPOOL_TORCH_VENV=DIR` (a
//! venv with torch, transformers, peft and gguf; README) `smollm2_torch_step.py` beside this file
//! runs the PyTorch step in the same run, with and without its gradient checkpointing. Batch: 8
//! rows of 64 random tokens, the loss on the last 16 of each; LoRA r = 8, α = 16 on q_proj and
//! v_proj; AdamW. `FEDPOOL_BENCH_ITERS` (default 3) steps are timed after one warm-up.

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use fedpool_client::lm::{ChatFormat, LmExample, LmTokenizer};
use fedpool_client::model::{GgufFile, GgufWeights, LlamaModel};
use fedpool_client::setup::default_decoder_path;
use fedpool_client::spec::{decoder_pool_spec, AdapterChoice, AdapterOptions, DEFAULT_DECODER_LORA_MODULES};
use fedpool_client::train::{Silent, TrainConfig};
use fedpool_common::adapter::AdapterPool;

const BATCH: usize = 8;
const LEN: usize = 64;
const RESPONSE: usize = 16;

fn iters() -> usize {
    std::env::var("FEDPOOL_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3)
}

/// One case in this process: `warm-up + iters` steps of `train_lm`, timed by the trainer.
fn run_case(case: &str) {
    let path = default_decoder_path();
    let (weights, checkpoint) = match case {
        "q4" => (GgufWeights::Quantized, false),
        "q4-ckpt" => (GgufWeights::Quantized, true),
        "f32" => (GgufWeights::Dequantized, false),
        "f32-ckpt" => (GgufWeights::Dequantized, true),
        other => panic!("unknown case {other}"),
    };
    let model = LlamaModel::load_gguf(&path, weights, &Device::Cpu).expect("SmolLM2: run scripts/fetch-assets.sh");
    let tokenizer = LmTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert!(matches!(tokenizer.format(), ChatFormat::ChatMl { .. }));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let rows: Vec<LmExample> = (0..BATCH as u64)
        .map(|id| {
            let ids = (0..LEN)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    3 + (state % 49_000) as u32
                })
                .collect();
            LmExample { id, ids, prompt_len: LEN - RESPONSE, response: String::new(), answer: 0 }
        })
        .collect();
    let options = AdapterOptions {
        choice: AdapterChoice::Lora,
        lora_modules: DEFAULT_DECODER_LORA_MODULES.map(String::from).to_vec(),
        ..AdapterOptions::default()
    };
    let spec = decoder_pool_spec(model.config(), &options).unwrap();
    let start = AdapterPool::init(&spec, 0).unwrap();
    let run = |steps| {
        let config = TrainConfig {
            steps,
            batch_size: BATCH,
            lr: 1e-4,
            warmup_steps: 0,
            checkpoint_layers: checkpoint,
            ..TrainConfig::default()
        };
        let out =
            fedpool_client::lm::train_lm(&model, &spec, &start, &rows, &[], &tokenizer, &config, &mut Silent).unwrap();
        out.metrics.train_seconds / steps as f64
    };
    run(1);
    let s = run(iters());
    println!(
        "{{\"case\": \"{case}\", \"s_per_step_median\": {s}, \"peak_rss_mib\": {:.1}, \"weight_mib\": {:.1}}}",
        fedpool_client::malloc::peak_rss_mib().unwrap_or(f64::NAN),
        model.weight_bytes() as f64 / (1 << 20) as f64
    );
}

/// The last JSON line a child printed.
fn child_json(mut cmd: Command) -> Option<serde_json::Value> {
    let out = cmd.output().ok()?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().rev().find_map(|l| serde_json::from_str(l).ok())
}

fn main() {
    if let Ok(case) = std::env::var("FEDPOOL_LM_BENCH_CASE") {
        run_case(&case);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut results: Vec<(String, f64, f64)> = Vec::new();
    for (case, label) in [
        ("q4", "fedpool, 4-bit base"),
        ("q4-ckpt", "fedpool, 4-bit base + checkpointing"),
        ("f32", "fedpool, f32 copy"),
        ("f32-ckpt", "fedpool, f32 copy + checkpointing"),
    ] {
        let mut cmd = Command::new(&exe);
        cmd.env("FEDPOOL_LM_BENCH_CASE", case);
        if let Some(v) = child_json(cmd) {
            results.push((
                label.into(),
                v["s_per_step_median"].as_f64().unwrap_or(f64::NAN),
                v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            ));
        }
    }
    if let Some(venv) = std::env::var_os("FEDPOOL_TORCH_VENV") {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/smollm2_torch_step.py");
        for ckpt in [false, true] {
            let mut cmd = Command::new(PathBuf::from(&venv).join("bin/python3"));
            cmd.arg(&script).arg(default_decoder_path()).args(["--iters", &iters().to_string()]);
            if ckpt {
                cmd.arg("--checkpointing");
            }
            if let Some(v) = child_json(cmd) {
                let case = v["case"].as_str().unwrap_or("torch").to_string();
                results.push((
                    case,
                    v["s_per_step_median"].as_f64().unwrap_or(f64::NAN),
                    v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
                ));
            }
        }
    }
    let torch = results.iter().find(|r| r.0 == "torch+peft f32").map(|r| r.1);
    let f32_rss = results.iter().find(|r| r.0 == "fedpool, f32 copy").map(|r| r.2);
    println!("\nSmolLM2-135M, LoRA r=8 on q_proj, v_proj; batch {BATCH} × {LEN} tokens, loss on the last {RESPONSE}; {} timed steps\n", iters());
    println!("| case | s/step | × torch | peak RSS MiB | × fedpool f32 RSS |\n| --- | ---: | ---: | ---: | ---: |");
    for (case, s, rss) in &results {
        let vs = torch.map_or("".into(), |t| format!("{:.2}", s / t));
        let mem = f32_rss.map_or("".into(), |m| format!("{:.2}", rss / m));
        println!("| {case} | {s:.2} | {vs} | {rss:.0} | {mem} |");
    }
}
