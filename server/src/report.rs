//! What `fedpool-server report` prints: the round log ([`RoundRecord`]s, one per committed round)
//! as a fixed-width table.

use crate::round::RoundRecord;

/// The round log as a fixed-width table: round, the global model's accuracy and macro-F1
/// (federated evaluation; `-` where none), clients, bytes up and down (training and evaluation),
/// seconds of the round.
pub fn round_table(records: &[RoundRecord]) -> String {
    let mut s = format!(
        "{:>5} {:>9} {:>9} {:>8} {:>7} {:>12} {:>12} {:>8}\n",
        "round", "accuracy", "macro-F1", "eval n", "clients", "bytes up", "bytes down", "seconds"
    );
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
    for r in records {
        let e = r.eval.as_ref();
        let up = r.bytes_up + e.map_or(0, |e| e.bytes_up);
        let down = r.bytes_down + e.map_or(0, |e| e.bytes_down);
        s.push_str(&format!(
            "{:>5} {:>9} {:>9} {:>8} {:>7} {:>12} {:>12} {:>8.1}\n",
            r.round,
            pct(e.and_then(|e| e.accuracy)),
            pct(e.and_then(|e| e.macro_f1)),
            e.map_or(0, |e| e.examples),
            r.clients.len(),
            up,
            down,
            (r.committed_at_secs - r.started_at_secs).max(0.0) + e.map_or(0.0, |e| e.seconds),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::round::EvalRecord;

    fn record(round: u64, eval: Option<EvalRecord>) -> RoundRecord {
        RoundRecord {
            round,
            attempt: 1,
            clients: vec!["a".into(), "b".into()],
            examples: 20,
            bytes_up: 1_000,
            bytes_down: 4_000,
            rejected: BTreeMap::new(),
            stragglers: Vec::new(),
            train_loss: Some(0.5),
            train_accuracy: Some(0.75),
            started_at_secs: 10.0,
            committed_at_secs: 12.5,
            recovered: false,
            median_update_norm: None,
            eval,
        }
    }

    #[test]
    fn the_table_adds_the_evaluations_bytes_and_seconds_and_marks_a_round_without_one() {
        let eval = EvalRecord {
            accuracy: Some(0.8125),
            macro_f1: Some(0.5),
            loss: Some(0.4),
            examples: 64,
            clients: vec!["a".into(), "b".into()],
            missing: Vec::new(),
            bytes_down: 4_000,
            bytes_up: 100,
            seconds: 1.5,
        };
        let table = round_table(&[record(1, Some(eval)), record(2, None)]);
        let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert_eq!(lines[0][0], "round");
        assert_eq!(lines[1], ["1", "81.25%", "50.00%", "64", "2", "1100", "8000", "4.0"], "{table}");
        assert_eq!(lines[2], ["2", "-", "-", "0", "2", "1000", "4000", "2.5"], "{table}");
    }
}
