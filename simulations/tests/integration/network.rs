//! The simulator's network and device model: sampling, traces, round times, availability,
//! determinism and config validation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpool_sim::network::{BandwidthSpec, ClientOutcome, ComputeSpec, NetworkConfig, NetworkError, NetworkModel};
use serde::Deserialize;

fn model(config: &NetworkConfig, clients: usize) -> NetworkModel {
    NetworkModel::new(config, clients, Path::new(".")).expect("valid config")
}

/// The `q`-quantile of `values` (nearest rank on the sorted values).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn assert_median_and_spread(values: Vec<f64>, median: f64, p90_over_p10: f64) {
    let values = sorted(values);
    let got_median = quantile(&values, 0.5);
    let got_ratio = quantile(&values, 0.9) / quantile(&values, 0.1);
    assert!((got_median / median - 1.0).abs() < 0.05, "median {got_median}, configured {median}");
    assert!((got_ratio / p90_over_p10 - 1.0).abs() < 0.10, "p90/p10 {got_ratio}, configured {p90_over_p10}");
}

#[test]
fn lognormal_draws_have_the_configured_median_and_spread() {
    let config = NetworkConfig {
        upload: BandwidthSpec::LogNormal { median_bytes_per_sec: 1e6, p90_over_p10: 10.0 },
        download: BandwidthSpec::LogNormal { median_bytes_per_sec: 5e7, p90_over_p10: 3.0 },
        compute: ComputeSpec::LogNormal { median: 1.5, p90_over_p10: 4.0 },
        seed: 11,
        ..NetworkConfig::default()
    };
    let net = model(&config, 2000);
    assert_median_and_spread(net.links().iter().map(|l| l.upload_bps).collect(), 1e6, 10.0);
    assert_median_and_spread(net.links().iter().map(|l| l.download_bps).collect(), 5e7, 3.0);
    assert_median_and_spread(net.links().iter().map(|l| l.compute_speed).collect(), 1.5, 4.0);
}

#[test]
fn lognormal_spread_of_one_gives_everyone_the_median() {
    let config = NetworkConfig {
        upload: BandwidthSpec::LogNormal { median_bytes_per_sec: 3e5, p90_over_p10: 1.0 },
        ..NetworkConfig::default()
    };
    let net = model(&config, 50);
    assert!(net.links().iter().all(|l| l.upload_bps == 3e5));
}

#[test]
fn fixed_specs_give_exactly_the_configured_values() {
    let config = NetworkConfig {
        upload: BandwidthSpec::Fixed { bytes_per_sec: 123_456.5 },
        download: BandwidthSpec::Fixed { bytes_per_sec: 7.25e6 },
        latency_ms: 35.0,
        compute: ComputeSpec::Fixed { speed: 0.75 },
        ..NetworkConfig::default()
    };
    let net = model(&config, 40);
    assert_eq!(net.clients(), 40);
    for link in net.links() {
        assert_eq!(link.upload_bps, 123_456.5);
        assert_eq!(link.download_bps, 7.25e6);
        assert_eq!(link.latency, Duration::from_millis(35));
        assert_eq!(link.compute_speed, 0.75);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write trace");
    path
}

fn trace_config(file: &str, column: &str) -> NetworkConfig {
    NetworkConfig {
        upload: BandwidthSpec::Trace { file: file.into(), column: column.into() },
        ..NetworkConfig::default()
    }
}

#[test]
fn trace_is_honoured_exactly_and_wraps_around() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("traces")).expect("mkdir");
    write(dir.path(), "traces/bw.csv", "client,up,down\na,1000.5,9e6\nb, 250000 ,8e6\n\"c, quoted\",3e6,7e6\n");
    let config = NetworkConfig {
        upload: BandwidthSpec::Trace { file: "traces/bw.csv".into(), column: "up".into() },
        download: BandwidthSpec::Trace { file: "traces/bw.csv".into(), column: "down".into() },
        ..NetworkConfig::default()
    };
    let net = NetworkModel::new(&config, 5, dir.path()).expect("valid trace");
    let up: Vec<f64> = net.links().iter().map(|l| l.upload_bps).collect();
    let down: Vec<f64> = net.links().iter().map(|l| l.download_bps).collect();
    assert_eq!(up, [1000.5, 250000.0, 3e6, 1000.5, 250000.0]);
    assert_eq!(down, [9e6, 8e6, 7e6, 9e6, 8e6]);
}

