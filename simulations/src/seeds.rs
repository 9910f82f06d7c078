//! A study's arms over several seeds (`fedpool-sim seeds`): per arm the mean ± sample standard
//! deviation of the final accuracy, the gap to a reference arm paired by seed (the same seed is
//! the same data split and initial pool in every arm, so the paired difference removes the
//! split's share of the noise), the uploaded bytes against the reference's, and the simulated time
//! at which each seed first reaches the reference's final accuracy; `seeds.md` and charts with
//! ±1 std bands ([`crate::report::plot_seed_curves`]).
//!
//! A run is a folder written by `fedpool-sim run`: `summary.json` names the arm, `config.toml`
//! holds its seed, `rounds.csv` its rounds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::report::{read_rounds_csv, ReportError, RoundRow, SeedCurve, SeedPoint, Summary};

/// Why a set of seed runs could not be summarised; each names the run or arm.
#[derive(Debug, thiserror::Error)]
pub enum SeedsError {
    /// A run's files could not be read.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A run's `summary.json` or `config.toml` is missing or unreadable.
    #[error("{}: {problem}", dir.display())]
    Run {
        /// The run folder.
        dir: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Two runs of one arm have the same seed.
    #[error("arm {arm:?}: seed {seed} twice ({} and {})", first.display(), second.display())]
    DuplicateSeed {
        /// The arm.
        arm: String,
        /// The seed.
        seed: u64,
        /// One run.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// The runs of one arm have different numbers of rounds.
    #[error("arm {arm:?}: its seeds ran {counts:?} rounds; a mean per round needs the same number")]
    UnequalRounds {
        /// The arm.
        arm: String,
        /// Rounds per seed.
        counts: Vec<usize>,
    },
    /// The reference arm is not among the runs.
    #[error("the reference arm {0:?} is not among the runs")]
    NoReference(String),
}

/// One finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRun {
    /// Its arm (the experiment's name).
    pub arm: String,
    /// Its seed.
    pub seed: u64,
    /// Where it was read from.
    pub dir: PathBuf,
    /// Its rounds.
    pub rows: Vec<RoundRow>,
}

/// Reads the run in `dir`.
pub fn load_run(dir: &Path) -> Result<SeedRun, SeedsError> {
    let bad = |problem: String| SeedsError::Run { dir: dir.to_path_buf(), problem };
    let summary = std::fs::read_to_string(dir.join("summary.json"))
        .map_err(|e| bad(format!("summary.json: {e} (not a finished run?)")))?;
    let summary: Summary = serde_json::from_str(&summary).map_err(|e| bad(format!("summary.json: {e}")))?;
    let config = std::fs::read_to_string(dir.join("config.toml")).map_err(|e| bad(format!("config.toml: {e}")))?;
    let config: toml::Table = toml::from_str(&config).map_err(|e| bad(format!("config.toml: {e}")))?;
    let seed = match config.get("seed") {
        None => 0,
        Some(toml::Value::Integer(s)) if *s >= 0 => *s as u64,
        Some(other) => return Err(bad(format!("config.toml: seed {other} is not a non-negative integer"))),
    };
    let rows = read_rounds_csv(&dir.join("rounds.csv"))?;
    Ok(SeedRun { arm: summary.name, seed, dir: dir.to_path_buf(), rows })
}

/// Mean and sample standard deviation (n − 1; 0 for one value) of some numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanStd {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation.
    pub std: f64,
    /// How many numbers.
    pub n: usize,
}

impl MeanStd {
    /// Of `values` (None when empty).
    pub fn of(values: &[f64]) -> Option<MeanStd> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Some(MeanStd { mean, std: var.sqrt(), n })
    }

    /// `mean ± std`, both scaled by `scale`, with `decimals` (the mean alone for one value).
    fn show(&self, scale: f64, decimals: usize) -> String {
        if self.n == 1 {
            return format!("{:.decimals$}", self.mean * scale);
        }
        format!("{:.decimals$} ± {:.decimals$}", self.mean * scale, self.std * scale)
    }
}

