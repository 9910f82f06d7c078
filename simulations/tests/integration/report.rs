//! The simulator's outputs: `rounds.csv` has docs/design.md's exact header and then the global test
//! set's columns, reads back exactly what was written (an old 8-column file too) and is
//! byte-identical for the same rows; `Summary::from_rows` takes the last round's
//! metrics and sums the rest; `plot_runs` writes three charts as PNG and SVG with every run in the
//! legend, and refuses an empty run list.

use std::path::PathBuf;

use fedpool_sim::report::{
    plot_runs, read_rounds_csv, write_rounds_csv, write_summary, ReportError, RoundRow, Summary, ROUNDS_CSV_HEADER,
};

/// Rows whose numbers (with `offset` 0) are binary fractions exact at the written precision (6
/// decimals for metrics, 3 for seconds), so that reading them back must give the same `f64`s.
fn rows(n: u64, offset: f64) -> Vec<RoundRow> {
    (1..=n)
        .map(|round| RoundRow {
            round,
            accuracy: if round == 2 { None } else { Some(0.5 + offset + 0.0625 * round as f64) },
            macro_f1: if round == 2 { None } else { Some(0.375 + offset + 0.03125 * round as f64) },
            loss: if round == 2 { None } else { Some(1.25 - 0.125 * round as f64) },
            bytes_up: 1_000_000 * round + 17,
            bytes_down: 2_000_000 * round,
            sim_seconds: 12.5 * round as f64 + 0.125 * (round * round) as f64,
            wall_seconds: 0.75 + 0.125 * round as f64,
            global_accuracy: (round % 2 == 1).then_some(0.4375 + 0.015625 * round as f64),
            global_macro_f1: (round % 2 == 1).then_some(0.40625 + 0.015625 * round as f64),
            global_loss: (round % 2 == 1).then_some(2.5 - 0.25 * round as f64),
        })
        .collect()
}

#[test]
fn rounds_csv_header_is_exactly_designs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    write_rounds_csv(&path, &rows(3, 0.0)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.lines().next(),
        Some(
            "round,accuracy,macro_f1,loss,bytes_up,bytes_down,sim_seconds,wall_seconds,\
             global_accuracy,global_macro_f1,global_loss"
        )
    );
    assert_eq!(ROUNDS_CSV_HEADER.join(","), text.lines().next().unwrap());
    assert_eq!(text.lines().count(), 4, "header + one line per row:\n{text}");
}

#[test]
fn rounds_csv_written_then_read_gives_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    let written = rows(7, 0.0);
    write_rounds_csv(&path, &written).unwrap();
    assert_eq!(read_rounds_csv(&path).unwrap(), written);
}

#[test]
fn rounds_csv_numbers_have_fixed_decimals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    let row = RoundRow {
        round: 3,
        accuracy: Some(0.1234567),
        macro_f1: Some(1.0),
        loss: None,
        bytes_up: 42,
        bytes_down: 0,
        sim_seconds: 7.0,
        wall_seconds: 0.12345,
        global_accuracy: Some(0.5),
        global_macro_f1: None,
        global_loss: Some(0.2345678),
    };
    write_rounds_csv(&path, std::slice::from_ref(&row)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().nth(1), Some("3,0.123457,1.000000,,42,0,7.000,0.123,0.500000,,0.234568"));
    // Reading back gives the written precision, and writing that again gives the same bytes.
    let back = read_rounds_csv(&path).unwrap();
    assert_eq!(back[0].accuracy, Some(0.123457));
    assert_eq!(back[0].wall_seconds, 0.123);
    let again = dir.path().join("again.csv");
    write_rounds_csv(&again, &back).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), text.into_bytes());
}

#[test]
fn same_rows_give_byte_identical_rounds_csv() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
    // Numbers that are not exact at the written precision: rounding must be deterministic too.
    let mut rows = rows(5, 1.0 / 3.0);
    rows[0].sim_seconds = std::f64::consts::PI;
    write_rounds_csv(&a, &rows).unwrap();
    write_rounds_csv(&b, &rows).unwrap();
    let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