#[test]
fn trace_path_is_relative_to_base_dir_and_absolute_paths_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "bw.csv", "up\n42\n");
    let absolute = trace_config(path.to_str().expect("utf-8 temp path"), "up");
    let net = NetworkModel::new(&absolute, 1, Path::new("/nonexistent")).expect("absolute path");
    assert_eq!(net.link(0).upload_bps, 42.0);
    let err = NetworkModel::new(&trace_config("bw.csv", "up"), 1, Path::new("/nonexistent")).unwrap_err();
    assert!(matches!(err, NetworkError::TraceIo { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/bw.csv"), "{err}");
    assert!(err.to_string().contains("network.upload"), "{err}");
}

fn trace_error(text: &str, column: &str) -> (NetworkError, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "trace.csv", text);
    let err = NetworkModel::new(&trace_config("trace.csv", column), 3, dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("trace.csv"), "does not name the file: {message}");
    assert!(message.contains("network.upload"), "does not name the field: {message}");
    (err, message)
}

#[test]
fn trace_without_the_column_is_an_error_naming_file_and_column() {
    let (err, message) = trace_error("client,down\na,1e6\n", "up");
    assert!(matches!(err, NetworkError::TraceMissingColumn { .. }), "{err:?}");
    assert!(message.contains("\"up\""), "{message}");
    assert!(message.contains("\"client\", \"down\""), "lists the columns there are: {message}");
}

#[test]
fn trace_with_a_non_number_is_an_error_naming_file_line_and_column() {
    let (err, message) = trace_error("client,up\na,1e6\nb,fast\nc,2e6\n", "up");
    match err {
        NetworkError::TraceBadValue { line, ref column, ref value, .. } => {
            assert_eq!((line, column.as_str(), value.as_str()), (3, "up", "fast"));
        }
        other => panic!("expected TraceBadValue, got {other:?}"),
    }
    assert!(message.contains("line 3"), "{message}");
    assert!(message.contains("column \"up\""), "{message}");
    assert!(message.contains("\"fast\""), "{message}");
}

#[test]
fn trace_with_a_short_row_or_a_non_positive_value_is_an_error_naming_the_line() {
    let (err, message) = trace_error("client,up\na,1e6\nb\n", "up");
    assert!(matches!(err, NetworkError::TraceBadValue { line: 3, .. }), "{err:?}");
    assert!(message.contains("too short"), "{message}");
    for bad in ["0", "-5", "inf", "NaN"] {
        let (err, message) = trace_error(&format!("up\n1\n2\n{bad}\n"), "up");
        assert!(matches!(err, NetworkError::TraceBadValue { line: 4, .. }), "{bad}: {err:?}");
        assert!(message.contains("line 4"), "{message}");
    }
}

#[test]
fn empty_trace_is_an_error_naming_the_file() {
    let (err, message) = trace_error("", "up");
    assert!(matches!(err, NetworkError::TraceEmpty { .. }), "{err:?}");
    assert!(message.contains("no header"), "{message}");
    let (err, message) = trace_error("client,up\n", "up");
    assert!(matches!(err, NetworkError::TraceEmpty { .. }), "{err:?}");
    assert!(message.contains("no data rows"), "{message}");
}

#[test]
fn round_time_equals_the_formula_on_hand_computed_numbers() {
    let config = NetworkConfig {
        upload: BandwidthSpec::Fixed { bytes_per_sec: 1e6 },
        download: BandwidthSpec::Fixed { bytes_per_sec: 4e6 },
        latency_ms: 62.5,
        compute: ComputeSpec::Fixed { speed: 2.0 },
        ..NetworkConfig::default()
    };
    let net = model(&config, 3);
    // Download 2 MB at 4 MB/s = 0.5 s; 3 s of work at speed 2 = 1.5 s; upload 250 kB at
    // 1 MB/s = 0.25 s; latency 62.5 ms twice: 2.375 s in all.
    assert_eq!(net.download_time(1, 2_000_000), Duration::from_micros(562_500));
    assert_eq!(net.compute_time(1, Duration::from_secs(3)), Duration::from_millis(1500));
    assert_eq!(net.upload_time(1, 250_000), Duration::from_micros(312_500));
    assert_eq!(net.round_time(1, 2_000_000, Duration::from_secs(3), 250_000), Duration::from_micros(2_375_000));
    // Nothing to move and nothing to do still costs the two latencies.
    assert_eq!(net.round_time(0, 0, Duration::ZERO, 0), Duration::from_millis(125));
}

#[test]
fn round_time_uses_each_clients_own_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "bw.csv", "up\n1000\n4000\n");
    let config = NetworkConfig { latency_ms: 0.0, ..trace_config("bw.csv", "up") };
    let net = NetworkModel::new(&config, 2, dir.path()).expect("valid");
    assert_eq!(net.round_time(0, 0, Duration::ZERO, 2000), Duration::from_secs(2));
    assert_eq!(net.round_time(1, 0, Duration::ZERO, 2000), Duration::from_millis(500));
}

