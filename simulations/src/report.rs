//! The simulator's outputs (docs/design.md, "The command line"): `rounds.csv` (one [`RoundRow`] a
//! round), `summary.json` (a [`Summary`]) and charts of accuracy against rounds and bytes, and of
//! simulated time per round ([`plot_runs`]).
//!
//! `rounds.csv`'s last three columns are the round's score on the experiment's global test set
//! (`global_test`; empty without one); a file written before they existed (8 columns) still reads.
//!
//! Numbers are written in a fixed format — accuracy, macro-F1 and loss with 6 decimals, seconds with
//! 3 — so that the same rows always give the same bytes, and reading a file back gives exactly the
//! numbers that were written.
//!
//! Charts are drawn with plotters and no system fonts: text uses Noto Sans Regular (SIL Open Font
//! License 1.1), embedded by the `notosans` crate and rasterised by `ab_glyph`, so a machine without
//! fontconfig draws the same PNGs. SVGs name the `sans-serif` family and leave the font to the viewer.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fedpool_common::checkpoint::atomic_write;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// The exact header of `rounds.csv`: docs/design.md's ("The command line"), then the global test set's
/// metrics.
pub const ROUNDS_CSV_HEADER: [&str; 11] = [
    "round",
    "accuracy",
    "macro_f1",
    "loss",
    "bytes_up",
    "bytes_down",
    "sim_seconds",
    "wall_seconds",
    "global_accuracy",
    "global_macro_f1",
    "global_loss",
];

/// Columns of a `rounds.csv` written before the global test set's: the first 8 of
/// [`ROUNDS_CSV_HEADER`].
const OLD_ROUNDS_CSV_COLUMNS: usize = 8;

/// Decimals written for accuracy, macro-F1 and loss.
const METRIC_DECIMALS: usize = 6;
/// Decimals written for simulated and wall-clock seconds.
const SECONDS_DECIMALS: usize = 3;
/// Pixel size of every chart, PNG and SVG alike.
const CHART_SIZE: (u32, u32) = (1024, 640);
/// The family name the embedded font is registered under; plotters' default text style asks for it.
const FONT_FAMILY: &str = "sans-serif";
/// Font size of the legend's run names, in pixels.
const LEGEND_FONT_PX: u32 = 18;

/// What went wrong writing or reading a report file; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file or folder could not be read, written or created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The CSV layer failed (unequal field counts, invalid UTF-8, …).
    #[error("{}: {source}", path.display())]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// The csv crate's error, with its position.
        #[source]
        source: csv::Error,
    },
    /// `rounds.csv`'s header is neither [`ROUNDS_CSV_HEADER`] nor its first 8 columns (a file
    /// written before the global test set's columns).
    #[error(
        "{}: header is {found:?}, expected {:?} (or its first {OLD_ROUNDS_CSV_COLUMNS} columns, as written before the global test set's)",
        path.display(),
        ROUNDS_CSV_HEADER.join(",")
    )]
    Header {
        /// The CSV file.
        path: PathBuf,
        /// The header found, fields joined by commas.
        found: String,
    },
    /// A field of `rounds.csv` is not a number of its column's type.
    #[error("{}, line {line}, column {column}: {value:?} is not {expected}", path.display())]
    Field {
        /// The CSV file.
        path: PathBuf,
        /// The 1-based line of the record.
        line: u64,
        /// The column's name.
        column: &'static str,
        /// The field as found.
        value: String,
        /// What the column holds.
        expected: &'static str,
    },
    /// `summary.json` could not be serialised.
    #[error("{}: {source}", path.display())]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// plotters failed to draw or save a chart.
    #[error("{}: drawing failed: {message}", path.display())]
    Plot {
        /// The chart file.
        path: PathBuf,
        /// plotters' error, as text (its type depends on the backend).
        message: String,
    },
    /// The embedded font could not be loaded (a broken build, not a user error).
    #[error("{}: the embedded Noto Sans font could not be loaded", path.display())]
    Font {
        /// The chart file that needed it.
        path: PathBuf,
    },
    /// [`plot_runs`] was given no runs: there is nothing to draw.
    #[error("{}: no runs to plot", dir.display())]
    NoRuns {
        /// The folder the charts were to go to.
        dir: PathBuf,
    },
}

