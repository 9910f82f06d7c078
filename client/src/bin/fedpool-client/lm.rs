//! `fedpool-client lm`: fine-tune adapters of a decoder LLM (a GGUF file, its base kept 4-bit, or
//! an HF folder) on prompt/response pairs, judged by generation against the zero-shot base.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use fedpool_common::adapter::{AdapterPool, FEDINS_POOL_SIZE, FEDINS_TOP_K};
use fedpool_common::checkpoint::{atomic_write, write_pool, CheckpointMeta};
use fedpool_common::ids::{BackboneFingerprint, Round};
use serde::Serialize;

use fedpool_client::data::{load_spec, parse_spec, DataOptions};
use fedpool_client::device::DeviceChoice;
use fedpool_client::lm::{evaluate_lm, train_lm, LmEval, LmExample, LmTask, LmTokenizer};
use fedpool_client::model::{GgufFile, GgufWeights, LlamaModel};
use fedpool_client::setup::{default_decoder_path, default_lr};
use fedpool_client::spec::{decoder_pool_spec, AdapterChoice, AdapterOptions, DEFAULT_LORA_ALPHA, DEFAULT_LORA_RANK};
use fedpool_client::train::{AdapterTensors, Schedule, TrainConfig, TrainReport};

use crate::cli::ProgressObserver;

/// `fedpool-client lm` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct LmArgs {
    /// The decoder: a .gguf file (weights kept in their quantized types) [default:
    /// $FEDPOOL_ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(long, value_name = "FILE")]
    pub(crate) model: Option<PathBuf>,
    /// Data SPEC: vader (→ positive/negative), trec (→ the question's answer type as a word),
    /// sms (→ spam/ham), or a CSV/TSV/JSONL file with prompt and response columns
    #[arg(long, value_name = "SPEC")]
    pub(crate) data: String,
    /// Adapter: lora (PEFT's B·A), adalora (SVD form), ssf (one SSF slot at every norm and
    /// projection) or ssf-pool (FedIns: slots selected per prompt by key)
    #[arg(long = "adapter", value_name = "ADAPTER", default_value = "lora")]
    pub(crate) choice: AdapterChoice,
    /// LoRA rank r
    #[arg(long, default_value_t = DEFAULT_LORA_RANK)]
    pub(crate) rank: usize,
    /// LoRA alpha: the update is scaled by alpha / r
    #[arg(long, default_value_t = DEFAULT_LORA_ALPHA)]
    pub(crate) alpha: f32,
    /// LoRA modules of each layer (HF names), comma-separated: any of q_proj, k_proj, v_proj,
    /// o_proj, gate_proj, up_proj, down_proj
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub(crate) lora_modules: Vec<String>,
    /// Slots per SSF pool (ssf-pool)
    #[arg(long, default_value_t = FEDINS_POOL_SIZE)]
    pub(crate) pool_size: usize,
    /// Slots mixed per prompt (ssf-pool)
    #[arg(long, default_value_t = FEDINS_TOP_K)]
    pub(crate) top_k: usize,
    /// Optimizer steps
    #[arg(long, default_value_t = 100)]
    pub(crate) steps: usize,
    /// Prompt/response pairs per step
    #[arg(long, default_value_t = 8)]
    pub(crate) batch_size: usize,
    /// Peak learning rate of AdamW [default: the adapter's, as for `train`]
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Linear warmup steps [default: 10% of --steps]
    #[arg(long)]
    pub(crate) warmup_steps: Option<usize>,
    /// Longest prompt + response in tokens (a longer prompt loses its middle)
    #[arg(long, default_value_t = 256)]
    pub(crate) max_len: usize,
    /// Fraction of the data held out (stratified by answer)
    #[arg(long, default_value_t = 0.2)]
    pub(crate) test_fraction: f64,
    /// Train on at most N of the training pairs (a seeded sample)
    #[arg(long, value_name = "N")]
    pub(crate) train_examples: Option<usize>,
    /// Evaluate on at most N held-out pairs (a seeded sample)
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub(crate) eval_examples: usize,
    /// Prompts per evaluation batch
    #[arg(long, default_value_t = 16)]
    pub(crate) eval_batch_size: usize,
    /// Gradient checkpointing: keep each layer's input only and recompute the layer in the
    /// backward (one layer's activations in memory at a time; about a third more compute)
    #[arg(long)]
    pub(crate) checkpoint_layers: bool,
    /// Skip the zero-shot evaluation of the base model
    #[arg(long)]
    pub(crate) no_zero_shot: bool,
    /// GGUF weights: quantized (as stored: the 4-bit base) or dequantized (f32 copies, the
    /// reference for memory and accuracy)
    #[arg(long, default_value = "quantized", value_parser = parse_weights)]
    pub(crate) weights: GgufWeights,
    /// Seed of the split, the samples, the initialisation and the batch order
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Device: cpu, cuda:N, or auto
    #[arg(long, default_value = "auto")]
    pub(crate) device: DeviceChoice,
    /// Output folder (created): adapter.safetensors and metrics.json
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
}