fn varied(seed: u64) -> NetworkConfig {
    NetworkConfig {
        upload: BandwidthSpec::LogNormal { median_bytes_per_sec: 1e6, p90_over_p10: 10.0 },
        download: BandwidthSpec::LogNormal { median_bytes_per_sec: 1e7, p90_over_p10: 5.0 },
        compute: ComputeSpec::LogNormal { median: 1.0, p90_over_p10: 3.0 },
        availability: 0.5,
        dropout: 0.2,
        seed,
        ..NetworkConfig::default()
    }
}

fn pattern(net: &NetworkModel, rounds: u64, clients: usize) -> Vec<(bool, bool)> {
    (0..rounds).flat_map(|r| (0..clients).map(move |c| (net.available(r, c), net.drops_out(r, c)))).collect()
}

#[test]
fn same_seed_gives_identical_links_and_availability_another_seed_differs() {
    let a = model(&varied(5), 100);
    let b = model(&varied(5), 100);
    let c = model(&varied(6), 100);
    assert_eq!(a.links(), b.links());
    assert_eq!(pattern(&a, 20, 100), pattern(&b, 20, 100));
    for (x, y) in a.links().iter().zip(c.links()) {
        assert_ne!(x.upload_bps, y.upload_bps);
        assert_ne!(x.download_bps, y.download_bps);
        assert_ne!(x.compute_speed, y.compute_speed);
    }
    let (pa, pc) = (pattern(&a, 20, 100), pattern(&c, 20, 100));
    let same_available = pa.iter().zip(&pc).filter(|(x, y)| x.0 == y.0).count();
    let same_dropout = pa.iter().zip(&pc).filter(|(x, y)| x.1 == y.1).count();
    // Independent fair coins agree about half the time; identical patterns would agree on 2,000.
    assert!((800..1200).contains(&same_available), "{same_available} of 2000 agree");
    assert!(same_dropout < 1900, "{same_dropout} of 2000 agree");
}

#[test]
fn answers_do_not_depend_on_call_order_or_on_the_number_of_clients() {
    let net = model(&varied(3), 50);
    let forward = pattern(&net, 10, 50);
    let net_ref = &net;
    let mut backward: Vec<(bool, bool)> = (0..10)
        .rev()
        .flat_map(|r| (0..50).rev().map(move |c| (net_ref.available(r, c), net_ref.drops_out(r, c))))
        .collect();
    backward.reverse();
    assert_eq!(forward, backward);
    let bigger = model(&varied(3), 80);
    assert_eq!(&bigger.links()[..50], net.links());
    // Changing the compute spec leaves the bandwidths alone.
    let other_compute = model(&NetworkConfig { compute: ComputeSpec::Fixed { speed: 1.0 }, ..varied(3) }, 50);
    for (x, y) in net.links().iter().zip(other_compute.links()) {
        assert_eq!((x.upload_bps, x.download_bps), (y.upload_bps, y.download_bps));
    }
}

#[test]
fn availability_of_0_7_holds_over_10000_round_client_pairs() {
    let config = NetworkConfig { availability: 0.7, dropout: 0.1, seed: 21, ..NetworkConfig::default() };
    let net = model(&config, 100);
    let pairs = pattern(&net, 100, 100);
    assert_eq!(pairs.len(), 10_000);
    let available = pairs.iter().filter(|p| p.0).count() as f64 / 10_000.0;
    let dropped = pairs.iter().filter(|p| p.1).count() as f64 / 10_000.0;
    assert!((available - 0.7).abs() <= 0.02, "available {available}");
    assert!((dropped - 0.1).abs() <= 0.01, "dropped {dropped}");
    // Independent across rounds: available in round r and r+1 about 0.7² of the time.
    let both = (0..99u64)
        .flat_map(|r| (0..100).map(move |c| (r, c)))
        .filter(|&(r, c)| net.available(r, c) && net.available(r + 1, c));
    let both = both.count() as f64 / 9_900.0;
    assert!((both - 0.49).abs() <= 0.02, "available twice in a row {both}");
    // Independent across clients: client c and c+1 in the same round about 0.7² of the time.
    let neighbours = (0..100u64)
        .flat_map(|r| (0..99).map(move |c| (r, c)))
        .filter(|&(r, c)| net.available(r, c) && net.available(r, c + 1));
    let neighbours = neighbours.count() as f64 / 9_900.0;
    assert!((neighbours - 0.49).abs() <= 0.02, "neighbours both available {neighbours}");
}