/// One row of `rounds.csv`: one committed round of one simulated run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    /// The round number (1 is the first trained round).
    pub round: u64,
    /// Example-weighted accuracy of the round's global model, if it was evaluated.
    pub accuracy: Option<f64>,
    /// Example-weighted macro-F1 of the round's global model, if it was evaluated.
    pub macro_f1: Option<f64>,
    /// Example-weighted evaluation loss, if it was evaluated.
    pub loss: Option<f64>,
    /// Bytes sent by clients to the server in this round.
    pub bytes_up: u64,
    /// Bytes sent by the server to clients in this round.
    pub bytes_down: u64,
    /// Simulated seconds since the start of the run, at the end of this round (cumulative).
    pub sim_seconds: f64,
    /// Wall-clock seconds the simulator spent on this round.
    pub wall_seconds: f64,
    /// Accuracy of the round's committed global pool on the global test set, if the experiment
    /// has one and the round was evaluated.
    pub global_accuracy: Option<f64>,
    /// Macro-F1 on the global test set, as [`RoundRow::global_accuracy`].
    pub global_macro_f1: Option<f64>,
    /// Mean loss on the global test set, as [`RoundRow::global_accuracy`].
    pub global_loss: Option<f64>,
}

/// Formats an optional metric with [`METRIC_DECIMALS`]; `None` is the empty field.
fn metric_field(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.METRIC_DECIMALS$}")).unwrap_or_default()
}

/// Formats seconds with [`SECONDS_DECIMALS`].
fn seconds_field(value: f64) -> String {
    format!("{value:.SECONDS_DECIMALS$}")
}

/// Writes `rows` to `path` as `rounds.csv`: the header of [`ROUNDS_CSV_HEADER`], then one line per
/// row, `None` as an empty field, metrics with 6 decimals and seconds with 3. The same rows always
/// give the same bytes. Non-finite numbers are written as `NaN`, `inf` or `-inf`. The file is
/// replaced atomically.
pub fn write_rounds_csv(path: &Path, rows: &[RoundRow]) -> Result<(), ReportError> {
    let csv_error = |source| ReportError::Csv { path: path.to_path_buf(), source };
    let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    writer.write_record(ROUNDS_CSV_HEADER).map_err(csv_error)?;
    for row in rows {
        writer
            .write_record([
                row.round.to_string(),
                metric_field(row.accuracy),
                metric_field(row.macro_f1),
                metric_field(row.loss),
                row.bytes_up.to_string(),
                row.bytes_down.to_string(),
                seconds_field(row.sim_seconds),
                seconds_field(row.wall_seconds),
                metric_field(row.global_accuracy),
                metric_field(row.global_macro_f1),
                metric_field(row.global_loss),
            ])
            .map_err(csv_error)?;
    }
    let bytes =
        writer.into_inner().map_err(|e| ReportError::Io { path: path.to_path_buf(), source: e.into_error() })?;
    atomic_write(path, &bytes).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })
}

/// Reads a `rounds.csv` written by [`write_rounds_csv`]. The header must be exactly
/// [`ROUNDS_CSV_HEADER`], or its first 8 columns (a file written before the global test set's
/// columns: those read as `None`); an empty field in a metric column (`accuracy`, `macro_f1`,
/// `loss`, `global_*`) reads as `None`, in any other column it is an error.
pub fn read_rounds_csv(path: &Path) -> Result<Vec<RoundRow>, ReportError> {
    let bytes = std::fs::read(path).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })?;
    let csv_error = |source| ReportError::Csv { path: path.to_path_buf(), source };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(bytes.as_slice());
    let header = reader.headers().map_err(csv_error)?;
    let with_global = header.iter().eq(ROUNDS_CSV_HEADER);
    if !with_global && header.iter().ne(ROUNDS_CSV_HEADER[..OLD_ROUNDS_CSV_COLUMNS].iter().copied()) {
        return Err(ReportError::Header {
            path: path.to_path_buf(),
            found: header.iter().collect::<Vec<_>>().join(","),
        });
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |column: usize| record.get(column).unwrap_or_default();
        let bad = |column: usize, expected: &'static str| ReportError::Field {
            path: path.to_path_buf(),
            line,
            column: ROUNDS_CSV_HEADER[column],
            value: field(column).to_string(),
            expected,
        };
        let integer = |column| field(column).parse::<u64>().map_err(|_| bad(column, "an unsigned integer"));
        let number = |column| field(column).parse::<f64>().map_err(|_| bad(column, "a number"));
        let optional = |column| match field(column) {
            "" => Ok(None),
            text => text.parse::<f64>().map(Some).map_err(|_| bad(column, "a number or empty")),
        };
        let global = |column| if with_global { optional(column) } else { Ok(None) };
        rows.push(RoundRow {
            round: integer(0)?,
            accuracy: optional(1)?,
            macro_f1: optional(2)?,
            loss: optional(3)?,
            bytes_up: integer(4)?,
            bytes_down: integer(5)?,
            sim_seconds: number(6)?,
            wall_seconds: number(7)?,
            global_accuracy: global(8)?,
            global_macro_f1: global(9)?,
            global_loss: global(10)?,
        });
    }
    Ok(rows)
}

