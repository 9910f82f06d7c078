//! `fedpool-client eval` and `fedpool-client spec` as library calls (and once through the binary)
//! on a tiny model and a small CSV.

use crate::train_support;

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use clap::Parser;
use fedpool_client::cli::{run_eval, run_spec, run_train, Cli, Command, EvalArgs, SpecArgs, TrainArgs};
use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterOptions};
use fedpool_client::train::Silent;
use fedpool_common::adapter::{AdapterPool, PoolSpec};
use fedpool_common::checkpoint::{read_pool, write_pool, CheckpointMeta};
use fedpool_common::ids::{BackboneFingerprint, Round, Sha256};
use train_support::{separable_texts, tiny_model_dir};

/// A CSV of `n` separable examples labelled `neg`/`pos` (plus `neutral` rows when `three`).
fn write_csv(path: &Path, n: usize, three: bool) {
    let mut csv = String::from("text,label\n");
    for (_, text, label) in separable_texts(n, 2, 4) {
        csv.push_str(&format!("{text},{}\n", ["neg", "pos"][label]));
    }
    if three {
        csv.push_str("w90 w91 w92,neutral\nw93 w94,neutral\n");
    }
    std::fs::write(path, csv).unwrap();
}

fn parse(args: &[String]) -> Command {
    let argv = std::iter::once("fedpool-client".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}")).command
}

fn strings(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<String> {
    parts.iter().map(|p| p.as_ref().to_string_lossy().into_owned()).collect()
}

fn train_args(args: &[String]) -> TrainArgs {
    match parse(args) {
        Command::Train(a) => a,
        other => panic!("not train: {other:?}"),
    }
}

fn eval_args(args: &[String]) -> EvalArgs {
    match parse(args) {
        Command::Eval(a) => a,
        other => panic!("not eval: {other:?}"),
    }
}

fn spec_args(args: &[String]) -> SpecArgs {
    match parse(args) {
        Command::Spec(a) => a,
        other => panic!("not spec: {other:?}"),
    }
}

/// A 2-class SSF-pool checkpoint for the tiny model, written with `backbone` as its fingerprint.
fn write_tiny_pool(path: &Path, backbone: BackboneFingerprint) -> PoolSpec {
    let options = AdapterOptions { pool_size: 4, top_k: 2, ..AdapterOptions::default() };
    let spec = pool_spec(&BertConfig::tiny(), &options, 2).unwrap();
    let pool = AdapterPool::init(&spec, 3).unwrap();
    write_pool(path, &pool, &CheckpointMeta::now(Round(4), spec.clone(), backbone)).unwrap();
    spec
}

#[test]
fn eval_of_the_trained_adapter_reproduces_train_held_out_metrics() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("small.csv");
    write_csv(&csv, 60, false);
    for adapter in ["ssf-pool", "lora", "linear-probe"] {
        let out = work.path().join(adapter);
        let args = train_args(&strings(&[
            &"train",
            &"--model",
            &model.path(),
            &"--data",
            &csv,
            &"--adapter",
            &adapter,
            &"--pool-size",
            &"6",
            &"--rank",
            &"4",
            &"--steps",
            &"6",
            &"--batch-size",
            &"8",
            &"--test-fraction",
            &"0.25",
            &"--seed",
            &"5",
            &"--device",
            &"cpu",
            &"--out",
            &out,
        ]));
        run_train(&args, &mut Silent).unwrap();
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();

        let args = eval_args(&strings(&[
            &"eval",
            &"--model",
            &model.path(),
            &"--adapter",
            &out.join("adapter.safetensors"),
            &"--data",
            &csv,
            &"--test-fraction",
            &"0.25",
            &"--seed",
            &"5",
            &"--device",
            &"cpu",
        ]));
        let eval = run_eval(&args).unwrap();
        let number = |field: &str| metrics[field].as_f64().unwrap_or_else(|| panic!("{adapter}: no {field}"));
        assert!((eval.metrics.accuracy - number("accuracy")).abs() <= 1e-9, "{adapter}: {eval:?} vs {metrics}");
        assert!((eval.metrics.macro_f1 - number("macro_f1")).abs() <= 1e-9, "{adapter}: {eval:?} vs {metrics}");
        assert!((eval.metrics.loss - number("eval_loss")).abs() <= 1e-9, "{adapter}: {eval:?} vs {metrics}");
        assert_eq!(eval.metrics.examples as f64, number("eval_examples"), "{adapter}");
        assert!((1..60).contains(&eval.metrics.examples), "{adapter}: only the held-out part");
        assert_eq!(eval.kind, adapter);

        let whole = run_eval(&EvalArgs { test_fraction: 0.0, limit: Some(50), ..args }).unwrap();
        assert_eq!(whole.metrics.examples, 50, "{adapter}: --limit caps the whole data set");
    }
}