#[test]
fn availability_one_and_dropout_zero_are_exact() {
    let net = model(&NetworkConfig::default(), 100);
    assert!(pattern(&net, 50, 100).iter().all(|&p| p == (true, false)));
    let never = model(&NetworkConfig { availability: 0.0, dropout: 1.0, ..NetworkConfig::default() }, 100);
    assert!(pattern(&never, 50, 100).iter().all(|&p| p == (false, true)));
}

#[test]
fn outcome_separates_unavailable_dropped_on_time_and_stragglers() {
    let base = NetworkConfig {
        upload: BandwidthSpec::Fixed { bytes_per_sec: 1000.0 },
        latency_ms: 0.0,
        ..NetworkConfig::default()
    };
    let net = model(&base, 1);
    let deadline = Duration::from_secs(2);
    assert_eq!(
        net.outcome(0, 0, 0, Duration::ZERO, 2000, deadline),
        ClientOutcome::OnTime { time: Duration::from_secs(2) }
    );
    assert_eq!(
        net.outcome(0, 0, 0, Duration::from_millis(1), 2000, deadline),
        ClientOutcome::Straggler { time: Duration::from_millis(2001) }
    );
    let away = model(&NetworkConfig { availability: 0.0, ..base.clone() }, 1);
    assert_eq!(away.outcome(0, 0, 0, Duration::ZERO, 0, deadline), ClientOutcome::Unavailable);
    let gone = model(&NetworkConfig { dropout: 1.0, ..base }, 1);
    assert_eq!(gone.outcome(0, 0, 0, Duration::ZERO, 0, deadline), ClientOutcome::DroppedOut);
}

#[test]
fn invalid_configs_are_refused_naming_the_field() {
    let cases: Vec<(NetworkConfig, &str)> = vec![
        (
            NetworkConfig { upload: BandwidthSpec::Fixed { bytes_per_sec: 0.0 }, ..NetworkConfig::default() },
            "network.upload.bytes_per_sec",
        ),
        (
            NetworkConfig { download: BandwidthSpec::Fixed { bytes_per_sec: f64::NAN }, ..NetworkConfig::default() },
            "network.download.bytes_per_sec",
        ),
        (
            NetworkConfig {
                upload: BandwidthSpec::LogNormal { median_bytes_per_sec: -1e6, p90_over_p10: 10.0 },
                ..NetworkConfig::default()
            },
            "network.upload.median_bytes_per_sec",
        ),
        (
            NetworkConfig {
                download: BandwidthSpec::LogNormal { median_bytes_per_sec: 1e6, p90_over_p10: 0.5 },
                ..NetworkConfig::default()
            },
            "network.download.p90_over_p10",
        ),
        (
            NetworkConfig {
                upload: BandwidthSpec::LogNormal { median_bytes_per_sec: 1e6, p90_over_p10: f64::INFINITY },
                ..NetworkConfig::default()
            },
            "network.upload.p90_over_p10",
        ),
        (NetworkConfig { latency_ms: -1.0, ..NetworkConfig::default() }, "network.latency_ms"),
        (NetworkConfig { latency_ms: f64::INFINITY, ..NetworkConfig::default() }, "network.latency_ms"),
        (NetworkConfig { availability: 1.5, ..NetworkConfig::default() }, "network.availability"),
        (NetworkConfig { availability: f64::NAN, ..NetworkConfig::default() }, "network.availability"),
        (NetworkConfig { dropout: -0.1, ..NetworkConfig::default() }, "network.dropout"),
        (
            NetworkConfig { compute: ComputeSpec::Fixed { speed: f64::INFINITY }, ..NetworkConfig::default() },
            "network.compute.speed",
        ),
        (
            NetworkConfig {
                compute: ComputeSpec::LogNormal { median: 0.0, p90_over_p10: 2.0 },
                ..NetworkConfig::default()
            },
            "network.compute.median",
        ),
        (
            NetworkConfig {
                compute: ComputeSpec::LogNormal { median: 1.0, p90_over_p10: 0.9 },
                ..NetworkConfig::default()
            },
            "network.compute.p90_over_p10",
        ),
    ];
    for (config, field) in cases {
        let err = NetworkModel::new(&config, 4, Path::new(".")).unwrap_err();
        match &err {
            NetworkError::InvalidField { field: named, .. } => assert_eq!(named, field),
            other => panic!("{field}: expected InvalidField, got {other:?}"),
        }
        assert!(err.to_string().starts_with(&format!("{field} = ")), "{err}");
        assert!(config.validate().is_err(), "{field}: validate() agrees with new()");
    }
    assert!(NetworkConfig::default().validate().is_ok());
}