/// `summary.json`: one run in one object (docs/design.md, "The command line").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The run's name (the experiment, or the arm of a comparison).
    pub name: String,
    /// Accuracy after the last round (`null` if the last round was not evaluated).
    pub accuracy: Option<f64>,
    /// Macro-F1 after the last round (`null` if the last round was not evaluated).
    pub macro_f1: Option<f64>,
    /// Held-out examples the accuracy was measured on.
    pub examples: u64,
    /// Wall-clock seconds of all rounds together.
    pub wall_seconds: f64,
    /// Rounds run (rows of `rounds.csv`).
    pub rounds: u64,
    /// Bytes sent by clients to the server, all rounds together.
    pub bytes_up: u64,
    /// Bytes sent by the server to clients, all rounds together.
    pub bytes_down: u64,
    /// Simulated seconds at the end of the last round.
    pub sim_seconds: f64,
    /// The highest accuracy of any evaluated round.
    pub best_accuracy: Option<f64>,
    /// Updates that arrived after their round's deadline, all rounds together.
    pub missed_deadline: u64,
    /// Accuracy on the global test set after the last round (`null` without a global test set, or
    /// if the last round was not evaluated; absent from files written before it existed).
    #[serde(default)]
    pub final_global_accuracy: Option<f64>,
}

impl Summary {
    /// Summarises the rows of one run: accuracy and macro-F1 of the last row, bytes and wall-clock
    /// seconds summed, `rounds` = number of rows, `sim_seconds` = the last row's (it is cumulative),
    /// `best_accuracy` = the largest accuracy of any row, `final_global_accuracy` = the last row's
    /// global test accuracy. No rows give zeros and `None`s.
    pub fn from_rows(name: &str, rows: &[RoundRow], examples: u64, missed_deadline: u64) -> Summary {
        let last = rows.last();
        Summary {
            name: name.to_string(),
            accuracy: last.and_then(|r| r.accuracy),
            macro_f1: last.and_then(|r| r.macro_f1),
            examples,
            wall_seconds: rows.iter().map(|r| r.wall_seconds).sum(),
            rounds: rows.len() as u64,
            bytes_up: rows.iter().fold(0u64, |sum, r| sum.saturating_add(r.bytes_up)),
            bytes_down: rows.iter().fold(0u64, |sum, r| sum.saturating_add(r.bytes_down)),
            sim_seconds: last.map_or(0.0, |r| r.sim_seconds),
            best_accuracy: rows.iter().filter_map(|r| r.accuracy).reduce(f64::max),
            missed_deadline,
            final_global_accuracy: last.and_then(|r| r.global_accuracy),
        }
    }
}

/// Writes `s` to `path` as pretty-printed JSON with a final newline, replacing the file atomically.
pub fn write_summary(path: &Path, s: &Summary) -> Result<(), ReportError> {
    let mut text =
        serde_json::to_string_pretty(s).map_err(|source| ReportError::Json { path: path.to_path_buf(), source })?;
    text.push('\n');
    atomic_write(path, text.as_bytes()).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })
}