/// One arm's runs, one per seed, in seed order.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    /// The arm's name.
    pub name: String,
    /// Its runs, in seed order.
    pub runs: Vec<SeedRun>,
}

/// Groups runs by arm (arms in the order first seen, seeds sorted); refuses a seed twice in an
/// arm and seeds of different lengths.
pub fn group(runs: Vec<SeedRun>) -> Result<Vec<Arm>, SeedsError> {
    let mut arms: Vec<Arm> = Vec::new();
    for run in runs {
        match arms.iter_mut().find(|a| a.name == run.arm) {
            Some(arm) => {
                if let Some(first) = arm.runs.iter().find(|r| r.seed == run.seed) {
                    return Err(SeedsError::DuplicateSeed {
                        arm: run.arm.clone(),
                        seed: run.seed,
                        first: first.dir.clone(),
                        second: run.dir.clone(),
                    });
                }
                arm.runs.push(run);
            }
            None => arms.push(Arm { name: run.arm.clone(), runs: vec![run] }),
        }
    }
    for arm in &mut arms {
        arm.runs.sort_by_key(|r| r.seed);
        let counts: Vec<usize> = arm.runs.iter().map(|r| r.rows.len()).collect();
        if counts.windows(2).any(|w| w[0] != w[1]) {
            return Err(SeedsError::UnequalRounds { arm: arm.name.clone(), counts });
        }
    }
    Ok(arms)
}

/// The first simulated second at which `rows` reach `target` accuracy (None: never).
pub fn time_to_accuracy(rows: &[RoundRow], target: f64) -> Option<f64> {
    rows.iter().find(|r| r.accuracy.is_some_and(|a| a >= target)).map(|r| r.sim_seconds)
}

/// One arm against the reference, over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmSummary {
    /// The arm.
    pub name: String,
    /// Its seeds.
    pub seeds: Vec<u64>,
    /// Accuracy after the last round.
    pub accuracy: Option<MeanStd>,
    /// Macro-F1 after the last round.
    pub macro_f1: Option<MeanStd>,
    /// Evaluation loss after the last round (smoother than accuracy: every example counts by its
    /// probability, not by a threshold).
    pub loss: Option<MeanStd>,
    /// Per seed, the mean accuracy of the last [`TAIL_ROUNDS`] rounds (steadier than the last
    /// round alone: one round's evaluation moves by a point or two).
    pub tail_accuracy: Option<MeanStd>,
    /// The tail accuracy minus the reference's, per shared seed.
    pub tail_gap: Option<MeanStd>,
    /// Bytes uploaded, all rounds.
    pub bytes_up: MeanStd,
    /// Simulated seconds of the whole run.
    pub sim_seconds: MeanStd,
    /// Final accuracy minus the reference's, per shared seed.
    pub gap: Option<MeanStd>,
    /// Mean bytes up over the reference's mean bytes up.
    pub upload_fraction: Option<f64>,
    /// Per shared seed, the first simulated second this arm reaches the reference's final
    /// accuracy of that seed, over the reference's whole simulated time; seeds that never reach
    /// it are left out (see `reached`).
    pub time_to_reference: Option<MeanStd>,
    /// Shared seeds in which the arm reached the reference's final accuracy.
    pub reached: usize,
    /// Shared seeds.
    pub shared: usize,
}

/// Rounds of [`ArmSummary::tail_accuracy`].
pub const TAIL_ROUNDS: usize = 3;