fn parse_weights(s: &str) -> Result<GgufWeights, String> {
    match s {
        "quantized" => Ok(GgufWeights::Quantized),
        "dequantized" => Ok(GgufWeights::Dequantized),
        other => Err(format!("{other:?}: expected quantized or dequantized")),
    }
}

/// What `fedpool-client lm` writes to metrics.json.
#[derive(Debug, Serialize)]
pub(crate) struct LmMetrics {
    pub(crate) model: String,
    pub(crate) data: String,
    pub(crate) adapter: String,
    pub(crate) weights: String,
    pub(crate) weight_mib: f64,
    pub(crate) train_examples: usize,
    pub(crate) zero_shot: Option<LmEval>,
    pub(crate) report: TrainReport,
    pub(crate) seconds_per_step: f64,
    pub(crate) peak_rss_mib: Option<f64>,
}

/// At most `n` of `examples`, a sample fixed by `seed` (in their original order).
fn sample(mut examples: Vec<LmExample>, n: usize, seed: u64) -> Vec<LmExample> {
    if examples.len() <= n {
        return examples;
    }
    let key = |id: u64| (id ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| key(examples[i].id));
    let mut keep: Vec<usize> = order[..n].to_vec();
    keep.sort_unstable();
    let mut out = Vec::with_capacity(n);
    for (i, e) in examples.drain(..).enumerate() {
        if keep.binary_search(&i).is_ok() {
            out.push(e);
        }
    }
    out
}