/// One run's points on one chart.
struct Series<'a> {
    name: &'a str,
    points: Vec<(f64, f64)>,
    /// A shaded band around the line: (x, low, high) per point (empty: none).
    band: Vec<(f64, f64, f64)>,
}

/// One chart, drawn once as PNG and once as SVG.
struct Chart<'a> {
    stem: &'static str,
    title: &'static str,
    x_label: &'static str,
    y_label: &'static str,
    /// Start the y axis at zero (times), rather than at the data's minimum (accuracy).
    y_from_zero: bool,
    /// Start the x axis at zero (cumulative bytes).
    x_from_zero: bool,
    /// The x axis counts rounds: label whole numbers only.
    x_rounds: bool,
    series: Vec<Series<'a>>,
}

/// Draws `runs` into `dir` (created if missing): four charts, each as PNG and SVG, all runs on the
/// same axes, one colour per run, with a legend of the run names:
///
/// - `accuracy_vs_round`: accuracy against round;
/// - `accuracy_vs_bytes`: accuracy against cumulative traffic (bytes up + down, in MB of 10⁶ bytes);
/// - `accuracy_vs_sim_time`: accuracy against simulated seconds since the start;
/// - `sim_time_per_round`: simulated seconds of each round (the difference of consecutive
///   `sim_seconds`; the first row's counts from zero) against round.
///
/// Rounds without accuracy are left out of the accuracy charts (their bytes still count), and
/// non-finite values are left out everywhere. Returns the paths written, PNG before SVG, charts in
/// the order above. An empty `runs` is [`ReportError::NoRuns`].
pub fn plot_runs(dir: &Path, runs: &[(String, Vec<RoundRow>)]) -> Result<Vec<PathBuf>, ReportError> {
    if runs.is_empty() {
        return Err(ReportError::NoRuns { dir: dir.to_path_buf() });
    }
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io { path: dir.to_path_buf(), source })?;
    register_embedded_font().map_err(|()| ReportError::Font { path: dir.to_path_buf() })?;

    draw_all(dir, charts(runs))
}

/// Draws each chart into `dir` as PNG and SVG; the paths written, PNG before SVG.
fn draw_all<'a>(dir: &Path, charts: impl IntoIterator<Item = Chart<'a>>) -> Result<Vec<PathBuf>, ReportError> {
    let mut written = Vec::new();
    for chart in charts {
        let png = dir.join(format!("{}.png", chart.stem));
        draw(BitMapBackend::new(&png, CHART_SIZE).into_drawing_area(), &chart)
            .map_err(|message| ReportError::Plot { path: png.clone(), message })?;
        written.push(png);
        let svg = dir.join(format!("{}.svg", chart.stem));
        draw(SVGBackend::new(&svg, CHART_SIZE).into_drawing_area(), &chart)
            .map_err(|message| ReportError::Plot { path: svg.clone(), message })?;
        written.push(svg);
    }
    Ok(written)
}

/// One arm's curve over several seeds, for [`plot_seed_curves`]: per round the mean and the
/// sample standard deviation of the accuracy over the seeds, and the means of the cumulative
/// upload and of the simulated time.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedCurve {
    /// The arm's name (the legend).
    pub name: String,
    /// One point per round, in round order.
    pub points: Vec<SeedPoint>,
}

/// One round of a [`SeedCurve`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeedPoint {
    /// The round.
    pub round: u64,
    /// Mean accuracy over the seeds.
    pub accuracy: f64,
    /// Sample standard deviation of the accuracy over the seeds (0 for one seed).
    pub accuracy_std: f64,
    /// Mean cumulative bytes uploaded by the end of the round, in MB (10⁶ bytes).
    pub upload_mb: f64,
    /// Mean simulated seconds at the end of the round.
    pub sim_seconds: f64,
}