/// The mean accuracy of the last [`TAIL_ROUNDS`] rows (None if one has none).
fn tail_accuracy(rows: &[RoundRow]) -> Option<f64> {
    let tail = &rows[rows.len().saturating_sub(TAIL_ROUNDS)..];
    let values: Option<Vec<f64>> = tail.iter().map(|r| r.accuracy).collect();
    values.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// Summarises every arm, against `reference` when given.
pub fn summarise(arms: &[Arm], reference: Option<&str>) -> Result<Vec<ArmSummary>, SeedsError> {
    let reference = match reference {
        Some(name) => {
            Some(arms.iter().find(|a| a.name == name).ok_or_else(|| SeedsError::NoReference(name.to_string()))?)
        }
        None => None,
    };
    let final_accuracy = |r: &SeedRun| r.rows.last().and_then(|row| row.accuracy);
    let bytes_up = |r: &SeedRun| r.rows.iter().map(|row| row.bytes_up as f64).sum::<f64>();
    let sim_seconds = |r: &SeedRun| r.rows.last().map_or(0.0, |row| row.sim_seconds);
    let ref_bytes = reference.and_then(|a| MeanStd::of(&a.runs.iter().map(bytes_up).collect::<Vec<_>>()));
    Ok(arms
        .iter()
        .map(|arm| {
            let of =
                |f: &dyn Fn(&SeedRun) -> Option<f64>| MeanStd::of(&arm.runs.iter().filter_map(f).collect::<Vec<_>>());
            let mut gaps = Vec::new();
            let mut tail_gaps = Vec::new();
            let mut times = Vec::new();
            let mut shared = 0;
            if let Some(reference) = reference {
                let by_seed: BTreeMap<u64, &SeedRun> = reference.runs.iter().map(|r| (r.seed, r)).collect();
                for run in &arm.runs {
                    let Some(base) = by_seed.get(&run.seed) else { continue };
                    shared += 1;
                    if let (Some(a), Some(b)) = (tail_accuracy(&run.rows), tail_accuracy(&base.rows)) {
                        tail_gaps.push(a - b);
                    }
                    if let (Some(a), Some(b)) = (final_accuracy(run), final_accuracy(base)) {
                        gaps.push(a - b);
                        let total = sim_seconds(base);
                        if let Some(t) = time_to_accuracy(&run.rows, b).filter(|_| total > 0.0) {
                            times.push(t / total);
                        }
                    }
                }
            }
            let up = of(&|r| Some(bytes_up(r))).unwrap_or(MeanStd { mean: 0.0, std: 0.0, n: 0 });
            ArmSummary {
                name: arm.name.clone(),
                seeds: arm.runs.iter().map(|r| r.seed).collect(),
                accuracy: of(&final_accuracy),
                macro_f1: of(&|r| r.rows.last().and_then(|row| row.macro_f1)),
                loss: of(&|r| r.rows.last().and_then(|row| row.loss)),
                tail_accuracy: of(&|r| tail_accuracy(&r.rows)),
                tail_gap: MeanStd::of(&tail_gaps),
                bytes_up: up,
                sim_seconds: of(&|r| Some(sim_seconds(r))).unwrap_or(MeanStd { mean: 0.0, std: 0.0, n: 0 }),
                gap: MeanStd::of(&gaps),
                upload_fraction: ref_bytes.filter(|b| b.mean > 0.0).map(|b| up.mean / b.mean),
                time_to_reference: MeanStd::of(&times),
                reached: times.len(),
                shared,
            }
        })
        .collect())
}

/// The markdown table of [`summarise`]'s rows (accuracy in points, bytes in MB).
pub fn table(summaries: &[ArmSummary], reference: Option<&str>) -> String {
    let dash = || "—".to_string();
    let mut out = String::new();
    let against = reference.unwrap_or("the reference");
    out.push_str(&format!(
        "| arm | seeds | final accuracy | final macro-F1 | gap to {against} (paired) | last-{TAIL_ROUNDS} accuracy | its gap (paired) | MB up | upload / {against} | final loss | simulated s | reaches {against}'s final accuracy at (share of its time) |\n"
    ));
    out.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for s in summaries {
        let seeds = s.seeds.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        let time = match s.time_to_reference {
            Some(t) if s.reached == s.shared => t.show(100.0, 1) + "%",
            Some(t) => format!("{}% ({} of {} seeds)", t.show(100.0, 1), s.reached, s.shared),
            None if s.shared > 0 => format!("never (0 of {} seeds)", s.shared),
            None => dash(),
        };
        let gap = |g: Option<MeanStd>| {
            g.map_or_else(dash, |m| match m.n {
                1 => format!("{:+.2}", 100.0 * m.mean),
                _ => format!("{:+.2} ± {:.2}", 100.0 * m.mean, 100.0 * m.std),
            })
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.name,
            seeds,
            s.accuracy.map_or_else(dash, |m| m.show(100.0, 2)),
            s.macro_f1.map_or_else(dash, |m| m.show(100.0, 2)),
            gap(s.gap),
            s.tail_accuracy.map_or_else(dash, |m| m.show(100.0, 2)),
            gap(s.tail_gap),
            s.bytes_up.show(1e-6, 2),
            s.upload_fraction.map_or_else(dash, |f| format!("{:.2}%", 100.0 * f)),
            s.loss.map_or_else(dash, |m| m.show(1.0, 4)),
            s.sim_seconds.show(1.0, 0),
            time,
        ));
    }
    out
}

