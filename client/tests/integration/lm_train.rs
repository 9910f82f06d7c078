//! Causal-LM fine-tuning of a tiny random decoder stored as a Q8_0 GGUF (its own byte-level
//! tokenizer and ChatML template in the metadata): LoRA and a FedIns SSF pool learn a two-answer
//! task from zero, judged by generation, the loss on response tokens only.

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use fedpool_client::lm::{evaluate_lm, train_lm, ChatFormat, LmExample, LmTokenizer, PromptResponse};
use fedpool_client::model::{write_random_gguf, GgufFile, LlamaConfig, LlamaModel};
use fedpool_client::spec::{decoder_pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{AdapterTensors, Silent, TrainConfig};
use fedpool_common::{AdapterKind, AdapterPool};

fn setup() -> (tempfile::TempDir, LlamaModel, LmTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_random_gguf(&path, &LlamaConfig { vocab_size: 128, ..LlamaConfig::tiny() }, GgmlDType::Q8_0, 3).unwrap();
    let model = LlamaModel::load(&path, &Device::Cpu).unwrap();
    let tokenizer = LmTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    (dir, model, tokenizer)
}

/// "the N" → "in", "an N" → "on": the answer is set by the prompt's first word.
fn examples(tokenizer: &LmTokenizer, ids: std::ops::Range<u64>) -> Vec<LmExample> {
    ids.map(|i| {
        let the = i.is_multiple_of(2);
        let pair = PromptResponse {
            id: i,
            prompt: format!("{} {}", if the { "the" } else { "an" }, i * 7 % 100),
            response: if the { "in" } else { "on" }.into(),
            answer: usize::from(!the),
        };
        tokenizer.encode_pair(&pair, 64).unwrap()
    })
    .collect()
}

fn config() -> TrainConfig {
    TrainConfig { steps: 60, batch_size: 8, lr: 3e-2, warmup_steps: 5, eval_batch_size: 8, ..TrainConfig::default() }
}

#[test]
fn lora_and_a_fedins_pool_learn_a_generation_task_on_a_quantized_decoder() {
    let (_dir, model, tokenizer) = setup();
    assert!(matches!(tokenizer.format(), ChatFormat::ChatMl { system: Some(_) }));
    let (train, eval) = (examples(&tokenizer, 0..48), examples(&tokenizer, 100..116));
    // The loss covers the response and its end token only.
    let e = &train[0];
    assert_eq!(&e.ids[e.prompt_len..].last(), &Some(&tokenizer.stop_tokens()[0]));
    assert_eq!(tokenizer.decode_answer(&e.ids[e.prompt_len..]).unwrap(), "in");

    let lora = AdapterOptions {
        choice: AdapterChoice::Lora,
        rank: 4,
        lora_modules: vec!["q_proj".into(), "v_proj".into(), "o_proj".into(), "down_proj".into()],
        ..AdapterOptions::default()
    };
    let pool = AdapterOptions { choice: AdapterChoice::SsfPool, pool_size: 4, top_k: 2, ..AdapterOptions::default() };
    for options in [lora, pool] {
        let spec = decoder_pool_spec(model.config(), &options).unwrap();
        let start = AdapterPool::init(&spec, 1).unwrap();
        let before = evaluate_lm(
            &model,
            &AdapterTensors::from_pool(&spec, &start, false, &Device::Cpu).unwrap(),
            &eval,
            &tokenizer,
            8,
            &mut Silent,
        )
        .unwrap();
        let out = train_lm(&model, &spec, &start, &train, &eval, &tokenizer, &config(), &mut Silent).unwrap();
        let m = &out.metrics;
        eprintln!(
            "{:?}: exact match {} → {}, perplexity {:.2} → {:.2}",
            spec.kind,
            before.exact_match,
            m.accuracy,
            before.perplexity,
            m.eval_loss.exp()
        );
        assert!(
            m.accuracy >= 0.9 && m.accuracy > before.exact_match + 0.3,
            "{:?}: {} then {}",
            spec.kind,
            before.exact_match,
            m.accuracy
        );
        assert!(m.eval_loss.exp() < before.perplexity / 2.0, "{:?}", spec.kind);
        assert!(m.macro_f1 >= 0.9);
        // What the run reports is what an evaluation of its pool finds.
        let again = evaluate_lm(
            &model,
            &AdapterTensors::from_pool(&spec, &out.pool, false, &Device::Cpu).unwrap(),
            &eval,
            &tokenizer,
            8,
            &mut Silent,
        )
        .unwrap();
        assert_eq!(again.exact_match, m.accuracy);
        assert!((again.loss - m.eval_loss).abs() < 1e-4);
        out.delta.validate(&spec).unwrap();
        if spec.kind == AdapterKind::SsfPool {
            let slots = out.slot_usage.as_ref().unwrap();
            assert!(slots.used_slots >= 2, "{slots:?}");
            assert_eq!(out.usage.as_ref().unwrap().slots.len(), slots.used_slots);
        }
    }
}

#[test]
fn a_classifier_spec_or_an_empty_set_is_refused() {
    let (_dir, model, tokenizer) = setup();
    let train = examples(&tokenizer, 0..4);
    let bert =
        fedpool_client::spec::pool_spec(&fedpool_client::model::BertConfig::tiny(), &AdapterOptions::default(), 2)
            .unwrap();
    let start = AdapterPool::init(&bert, 0).unwrap();
    let err = train_lm(&model, &bert, &start, &train, &[], &tokenizer, &config(), &mut Silent).unwrap_err().to_string();
    assert!(err.contains("head"), "{err}");
    let spec =
        decoder_pool_spec(model.config(), &AdapterOptions { choice: AdapterChoice::Ssf, ..AdapterOptions::default() })
            .unwrap();
    let start = AdapterPool::init(&spec, 0).unwrap();
    let err = train_lm(&model, &spec, &start, &[], &[], &tokenizer, &config(), &mut Silent).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn gradient_checkpointing_trains_the_same_adapters() {
    let (_dir, model, tokenizer) = setup();
    let train = examples(&tokenizer, 0..16);
    let lora = AdapterOptions { choice: AdapterChoice::Lora, rank: 4, ..AdapterOptions::default() };
    let lora = AdapterOptions { lora_modules: vec!["q_proj".into(), "up_proj".into()], ..lora };
    let pool = AdapterOptions { choice: AdapterChoice::SsfPool, pool_size: 4, top_k: 2, ..AdapterOptions::default() };
    for options in [lora, pool] {
        let spec = decoder_pool_spec(model.config(), &options).unwrap();
        let mut start = AdapterPool::init(&spec, 2).unwrap();
        if spec.kind == AdapterKind::Lora {
            // B ≠ 0, so A's gradient is not zero either.
            for (name, t) in start.tensors.iter_mut() {
                if name.ends_with("lora_B.weight") {
                    for (i, v) in t.data_mut().iter_mut().enumerate() {
                        *v = (i as f32 * 0.37).sin() * 0.05;
                    }
                }
            }
        }
        let run = |checkpoint_layers| {
            let config = TrainConfig { steps: 3, checkpoint_layers, ..config() };
            train_lm(&model, &spec, &start, &train, &[], &tokenizer, &config, &mut Silent).unwrap()
        };
        let (plain, checkpointed) = (run(false), run(true));
        assert!((plain.metrics.train_loss - checkpointed.metrics.train_loss).abs() < 1e-5);
        for (name, a) in &plain.pool.tensors {
            let b = &checkpointed.pool.tensors[name];
            let diff = a.data().iter().zip(b.data()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "{:?} {name}: {diff}", spec.kind);
        }
        let moved = plain.pool.tensors.iter().any(|(n, a)| a.data() != start.tensors[n].data());
        assert!(moved);
    }
}

#[test]
fn the_lm_command_compares_with_the_zero_shot_base_and_writes_the_adapter() {
    let (dir, _, _) = setup();
    let csv = dir.path().join("pairs.csv");
    let mut text = String::from("prompt,response\n");
    for i in 0..40u32 {
        let the = i.is_multiple_of(2);
        text.push_str(&format!(
            "{} {},{}\n",
            if the { "the" } else { "an" },
            i * 7 % 100,
            if the { "in" } else { "on" }
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let out = dir.path().join("run");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fedpool-client"))
        .args(["lm", "--model"])
        .arg(dir.path().join("tiny.gguf"))
        .arg("--data")
        .arg(&csv)
        .args(["--steps", "40", "--lr", "0.03", "--rank", "4", "--max-len", "32", "--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("| zero-shot base |") && stdout.contains("| lora (40 steps) |"), "{stdout}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["report"]["accuracy"].as_f64().unwrap() > metrics["zero_shot"]["exact_match"].as_f64().unwrap());
    let (_, meta) = fedpool_common::checkpoint::read_pool(&out.join("adapter.safetensors")).unwrap();
    assert!(meta.spec.head.is_none());

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_fedpool-client"))
        .args(["lm", "--model", "nowhere.gguf", "--data", "vader", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("nowhere.gguf"), "{stderr}");
}