#[test]
fn missing_accuracy_round_trips_as_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    let written = rows(3, 0.0);
    assert_eq!(written[1].accuracy, None);
    write_rounds_csv(&path, &written).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.lines().nth(2).unwrap().starts_with("2,,,,"), "{text}");
    let back = read_rounds_csv(&path).unwrap();
    assert_eq!(back[1].accuracy, None);
    assert_eq!(back[1].macro_f1, None);
    assert_eq!(back[1].loss, None);
    assert_eq!(back[0].accuracy, Some(0.5625));
}

#[test]
fn rounds_csv_with_another_header_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    std::fs::write(&path, "round,acc,macro_f1,loss,bytes_up,bytes_down,sim_seconds,wall_seconds\n").unwrap();
    let err = read_rounds_csv(&path).unwrap_err();
    assert!(matches!(err, ReportError::Header { .. }), "{err:?}");
    assert!(err.to_string().contains("rounds.csv"), "{err}");
}

#[test]
fn rounds_csv_with_a_bad_number_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    let mut text = format!("{}\n", ROUNDS_CSV_HEADER.join(","));
    text.push_str("1,0.5,0.5,0.5,10,10,1.000,1.000,,,\n");
    text.push_str("2,0.5,0.5,0.5,ten,10,2.000,1.000,,,\n");
    std::fs::write(&path, text).unwrap();
    let err = read_rounds_csv(&path).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ReportError::Field { line: 3, column: "bytes_up", .. }), "{err:?}");
    assert!(message.contains("rounds.csv") && message.contains("\"ten\""), "{message}");
}

#[test]
fn rounds_csv_round_trips_the_global_test_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    let written = rows(4, 0.0);
    assert!(written[0].global_accuracy.is_some() && written[1].global_accuracy.is_none());
    write_rounds_csv(&path, &written).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with(",wall_seconds,global_accuracy,global_macro_f1,global_loss"), "{text}");
    // Round 1: 0.4375 + 0.015625, 0.40625 + 0.015625, 2.5 - 0.25; round 2 has none.
    assert!(lines[1].ends_with(",0.453125,0.421875,2.250000"), "{text}");
    assert!(lines[2].ends_with(",,,"), "{text}");
    assert_eq!(read_rounds_csv(&path).unwrap(), written);
    // A summary takes the last row's global accuracy (round 4 has none, round 3 does).
    assert_eq!(Summary::from_rows("x", &written, 0, 0).final_global_accuracy, None);
    assert_eq!(Summary::from_rows("x", &written[..3], 0, 0).final_global_accuracy, Some(0.484375));
}

#[test]
fn an_old_rounds_csv_without_the_global_columns_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rounds.csv");
    let old = "round,accuracy,macro_f1,loss,bytes_up,bytes_down,sim_seconds,wall_seconds\n\
               1,0.625000,0.500000,0.750000,1000,2000,12.500,0.875\n\
               2,,,,1000,2000,25.000,1.000\n";
    std::fs::write(&path, old).unwrap();
    let rows = read_rounds_csv(&path).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].round, rows[0].accuracy, rows[0].bytes_down, rows[0].wall_seconds),
        (1, Some(0.625), 2000, 0.875)
    );
    assert_eq!(rows[1].accuracy, None);
    assert!(rows.iter().all(|r| (r.global_accuracy, r.global_macro_f1, r.global_loss) == (None, None, None)));
    // Written again, it gains the new columns, empty.
    write_rounds_csv(&path, &rows).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().nth(1), Some("1,0.625000,0.500000,0.750000,1000,2000,12.500,0.875,,,"));
    // An old summary.json (no final_global_accuracy) still reads.
    let summary = r#"{"name": "old", "accuracy": 0.5, "macro_f1": 0.5, "examples": 10, "wall_seconds": 1.0,
        "rounds": 2, "bytes_up": 1, "bytes_down": 1, "sim_seconds": 2.0, "best_accuracy": 0.5, "missed_deadline": 0}"#;
    assert_eq!(serde_json::from_str::<Summary>(summary).unwrap().final_global_accuracy, None);
}