/// Each arm's mean curve with its ±1 std band, per round (rounds without accuracy in any seed
/// are left out).
pub fn curves(arms: &[Arm]) -> Vec<SeedCurve> {
    arms.iter()
        .map(|arm| {
            let rounds = arm.runs.first().map_or(0, |r| r.rows.len());
            let mut uploaded = vec![0.0f64; arm.runs.len()];
            let mut points = Vec::with_capacity(rounds);
            for i in 0..rounds {
                let rows: Vec<&RoundRow> = arm.runs.iter().map(|r| &r.rows[i]).collect();
                for (u, row) in uploaded.iter_mut().zip(&rows) {
                    *u += row.bytes_up as f64;
                }
                let accuracy: Option<Vec<f64>> = rows.iter().map(|r| r.accuracy).collect();
                let Some(acc) = accuracy.as_deref().and_then(MeanStd::of) else { continue };
                let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
                points.push(SeedPoint {
                    round: rows[0].round,
                    accuracy: acc.mean,
                    accuracy_std: acc.std,
                    upload_mb: mean(uploaded.clone()) / 1e6,
                    sim_seconds: mean(rows.iter().map(|r| r.sim_seconds).collect()),
                });
            }
            SeedCurve { name: arm.name.clone(), points }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: u64, accuracy: f64, bytes_up: u64, sim_seconds: f64) -> RoundRow {
        RoundRow {
            round,
            accuracy: Some(accuracy),
            macro_f1: Some(accuracy - 0.1),
            loss: None,
            bytes_up,
            bytes_down: 0,
            sim_seconds,
            wall_seconds: 1.0,
            global_accuracy: None,
            global_macro_f1: None,
            global_loss: None,
        }
    }

    fn run(arm: &str, seed: u64, acc: &[f64], bytes: u64) -> SeedRun {
        let rows = acc.iter().enumerate().map(|(i, &a)| row(i as u64 + 1, a, bytes, 10.0 * (i + 1) as f64)).collect();
        SeedRun { arm: arm.into(), seed, dir: PathBuf::from(format!("{arm}/{seed}")), rows }
    }

    #[test]
    fn gaps_are_paired_by_seed_and_times_are_shares_of_the_references_run() {
        let runs = vec![
            run("ref", 1, &[0.6, 0.7, 0.8], 100),
            run("ref", 0, &[0.5, 0.6, 0.7], 100),
            run("fast", 0, &[0.7, 0.72, 0.75], 10),
            run("fast", 1, &[0.6, 0.81, 0.82], 10),
            run("slow", 0, &[0.1, 0.2, 0.3], 50),
        ];
        let arms = group(runs).unwrap();
        assert_eq!(arms.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["ref", "fast", "slow"]);
        assert_eq!(arms[0].runs.iter().map(|r| r.seed).collect::<Vec<_>>(), [0, 1], "seeds sorted");
        let s = summarise(&arms, Some("ref")).unwrap();
        let fast = &s[1];
        // Seed 0: 0.75 − 0.7; seed 1: 0.82 − 0.8.
        let gap = fast.gap.unwrap();
        assert!((gap.mean - 0.035).abs() < 1e-12 && (gap.std - (2.0f64 * 0.015f64.powi(2)).sqrt()).abs() < 1e-12);
        // Seed 0 reaches 0.7 in round 1 (10 s of 30), seed 1 reaches 0.8 in round 2 (20 of 30).
        let t = fast.time_to_reference.unwrap();
        assert!((t.mean - 0.5).abs() < 1e-12, "{t:?}");
        assert_eq!((fast.reached, fast.shared), (2, 2));
        assert!((fast.upload_fraction.unwrap() - 0.1).abs() < 1e-12);
        let slow = &s[2];
        assert_eq!((slow.reached, slow.shared), (0, 1));
        let md = table(&s, Some("ref"));
        assert!(md.contains("| slow | 0 | 30.00 | 20.00 | -40.00 |"), "one seed: no spread shown: {md}");
        // Last 3 of seed 0: (0.7 + 0.72 + 0.75)/3 against (0.5 + 0.6 + 0.7)/3.
        let tail = s[1].tail_gap.unwrap();
        let want = ((0.7 + 0.72 + 0.75) / 3.0 - 0.6 + (0.6 + 0.81 + 0.82) / 3.0 - 0.7) / 2.0;
        assert!((tail.mean - want).abs() < 1e-12, "{tail:?} vs {want}");
        assert!(md.contains("never (0 of 1 seeds)"), "{md}");
        let c = curves(&arms);
        assert_eq!(c[1].points.len(), 3);
        assert!((c[1].points[1].accuracy - 0.765).abs() < 1e-12);
        assert!((c[1].points[2].upload_mb - 30e-6).abs() < 1e-15, "cumulative upload");
    }

    #[test]
    fn a_seed_twice_unequal_rounds_and_a_missing_reference_are_refused_by_name() {
        let twice = group(vec![run("a", 3, &[0.5], 1), run("a", 3, &[0.6], 1)]).unwrap_err();
        assert!(twice.to_string().contains("arm \"a\": seed 3 twice"), "{twice}");
        let unequal = group(vec![run("a", 0, &[0.5], 1), run("a", 1, &[0.5, 0.6], 1)]).unwrap_err();
        assert!(unequal.to_string().contains("[1, 2] rounds"), "{unequal}");
        let arms = group(vec![run("a", 0, &[0.5], 1)]).unwrap();
        assert!(summarise(&arms, Some("b")).unwrap_err().to_string().contains("\"b\""));
    }

    #[test]
    fn a_run_folder_is_read_with_its_arm_and_seed() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![row(1, 0.5, 7, 3.0)];
        crate::report::write_rounds_csv(&dir.path().join("rounds.csv"), &rows).unwrap();
        crate::report::write_summary(&dir.path().join("summary.json"), &Summary::from_rows("arm-x", &rows, 10, 0))
            .unwrap();
        std::fs::write(dir.path().join("config.toml"), "name = \"arm-x\"\nseed = 4\n").unwrap();
        let r = load_run(dir.path()).unwrap();
        assert_eq!((r.arm.as_str(), r.seed, r.rows.len()), ("arm-x", 4, 1));
        std::fs::remove_file(dir.path().join("summary.json")).unwrap();
        assert!(load_run(dir.path()).unwrap_err().to_string().contains("not a finished run"));
    }
}