#[test]
fn adapter_of_another_backbone_is_refused_naming_both_fingerprints() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("small.csv");
    write_csv(&csv, 20, false);
    let other = BackboneFingerprint(Sha256::of(b"another backbone"));
    let ours = BackboneFingerprint::of_model_dir(model.path()).unwrap();
    let foreign = work.path().join("round-000004.safetensors");
    write_tiny_pool(&foreign, other);
    let args = |adapter: &PathBuf| {
        eval_args(&strings(&[
            &"eval",
            &"--model",
            &model.path(),
            &"--adapter",
            adapter,
            &"--data",
            &csv,
            &"--device",
            &"cpu",
        ]))
    };

    let err = run_eval(&args(&foreign)).unwrap_err().to_string();
    for part in [&other.0.to_hex()[..16], &ours.0.to_hex()[..16], "backbone", &foreign.display().to_string()] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }

    let same = work.path().join("same.safetensors");
    write_tiny_pool(&same, ours);
    let eval = run_eval(&args(&same)).unwrap();
    assert_eq!((eval.metrics.examples, eval.round, eval.kind.as_str()), (20, 4, "ssf-pool"));
}

#[test]
fn data_with_more_labels_than_the_head_is_refused() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("three.csv");
    write_csv(&csv, 20, true);
    let adapter = work.path().join("adapter.safetensors");
    write_tiny_pool(&adapter, BackboneFingerprint::of_model_dir(model.path()).unwrap());
    let args = eval_args(&strings(&[
        &"eval",
        &"--model",
        &model.path(),
        &"--adapter",
        &adapter,
        &"--data",
        &csv,
        &"--device",
        &"cpu",
    ]));
    let err = run_eval(&args).unwrap_err().to_string();
    assert!(err.contains("3 labels") && err.contains("2 classes") && err.contains("three.csv"), "{err}");
}

#[test]
fn spec_command_gives_the_spec_train_wrote_into_the_adapter() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("small.csv");
    write_csv(&csv, 30, false);
    let cases: [&[&str]; 3] = [
        &["--adapter", "ssf-pool", "--pool-size", "5", "--top-k", "2"],
        &["--adapter", "lora", "--rank", "3", "--alpha", "6", "--lora-modules", "attention.self.key"],
        &["--adapter", "linear-probe"],
    ];
    for (i, options) in cases.into_iter().enumerate() {
        let out = work.path().join(format!("run-{i}"));
        let mut train = strings(&[&"train", &"--model", &model.path(), &"--data", &csv, &"--steps", &"2"]);
        train.extend(options.iter().map(|s| s.to_string()));
        train.extend(strings(&[&"--device", &"cpu", &"--out", &out]));
        run_train(&train_args(&train), &mut Silent).unwrap();
        let (_, meta) = read_pool(&out.join("adapter.safetensors")).unwrap();

        let spec_file = work.path().join(format!("spec-{i}.json"));
        let mut spec = strings(&[&"spec", &"--model", &model.path(), &"--num-labels", &"2", &"--out", &spec_file]);
        spec.extend(options.iter().map(|s| s.to_string()));
        let returned = run_spec(&spec_args(&spec)).unwrap();
        let written: PoolSpec = serde_json::from_slice(&std::fs::read(&spec_file).unwrap()).unwrap();
        assert_eq!(written.hash(), meta.spec.hash(), "{options:?}");
        assert_eq!(returned, meta.spec, "{options:?}");
    }
}

#[test]
fn eval_table_eval_json_and_spec_json_through_the_binary() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("small.csv");
    write_csv(&csv, 20, false);
    let adapter = work.path().join("adapter.safetensors");
    let spec = write_tiny_pool(&adapter, BackboneFingerprint::of_model_dir(model.path()).unwrap());
    let client = || Process::new(env!("CARGO_BIN_EXE_fedpool-client"));

    let output = client()
        .args(strings(&[&"eval", &"--model", &model.path(), &"--adapter", &adapter, &"--data", &csv]))
        .args(["--device", "cpu", "--limit", "7", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for field in ["accuracy", "macro_f1", "loss", "wall_seconds"] {
        assert!(json[field].is_number(), "no {field}: {json}");
    }
    assert_eq!(json["examples"], 7);
    assert_eq!(json["adapter"], adapter.display().to_string());
    assert_eq!(json["data"], csv.display().to_string());

    let output = client()
        .args(strings(&[&"eval", &"--model", &model.path(), &"--adapter", &adapter, &"--data", &csv]))
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    for row in ["accuracy", "macro-F1", "loss", "examples  20", "seconds"] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }

    let output = client()
        .args(strings(&[&"spec", &"--model", &model.path(), &"--num-labels", &"2"]))
        .args(["--pool-size", "4", "--top-k", "2"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: PoolSpec = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed.hash(), spec.hash());
}