#[test]
fn reading_a_missing_rounds_csv_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.csv");
    let err = read_rounds_csv(&path).unwrap_err();
    assert!(matches!(err, ReportError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nowhere.csv"), "{err}");
}

#[test]
fn summary_takes_last_metrics_and_sums_bytes_and_wall_time() {
    let row = |round, accuracy: Option<f64>, bytes_up, bytes_down, sim_seconds, wall_seconds| RoundRow {
        round,
        accuracy,
        macro_f1: accuracy.map(|a| a - 0.1),
        loss: None,
        bytes_up,
        bytes_down,
        sim_seconds,
        wall_seconds,
        global_accuracy: accuracy.map(|a| a - 0.05),
        global_macro_f1: None,
        global_loss: None,
    };
    let rows = vec![
        row(1, Some(0.6), 100, 1_000, 10.0, 1.5),
        row(2, Some(0.8), 200, 2_000, 25.0, 2.0),
        row(3, Some(0.75), 300, 3_000, 45.0, 0.5),
    ];
    let s = Summary::from_rows("fedins", &rows, 1234, 2);
    assert_eq!(
        s,
        Summary {
            name: "fedins".into(),
            accuracy: Some(0.75),
            macro_f1: Some(0.75 - 0.1),
            examples: 1234,
            wall_seconds: 4.0,
            rounds: 3,
            bytes_up: 600,
            bytes_down: 6_000,
            sim_seconds: 45.0,
            best_accuracy: Some(0.8),
            missed_deadline: 2,
            final_global_accuracy: Some(0.75 - 0.05),
        }
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("summary.json");
    write_summary(&path, &s).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\n  \"accuracy\": 0.75,"), "pretty JSON:\n{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["accuracy", "macro_f1", "examples", "wall_seconds", "rounds", "bytes_up", "bytes_down"] {
        assert!(json.get(key).is_some(), "docs/design.md requires {key} in summary.json:\n{text}");
    }
    assert_eq!(serde_json::from_str::<Summary>(&text).unwrap(), s);
}

#[test]
fn summary_of_an_unevaluated_last_round_has_no_final_accuracy() {
    let mut rows = rows(3, 0.0);
    rows[2].accuracy = None;
    let s = Summary::from_rows("x", &rows, 0, 0);
    assert_eq!(s.accuracy, None);
    assert_eq!(s.best_accuracy, Some(0.5625));
    let empty = Summary::from_rows("empty", &[], 0, 0);
    assert_eq!((empty.rounds, empty.bytes_up, empty.accuracy, empty.sim_seconds), (0, 0, None, 0.0));
}

#[test]
fn plot_runs_writes_three_charts_as_png_and_svg_with_every_run_in_the_legend() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plots");
    let runs = vec![("fedavg-lora".to_string(), rows(5, 0.0)), ("fedins-pool".to_string(), rows(5, 0.05))];
    let written = plot_runs(&out, &runs).unwrap();

    let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let expected: Vec<String> =
        ["accuracy_vs_round", "accuracy_vs_bytes", "accuracy_vs_sim_time", "sim_time_per_round"]
            .iter()
            .flat_map(|stem| [format!("{stem}.png"), format!("{stem}.svg")])
            .collect();
    assert_eq!(names, expected);

    for path in &written {
        assert_eq!(path.parent(), Some(out.as_path()));
        let bytes = std::fs::read(path).unwrap();
        if path.extension().is_some_and(|e| e == "png") {
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", path.display());
            assert!(bytes.len() > 2048, "{} is only {} bytes", path.display(), bytes.len());
        } else {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.contains("<svg"), "{} is not an SVG", path.display());
            for (name, _) in &runs {
                assert!(text.contains(name.as_str()), "{} has no legend entry {name}", path.display());
            }
        }
    }
}

#[test]
fn plot_runs_draws_a_run_without_any_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let mut silent = rows(4, 0.0);
    silent.iter_mut().for_each(|r| r.accuracy = None);
    let written = plot_runs(dir.path(), &[("silent".to_string(), silent)]).unwrap();
    assert_eq!(written.len(), 8);
    assert!(written.iter().all(|p: &PathBuf| p.exists()));
}

#[test]
fn plot_runs_with_no_runs_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plots");
    let err = plot_runs(&out, &[]).unwrap_err();
    assert!(matches!(err, ReportError::NoRuns { .. }), "{err:?}");
    assert!(err.to_string().contains("plots"), "{err}");
    assert!(!out.exists());
}
