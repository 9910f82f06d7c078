//! A run's folder: `rounds.csv`, `summary.json`, `rounds.jsonl` (the engine's round records,
//! as a server logs them), `config.toml` (the experiment as resolved) and the plots.

use std::path::{Path, PathBuf};

use fedpool_common::checkpoint::atomic_write;

use crate::driver::RunOutput;
use crate::experiment::Experiment;
use crate::report::{self, ReportError};

/// Writes everything about one run into `dir` (created if missing) and returns the files written.
pub fn write_run(dir: &Path, exp: &Experiment, out: &RunOutput) -> Result<Vec<PathBuf>, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let rounds = dir.join("rounds.csv");
    report::write_rounds_csv(&rounds, &out.rows)?;
    written.push(rounds);
    let summary = dir.join("summary.json");
    report::write_summary(&summary, &out.summary)?;
    written.push(summary);

    let log = dir.join("rounds.jsonl");
    let mut lines = String::new();
    for record in &out.records {
        let line = serde_json::to_string(record).map_err(|source| ReportError::Json { path: log.clone(), source })?;
        lines.push_str(&line);
        lines.push('\n');
    }
    atomic_write(&log, lines.as_bytes()).map_err(io(&log))?;
    written.push(log);

    let config = dir.join("config.toml");
    let text = exp.to_toml().map_err(|e| ReportError::Io {
        path: config.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let text = format!("# The experiment as run (defaults filled in): fedpool-sim run --config config.toml\n{text}");
    atomic_write(&config, text.as_bytes()).map_err(io(&config))?;
    written.push(config);

    written.extend(report::plot_runs(dir, &[(exp.name.clone(), out.rows.clone())])?);
    Ok(written)
}