/// Runs `fedpool-client lm`.
pub(crate) fn run_lm(args: &LmArgs) -> anyhow::Result<LmMetrics> {
    let path = args.model.clone().unwrap_or_else(default_decoder_path);
    if !path.is_file() {
        anyhow::bail!("decoder {} not found (pass --model FILE.gguf, or run scripts/fetch-assets.sh)", path.display());
    }
    let (device, _) = fedpool_client::device::open(args.device)?;
    let gguf = GgufFile::open(&path)?;
    let tokenizer = LmTokenizer::from_gguf(&gguf)?;
    let model = LlamaModel::load_gguf(&path, args.weights, &device)?;
    let fingerprint =
        BackboneFingerprint::of_model_path(&path).with_context(|| format!("reading {}", path.display()))?;

    let spec_parsed = parse_spec(&args.data)?;
    let task = LmTask::for_spec(&spec_parsed).with_context(|| {
        format!("data {:?} has no generation task (use vader, trec, sms or a prompt/response file)", args.data)
    })?;
    let options = if task == LmTask::Columns { LmTask::file_options() } else { DataOptions::default() };
    let data = load_spec(&args.data, &options)?;
    let (train_set, test_set) = data.split(args.test_fraction, args.seed);
    let encode = |set: &fedpool_client::data::Dataset| -> anyhow::Result<Vec<LmExample>> {
        task.pairs(set).iter().map(|p| Ok(tokenizer.encode_pair(p, args.max_len)?)).collect()
    };
    let train = sample(encode(&train_set)?, args.train_examples.unwrap_or(usize::MAX), args.seed);
    let eval = sample(encode(&test_set)?, args.eval_examples, args.seed);
    if train.is_empty() || eval.is_empty() {
        anyhow::bail!("{}: {} training and {} held-out pairs; need both", args.data, train.len(), eval.len());
    }

    let adapter = AdapterOptions {
        choice: args.choice,
        pool_size: args.pool_size,
        top_k: args.top_k,
        rank: args.rank,
        alpha: args.alpha,
        lora_modules: args.lora_modules.clone(),
        ..AdapterOptions::default()
    };
    let spec = decoder_pool_spec(model.config(), &adapter)?;
    let start = AdapterPool::init(&spec, args.seed)?;
    let config = TrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr.unwrap_or_else(|| default_lr(args.choice)),
        warmup_steps: args.warmup_steps.unwrap_or(args.steps / 10),
        schedule: Schedule::Linear,
        max_len: args.max_len,
        seed: args.seed,
        eval_batch_size: args.eval_batch_size,
        checkpoint_layers: args.checkpoint_layers,
        ..TrainConfig::default()
    };
    let zero_shot = if args.no_zero_shot {
        None
    } else {
        // The identity pool is the base model: LoRA's B = 0, SSF's γ = 1, β = 0.
        let adapters = AdapterTensors::from_pool(&spec, &start, false, &device)?;
        Some(evaluate_lm(&model, &adapters, &eval, &tokenizer, args.eval_batch_size, &mut ProgressObserver::new())?)
    };
    let t = Instant::now();
    let outcome = train_lm(&model, &spec, &start, &train, &eval, &tokenizer, &config, &mut ProgressObserver::new())?;
    tracing::debug!(seconds = t.elapsed().as_secs_f64(), "trained and evaluated");

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    write_pool(
        &args.out.join("adapter.safetensors"),
        &outcome.pool,
        &CheckpointMeta::now(Round(0), spec, fingerprint),
    )?;
    let metrics = LmMetrics {
        model: path.display().to_string(),
        data: args.data.clone(),
        adapter: args.choice.name().into(),
        weights: format!("{:?}", args.weights).to_lowercase(),
        weight_mib: model.weight_bytes() as f64 / (1 << 20) as f64,
        train_examples: train.len(),
        zero_shot,
        seconds_per_step: outcome.metrics.train_seconds / outcome.metrics.steps.max(1) as f64,
        report: outcome.metrics,
        peak_rss_mib: fedpool_client::malloc::peak_rss_mib(),
    };
    let json = serde_json::to_string_pretty(&metrics)?;
    let metrics_path = args.out.join("metrics.json");
    atomic_write(&metrics_path, json.as_bytes()).with_context(|| format!("writing {}", metrics_path.display()))?;
    Ok(metrics)
}

impl LmMetrics {
    /// The comparison as a Markdown table, then the run's cost.
    pub(crate) fn table(&self) -> String {
        let mut s = String::from(
            "| model | exact match | macro-F1 | perplexity | held-out |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        let r = &self.report;
        if let Some(z) = &self.zero_shot {
            s += &format!(
                "| zero-shot base | {:.4} | {:.4} | {:.3} | {} |\n",
                z.exact_match, z.macro_f1, z.perplexity, z.examples
            );
        }
        s += &format!(
            "| {} ({} steps) | {:.4} | {:.4} | {:.3} | {} |\n",
            self.adapter,
            r.steps,
            r.accuracy,
            r.macro_f1,
            r.eval_loss.exp(),
            r.eval_examples
        );
        s += &format!(
            "{} training pairs; {:.2} s/step, training {:.1} s, evaluation {:.1} s; weights {:.1} MiB ({}); peak RSS {}",
            self.train_examples,
            self.seconds_per_step,
            r.train_seconds,
            r.eval_seconds,
            self.weight_mib,
            self.weights,
            self.peak_rss_mib.map_or("unknown".into(), |m| format!("{m:.0} MiB"))
        );
        s
    }
}