/// Draws `curves` into `dir`: `seeds_accuracy_vs_round`, `seeds_accuracy_vs_upload` and
/// `seeds_accuracy_vs_sim_time`, each as PNG and SVG: the mean accuracy as a line and a band of
/// ±1 standard deviation over the seeds. Returns the paths written. No curves is
/// [`ReportError::NoRuns`].
pub fn plot_seed_curves(dir: &Path, curves: &[SeedCurve]) -> Result<Vec<PathBuf>, ReportError> {
    if curves.is_empty() {
        return Err(ReportError::NoRuns { dir: dir.to_path_buf() });
    }
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io { path: dir.to_path_buf(), source })?;
    register_embedded_font().map_err(|()| ReportError::Font { path: dir.to_path_buf() })?;
    let series = |x: fn(&SeedPoint) -> f64| -> Vec<Series<'_>> {
        curves
            .iter()
            .map(|c| Series {
                name: &c.name,
                points: c.points.iter().map(|p| (x(p), p.accuracy)).collect(),
                band: c
                    .points
                    .iter()
                    .map(|p| (x(p), p.accuracy - p.accuracy_std, p.accuracy + p.accuracy_std))
                    .collect(),
            })
            .collect()
    };
    let charts = [
        Chart {
            stem: "seeds_accuracy_vs_round",
            title: "Accuracy per round (mean ± std over seeds)",
            x_label: "round",
            y_label: "accuracy",
            y_from_zero: false,
            x_from_zero: false,
            x_rounds: true,
            series: series(|p| p.round as f64),
        },
        Chart {
            stem: "seeds_accuracy_vs_upload",
            title: "Accuracy against uploaded bytes (mean ± std over seeds)",
            x_label: "cumulative upload (MB)",
            y_label: "accuracy",
            y_from_zero: false,
            x_from_zero: true,
            x_rounds: false,
            series: series(|p| p.upload_mb),
        },
        Chart {
            stem: "seeds_accuracy_vs_sim_time",
            title: "Accuracy against simulated time (mean ± std over seeds)",
            x_label: "simulated seconds since the start",
            y_label: "accuracy",
            y_from_zero: false,
            x_from_zero: true,
            x_rounds: false,
            series: series(|p| p.sim_seconds),
        },
    ];
    draw_all(dir, charts)
}

/// Registers Noto Sans Regular as plotters' `sans-serif`, once per process.
fn register_embedded_font() -> Result<(), ()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, notosans::REGULAR_TTF).is_ok());
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

/// The four charts' data.
fn charts(runs: &[(String, Vec<RoundRow>)]) -> [Chart<'_>; 4] {
    let accuracy_vs_round = runs
        .iter()
        .map(|(name, rows)| Series {
            name,
            points: rows.iter().filter_map(|r| Some((r.round as f64, r.accuracy?))).collect(),
            band: Vec::new(),
        })
        .collect();
    let accuracy_vs_bytes = runs
        .iter()
        .map(|(name, rows)| {
            let mut total = 0u64;
            let points = rows
                .iter()
                .filter_map(|r| {
                    total = total.saturating_add(r.bytes_up).saturating_add(r.bytes_down);
                    Some((total as f64 / 1e6, r.accuracy?))
                })
                .collect();
            Series { name, points, band: Vec::new() }
        })
        .collect();
    let accuracy_vs_sim_time = runs
        .iter()
        .map(|(name, rows)| Series {
            name,
            points: rows.iter().filter_map(|r| Some((r.sim_seconds, r.accuracy?))).collect(),
            band: Vec::new(),
        })
        .collect();
    let sim_time_per_round = runs
        .iter()
        .map(|(name, rows)| {
            let mut previous = 0.0;
            let points = rows
                .iter()
                .map(|r| {
                    let point = (r.round as f64, r.sim_seconds - previous);
                    previous = r.sim_seconds;
                    point
                })
                .collect();
            Series { name, points, band: Vec::new() }
        })
        .collect();
    [
        Chart {
            stem: "accuracy_vs_round",
            title: "Accuracy per round",
            x_label: "round",
            y_label: "accuracy",
            y_from_zero: false,
            x_from_zero: false,
            x_rounds: true,
            series: accuracy_vs_round,
        },
        Chart {
            stem: "accuracy_vs_bytes",
            title: "Accuracy against traffic",
            x_label: "cumulative traffic, up + down (MB)",
            y_label: "accuracy",
            y_from_zero: false,
            x_from_zero: true,
            x_rounds: false,
            series: accuracy_vs_bytes,
        },
        Chart {
            stem: "accuracy_vs_sim_time",
            title: "Accuracy against simulated time",
            x_label: "simulated seconds since the start",
            y_label: "accuracy",
            y_from_zero: false,
            x_from_zero: true,
            x_rounds: false,
            series: accuracy_vs_sim_time,
        },
        Chart {
            stem: "sim_time_per_round",
            title: "Simulated time per round",
            x_label: "round",
            y_label: "simulated seconds in the round",
            y_from_zero: true,
            x_from_zero: false,
            x_rounds: true,
            series: sim_time_per_round,
        },
    ]
}

