//! `fedpool-client train` end to end on a tiny model and a small CSV.

use crate::train_support;

use std::process::Command;

use fedpool_common::checkpoint::read_pool;
use train_support::{separable_texts, tiny_model_dir};

fn client() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedpool-client"))
}

fn write_csv(path: &std::path::Path) {
    let mut csv = String::from("text,label\n");
    for (_, text, label) in separable_texts(60, 2, 4) {
        csv.push_str(&format!("{text},{}\n", ["neg", "pos"][label]));
    }
    std::fs::write(path, csv).unwrap();
}

#[test]
fn train_writes_the_adapter_and_the_metrics() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("small.csv");
    write_csv(&csv);
    for adapter in ["ssf-pool", "lora", "adalora"] {
        let out = work.path().join(adapter);
        let output = client()
            .args(["train", "--model"])
            .arg(model.path())
            .args(["--data"])
            .arg(&csv)
            .args(["--adapter", adapter, "--pool-size", "6", "--rank", "4", "--steps", "6", "--batch-size", "8"])
            .args(["--eval-every", "4", "--device", "cpu", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{adapter}: {stderr}");

        let (pool, meta) = read_pool(&out.join("adapter.safetensors")).unwrap();
        pool.validate(&meta.spec).unwrap();
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
        for field in ["accuracy", "macro_f1", "examples", "wall_seconds", "samples_per_second", "steps"] {
            assert!(metrics[field].is_number(), "{adapter}: metrics.json lacks {field}: {metrics}");
        }
        assert_eq!(metrics["adapter"], adapter);
        let curve: Vec<u64> =
            metrics["curve"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(curve, [4, 6], "{adapter}: a point every 4 steps and the end");
        assert_eq!(metrics["examples"], 48, "60 examples, 20% held out");
        if adapter == "ssf-pool" {
            assert_eq!(metrics["slot_usage"]["counts"].as_array().unwrap().len(), 6);
            assert!(metrics["slot_usage"]["entropy_bits"].is_number());
        } else if adapter == "adalora" {
            assert_eq!(metrics["importance"].as_array().unwrap().len(), 4, "q and v of 2 layers");
        } else {
            assert!(metrics["importance"].as_array().is_none_or(|a| a.is_empty()), "standard LoRA has no triplets");
            assert!(!pool.tensors.keys().any(|n| n.contains("lora_E")), "standard LoRA has no E");
        }
    }
}

#[test]
fn missing_model_folder_is_one_line_naming_the_path() {
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("small.csv");
    write_csv(&csv);
    let missing = work.path().join("no-such-model");
    let output = client()
        .args(["train", "--model"])
        .arg(&missing)
        .arg("--data")
        .arg(&csv)
        .args(["--out"])
        .arg(work.path().join("out"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(line.contains(&missing.display().to_string()), "{stderr}");
}

#[test]
fn unknown_label_and_gpu_without_cuda_are_clear_errors() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("small.csv");
    write_csv(&csv);
    let run = |extra: &[&str]| {
        let output = client()
            .args(["train", "--model"])
            .arg(model.path())
            .arg("--data")
            .arg(&csv)
            .args(extra)
            .arg("--out")
            .arg(work.path().join("out"))
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let err = run(&["--labels", "neg,neutral"]);
    assert!(err.contains("pos") && err.contains("small.csv"), "{err}");
    if !cfg!(feature = "cuda") {
        let err = run(&["--device", "cuda:0"]);
        assert!(err.contains("without CUDA"), "{err}");
    }
}

#[test]
fn help_explains_every_flag() {
    let output = client().args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in ["--model", "--data", "--adapter", "--pool-size", "--top-k", "--rank", "--alpha", "--steps", "--lr"] {
        assert!(help.contains(flag), "{flag} missing from help:\n{help}");
    }
}
