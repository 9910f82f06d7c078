//! The `fedpool-sim` binary: one run, a comparison, a run with a global test set, the default
//! config, and a bad experiment.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fedpool-sim");

fn write_experiment(dir: &Path, name: &str, adapter: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        r#"name = "{name}"
model = "model"
data = "data.csv"
clients = 3
[federation]
rounds = 2
local_steps = 2
[adapter]
{adapter}
[train]
batch_size = 4
max_len = 32
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn fixture(dir: &Path) {
    fedpool_client::testkit::write_tiny_model(&dir.join("model"), 5).unwrap();
    let mut csv = String::from("text,label\n");
    for (_, text, label) in fedpool_client::testkit::separable_texts(90, 2, 9) {
        csv.push_str(&format!("{text},{label}\n"));
    }
    std::fs::write(dir.join("data.csv"), csv).unwrap();
}

#[test]
fn run_and_compare_write_tables_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let pool = write_experiment(dir.path(), "pool", "kind = \"ssf-pool\"\npool_size = 4\ntop_k = 2");
    let lora = write_experiment(dir.path(), "lora", "kind = \"lora\"\nrank = 2");

    let out = dir.path().join("one");
    let status = Command::new(BIN).args(["run", "--config"]).arg(&pool).arg("--out").arg(&out).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("| pool | 2 |"), "{stdout}");
    assert!(!stdout.contains("global acc"), "no global test set, no column: {stdout}");
    let rows = fedpool_sim::report::read_rounds_csv(&out.join("rounds.csv")).unwrap();
    assert_eq!(rows.len(), 2);

    let out = dir.path().join("both");
    let status = Command::new(BIN)
        .args(["run", "--compare"])
        .arg(&pool)
        .arg(&lora)
        .arg("--out")
        .arg(&out)
        .arg("--sequential")
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let table = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(table.contains("| pool |") && table.contains("| lora |"), "{table}");
    for file in [
        "pool/rounds.csv",
        "lora/summary.json",
        "accuracy_vs_round.png",
        "accuracy_vs_bytes.svg",
        "sim_time_per_round.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let resolved = std::fs::read_to_string(out.join("lora/config.toml")).unwrap();
    assert!(resolved.contains("mode = \"sequential\""), "{resolved}");

    // Finished runs drawn again from their rounds.csv, legends named from summary.json.
    let replot = dir.path().join("replot");
    let status = Command::new(BIN)
        .args(["plot", "--out"])
        .arg(&replot)
        .arg(out.join("pool"))
        .arg(out.join("lora"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let svg = std::fs::read_to_string(replot.join("accuracy_vs_sim_time.svg")).unwrap();
    assert!(svg.contains("pool") && svg.contains("lora"));
}

#[test]
fn a_run_with_a_global_test_set_tables_its_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let path = write_experiment(dir.path(), "global", "kind = \"ssf-pool\"\npool_size = 4\ntop_k = 2");
    // 3 clients keep 20 of their 30 examples: 30 are held by no client.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("max_examples_per_client = 20\nglobal_test = \"unused:25\"\n{text}")).unwrap();
    let out = dir.path().join("run");
    let status = Command::new(BIN).args(["run", "--config"]).arg(&path).arg("--out").arg(&out).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let stdout = String::from_utf8_lossy(&status.stdout);
    let mut lines = stdout.lines().filter(|l| l.starts_with('|'));
    assert!(lines.next().is_some_and(|h| h.contains("| macro-F1 | global acc | MB up |")), "{stdout}");
    let row = lines.nth(1).unwrap_or_default();
    let cell = row.split('|').nth(5).unwrap_or_default().trim();
    assert!(cell.parse::<f64>().is_ok_and(|v| (0.0..=100.0).contains(&v)), "{stdout}");
    let rows = fedpool_sim::report::read_rounds_csv(&out.join("rounds.csv")).unwrap();
    assert!(rows.iter().all(|r| r.global_accuracy.is_some()), "{rows:?}");
}

#[test]
fn the_default_config_parses_and_a_bad_experiment_is_named() {
    let output = Command::new(BIN).arg("default-config").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    fedpool_sim::experiment::Experiment::parse(&text, Path::new("."), "printed").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "clients = 4\n[federation]\nquorum = 7\n").unwrap();
    let output = Command::new(BIN).args(["run", "--config"]).arg(&bad).arg("--out").arg(dir.path()).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("bad.toml") && err.contains("federation.quorum"), "{err}");
}

#[test]
fn device_check_on_the_cpu_prints_every_table() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let base = write_experiment(dir.path(), "base", "kind = \"ssf-pool\"");
    let table = dir.path().join("device.md");
    let out = Command::new(BIN)
        .args(["device-check", "--device", "cpu", "--clients", "3", "--steps", "1", "--step-batch", "4"])
        .args(["--rows-per-pass", "8", "--config"])
        .arg(&base)
        .arg("--out")
        .arg(&table)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let kernels = stdout.lines().filter(|l| l.ends_with("| ok |")).count();
    assert_eq!(kernels, 15, "{stdout}");
    for adapter in ["lora r=8", "ssf", "ssf-pool"] {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("| {adapter} | "))), "{adapter}: {stdout}");
    }
    for adapter in ["lora r=8", "ssf-pool"] {
        assert!(stdout.contains(&format!("| {adapter} | 3 | ")), "{adapter} lockstep: {stdout}");
    }
    assert_eq!(std::fs::read_to_string(&table).unwrap().trim(), stdout.trim());

    let bad = Command::new(BIN).args(["device-check", "--device", "tpu:0", "--config"]).arg(&base).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tpu:0"), "{}", String::from_utf8_lossy(&bad.stderr));
}
