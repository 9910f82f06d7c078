//! `fedpool-client eval` and `fedpool-client spec` through the binary, on a tiny model and a small
//! CSV: `train` writes `metrics.json`, `eval --json` prints its metrics as one JSON object, `spec
//! --out FILE` writes the spec, and a refused command says why on stderr and exits non-zero.

use crate::train_support;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterOptions};
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

/// Words and paths as one argument list.
fn argv(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

/// `args` and then `more`.
fn with(args: &[OsString], more: &[&str]) -> Vec<OsString> {
    args.iter().cloned().chain(more.iter().map(OsString::from)).collect()
}

/// Runs `fedpool-client args`, which must succeed; its stdout.
fn succeed(args: &[OsString]) -> Vec<u8> {
    let output = Process::new(env!("CARGO_BIN_EXE_fedpool-client")).args(args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// Runs `fedpool-client args`, which must fail; its stderr.
fn fail(args: &[OsString]) -> String {
    let output = Process::new(env!("CARGO_BIN_EXE_fedpool-client")).args(args).output().unwrap();
    assert!(!output.status.success(), "{args:?} succeeded: {}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `fedpool-client eval ... --json`; the object it prints.
fn eval_json(args: &[OsString]) -> serde_json::Value {
    let stdout = succeed(&with(args, &["--json"]));
    serde_json::from_slice(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&stdout)))
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
        succeed(&argv(&[
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
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();

        let eval = argv(&[
            &"eval",
            &"--model",
            &model.path(),
            &"--adapter",
            &out.join("adapter.safetensors"),
            &"--data",
            &csv,
            &"--seed",
            &"5",
            &"--device",
            &"cpu",
        ]);
        let held_out = eval_json(&with(&eval, &["--test-fraction", "0.25"]));
        let number = |json: &serde_json::Value, field: &str| {
            json[field].as_f64().unwrap_or_else(|| panic!("{adapter}: no {field} in {json}"))
        };
        let pairs = [("accuracy", "accuracy"), ("macro_f1", "macro_f1"), ("loss", "eval_loss")];
        for (eval_field, train_field) in pairs {
            let (got, want) = (number(&held_out, eval_field), number(&metrics, train_field));
            assert!((got - want).abs() <= 1e-9, "{adapter}: {eval_field} {got} vs {want}: {held_out} vs {metrics}");
        }
        assert_eq!(number(&held_out, "examples"), number(&metrics, "eval_examples"), "{adapter}");
        assert!((1.0..60.0).contains(&number(&held_out, "examples")), "{adapter}: only the held-out part");
        assert_eq!(held_out["kind"], adapter);

        let whole = eval_json(&with(&eval, &["--test-fraction", "0", "--limit", "50"]));
        assert_eq!(whole["examples"], 50, "{adapter}: --limit caps the whole data set");
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
        argv(&[&"eval", &"--model", &model.path(), &"--adapter", adapter, &"--data", &csv, &"--device", &"cpu"])
    };

    let err = fail(&args(&foreign));
    for part in [&other.0.to_hex()[..16], &ours.0.to_hex()[..16], "backbone", &foreign.display().to_string()] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }

    let same = work.path().join("same.safetensors");
    write_tiny_pool(&same, ours);
    let eval = eval_json(&args(&same));
    let got = (eval["examples"].as_u64(), eval["round"].as_u64(), eval["kind"].as_str());
    assert_eq!(got, (Some(20), Some(4), Some("ssf-pool")));
}

#[test]
fn data_with_more_labels_than_the_head_is_refused() {
    let model = tiny_model_dir(1);
    let work = tempfile::tempdir().unwrap();
    let csv = work.path().join("three.csv");
    write_csv(&csv, 20, true);
    let adapter = work.path().join("adapter.safetensors");
    write_tiny_pool(&adapter, BackboneFingerprint::of_model_dir(model.path()).unwrap());
    let err = fail(&argv(&[
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
        let train = argv(&[
            &"train",
            &"--model",
            &model.path(),
            &"--data",
            &csv,
            &"--steps",
            &"2",
            &"--device",
            &"cpu",
            &"--out",
            &out,
        ]);
        succeed(&with(&train, options));
        let (_, meta) = read_pool(&out.join("adapter.safetensors")).unwrap();

        let spec_file = work.path().join(format!("spec-{i}.json"));
        let spec = argv(&[&"spec", &"--model", &model.path(), &"--num-labels", &"2", &"--out", &spec_file]);
        succeed(&with(&spec, options));
        let written: PoolSpec = serde_json::from_slice(&std::fs::read(&spec_file).unwrap()).unwrap();
        assert_eq!(written.hash(), meta.spec.hash(), "{options:?}");
        assert_eq!(written, meta.spec, "{options:?}");
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
    let eval =
        argv(&[&"eval", &"--model", &model.path(), &"--adapter", &adapter, &"--data", &csv, &"--device", &"cpu"]);

    let json = eval_json(&with(&eval, &["--limit", "7"]));
    for field in ["accuracy", "macro_f1", "loss", "wall_seconds"] {
        assert!(json[field].is_number(), "no {field}: {json}");
    }
    assert_eq!(json["examples"], 7);
    assert_eq!(json["adapter"], adapter.display().to_string());
    assert_eq!(json["data"], csv.display().to_string());

    let table = String::from_utf8(succeed(&eval)).unwrap();
    for row in ["accuracy", "macro-F1", "loss", "examples  20", "seconds"] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }

    let stdout = succeed(&argv(&[
        &"spec",
        &"--model",
        &model.path(),
        &"--num-labels",
        &"2",
        &"--pool-size",
        &"4",
        &"--top-k",
        &"2",
    ]));
    let printed: PoolSpec = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(printed.hash(), spec.hash());
}