#[test]
fn a_spread_too_wide_to_draw_is_an_error_not_an_infinite_bandwidth() {
    let config = NetworkConfig {
        upload: BandwidthSpec::LogNormal { median_bytes_per_sec: 1e6, p90_over_p10: 1e300 },
        ..NetworkConfig::default()
    };
    let err = NetworkModel::new(&config, 2000, Path::new(".")).unwrap_err();
    assert!(matches!(err, NetworkError::DrawOutOfRange { .. }), "{err:?}");
    assert!(err.to_string().starts_with("network.upload: client "), "{err}");
}

#[derive(Deserialize)]
struct SimConfig {
    network: NetworkConfig,
}

#[test]
fn toml_network_table_parses_with_defaults() {
    let text = "[network]\nupload = { kind = \"lognormal\", median_bytes_per_sec = 1e6, p90_over_p10 = 10.0 }\n\
                download = { kind = \"fixed\", bytes_per_sec = 1e7 }\n";
    let config = toml::from_str::<SimConfig>(text).expect("parses").network;
    assert_eq!(config.upload, BandwidthSpec::LogNormal { median_bytes_per_sec: 1e6, p90_over_p10: 10.0 });
    assert_eq!(config.download, BandwidthSpec::Fixed { bytes_per_sec: 1e7 });
    assert_eq!(config.latency_ms, 20.0);
    assert_eq!(config.availability, 1.0);
    assert_eq!(config.dropout, 0.0);
    assert_eq!(config.compute, ComputeSpec::Fixed { speed: 1.0 });
    assert_eq!(config.seed, 0);
    assert!(NetworkModel::new(&config, 10, Path::new(".")).is_ok());
}

#[test]
fn toml_with_every_field_and_a_trace_parses() {
    let text = r#"
        [network]
        upload = { kind = "trace", file = "traces/bw.csv", column = "up_bps" }
        download = { kind = "lognormal", median_bytes_per_sec = 2.5e7, p90_over_p10 = 4 }
        latency_ms = 80
        availability = 0.8
        dropout = 0.05
        compute = { kind = "lognormal", median = 1.0, p90_over_p10 = 3.0 }
        seed = 42
    "#;
    let config = toml::from_str::<SimConfig>(text).expect("parses").network;
    assert_eq!(config.upload, BandwidthSpec::Trace { file: "traces/bw.csv".into(), column: "up_bps".into() });
    assert_eq!(config.download, BandwidthSpec::LogNormal { median_bytes_per_sec: 2.5e7, p90_over_p10: 4.0 });
    assert_eq!((config.latency_ms, config.availability, config.dropout, config.seed), (80.0, 0.8, 0.05, 42));
    assert_eq!(config.compute, ComputeSpec::LogNormal { median: 1.0, p90_over_p10: 3.0 });
}

#[test]
fn toml_with_unknown_or_missing_fields_is_refused_naming_them() {
    const DOWNLOAD: &str = "download = { kind = \"fixed\", bytes_per_sec = 1 }";
    let bad = [
        // A typo at the top level.
        (
            r#"upload = { kind = "fixed", bytes_per_sec = 1 }"#.to_owned() + "\n" + DOWNLOAD + "\nlatency = 5",
            "`latency`",
        ),
        // A typo inside a spec.
        (r#"upload = { kind = "fixed", bytes_per_second = 1 }"#.to_owned() + "\n" + DOWNLOAD, "`bytes_per_second`"),
        // A field of another kind.
        (
            r#"upload = { kind = "fixed", bytes_per_sec = 1, p90_over_p10 = 2 }"#.to_owned() + "\n" + DOWNLOAD,
            "`p90_over_p10`",
        ),
        // An unknown kind.
        (r#"upload = { kind = "gaussian", bytes_per_sec = 1 }"#.to_owned() + "\n" + DOWNLOAD, "`gaussian`"),
        // No download.
        (r#"upload = { kind = "fixed", bytes_per_sec = 1 }"#.to_owned(), "`download`"),
    ];
    for (body, named) in bad {
        let err = match toml::from_str::<SimConfig>(&format!("[network]\n{body}")) {
            Ok(_) => panic!("accepted: {body}"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains(named), "error does not name {named:?}: {err}");
    }
}
