//! Classification metrics: accuracy and macro-F1.

/// Accuracy, macro-F1 and mean loss over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Fraction of examples predicted correctly.
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 over the classes present in the labels or the
    /// predictions (as scikit-learn's `f1_score(average="macro")`).
    pub macro_f1: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Number of examples.
    pub examples: usize,
}

impl EvalMetrics {
    /// The metrics as a client reports them in an evaluation report.
    pub fn to_wire(&self) -> fedpool_common::wire::EvalMetrics {
        fedpool_common::wire::EvalMetrics {
            accuracy: self.accuracy as f32,
            macro_f1: self.macro_f1 as f32,
            loss: self.loss as f32,
            examples: self.examples as u64,
        }
    }
}

/// Fraction of `predictions` equal to `labels` (0 for no examples).
pub fn accuracy(predictions: &[usize], labels: &[usize]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    predictions.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
}

/// Macro-averaged F1 over the classes that occur in `labels` or `predictions` (a class's F1 is 0
/// when it has no true positive).
pub fn macro_f1(predictions: &[usize], labels: &[usize], num_labels: usize) -> f64 {
    let n = num_labels.max(predictions.iter().chain(labels).map(|&c| c + 1).max().unwrap_or(0));
    let (mut tp, mut fp, mut fnn) = (vec![0usize; n], vec![0usize; n], vec![0usize; n]);
    for (&p, &l) in predictions.iter().zip(labels) {
        if p == l {
            tp[p] += 1;
        } else {
            fp[p] += 1;
            fnn[l] += 1;
        }
    }
    let present: Vec<usize> = (0..n).filter(|&c| tp[c] + fp[c] + fnn[c] > 0).collect();
    if present.is_empty() {
        return 0.0;
    }
    let f1 = |c: usize| {
        let denom = 2 * tp[c] + fp[c] + fnn[c];
        if denom == 0 {
            0.0
        } else {
            2.0 * tp[c] as f64 / denom as f64
        }
    };
    present.iter().map(|&c| f1(c)).sum::<f64>() / present.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_matches_a_hand_count() {
        // Class 0: tp 1, fp 1, fn 1 → F1 0.5; class 1: tp 1, fp 1, fn 1 → 0.5; class 2: tp 1 → 1.
        let preds = [0, 1, 1, 0, 2];
        let labels = [0, 0, 1, 1, 2];
        assert!((macro_f1(&preds, &labels, 3) - 2.0 / 3.0).abs() < 1e-12);
        assert!((accuracy(&preds, &labels) - 0.6).abs() < 1e-12);
        assert_eq!(macro_f1(&[0, 0], &[0, 0], 4), 1.0, "absent classes are not averaged");
    }
}