/// The axis range that holds `values` (finite ones only) with 5% room below (none if `from_zero`
/// and no value is negative: the axis starts at zero) and the fraction `top_room` of the axis free
/// above the data (at least 5%); 0..1 if there is no value.
fn axis_range(values: impl Iterator<Item = f64>, from_zero: bool, top_room: f64) -> Range<f64> {
    let (min, max) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if min > max {
        return 0.0..1.0;
    }
    let pad = if max > min { 0.05 * (max - min) } else { 0.5 * max.abs().max(1.0) };
    let low = if from_zero && min >= 0.0 { 0.0 } else { min - pad };
    let top_room = top_room.clamp(0.05, 0.6);
    low..max + top_room * (max - low) / (1.0 - top_room)
}

/// A distinct colour per run: Tableau 10, then plotters' 99-colour palette.
fn run_colour(index: usize) -> RGBColor {
    const TABLEAU: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    TABLEAU.get(index).copied().unwrap_or_else(|| {
        let RGBAColor(r, g, b, _) = Palette99::pick(index).to_rgba();
        RGBColor(r, g, b)
    })
}

/// Draws `chart` on `root` and saves it; plotters' error as text.
fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart<'_>) -> Result<(), String> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let points = || chart.series.iter().flat_map(|s| s.points.iter().filter(finite));
    let band_ends = chart.series.iter().flat_map(|s| s.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]));
    let band_ends: Vec<(f64, f64)> = band_ends.filter(|p| finite(&p)).collect();
    let x = axis_range(points().map(|p| p.0), chart.x_from_zero, 0.05);
    // The legend sits in the upper right, above the data: keep a band free for it (its rows of
    // LEGEND_FONT_PX plus padding, over the ~480 px of plot height).
    let legend_room = (12.0 + 1.5 * f64::from(LEGEND_FONT_PX) * chart.series.len() as f64) / 480.0 + 0.03;
    let y = axis_range(points().map(|p| p.1).chain(band_ends.iter().map(|p| p.1)), chart.y_from_zero, legend_room);
    let round_labels = ((x.end - x.start).ceil() as usize + 1).clamp(2, 12);
    let whole_numbers = |v: &f64| if (v - v.round()).abs() < 1e-9 { format!("{v:.0}") } else { String::new() };

    let result = (|| {
        root.fill(&WHITE)?;
        let mut ctx = ChartBuilder::on(&root)
            .caption(chart.title, (FONT_FAMILY, 28))
            .margin(20)
            .x_label_area_size(56)
            .y_label_area_size(80)
            .build_cartesian_2d(x, y)?;
        let mut mesh = ctx.configure_mesh();
        mesh.x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .axis_desc_style((FONT_FAMILY, 20))
            .label_style((FONT_FAMILY, 16));
        if chart.x_rounds {
            mesh.x_labels(round_labels).x_label_formatter(&whole_numbers);
        }
        mesh.draw()?;
        for (index, series) in chart.series.iter().enumerate() {
            let colour = run_colour(index);
            let band: Vec<(f64, f64, f64)> =
                series.band.iter().filter(|b| b.0.is_finite() && b.1.is_finite() && b.2.is_finite()).copied().collect();
            if band.len() >= 2 {
                let outline: Vec<(f64, f64)> =
                    band.iter().map(|b| (b.0, b.2)).chain(band.iter().rev().map(|b| (b.0, b.1))).collect();
                ctx.draw_series(std::iter::once(Polygon::new(outline, colour.mix(0.18).filled())))?;
            }
            let points: Vec<(f64, f64)> = series.points.iter().filter(finite).copied().collect();
            ctx.draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))?
                .label(series.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
            ctx.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, LEGEND_FONT_PX))
            .draw()?;
        root.present()
    })();
    result.map_err(|e| e.to_string())
}
