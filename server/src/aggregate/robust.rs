//! Robust aggregation: per-update L2 norm clipping, the coordinate-wise trimmed mean and median,
//! and Multi-Krum's choice of updates.
//!
//! Clipping scales a whole update (every tensor it carries; for LoRA the factor deltas) by
//! `min(1, clip / ‖Δ‖₂)` before it is folded, so one update moves a weighted mean by at most
//! `w_k / Σ w · clip` in L2 norm. For LoRA this bounds the factor deltas; the product's change is
//! bounded through them but not linearly (the product is trilinear in the factors).
//!
//! The trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
//! Statistical Rates", ICML 2018) needs all values of a coordinate at once; the aggregator buffers
//! the round's updates for it and bounds their number (`Rule::TrimmedMean::max_updates`).

use std::cmp::Ordering;

use fedpool_common::PoolDelta;

use super::AggregateError;

/// The factor `min(1, clip / norm)` that clips an update of L2 norm `norm` to `clip`; refused
/// when the norm is not finite (an update with NaN or infinite values).
pub fn clip_scale(norm: f64, clip: f64) -> Result<f32, AggregateError> {
    if !norm.is_finite() {
        return Err(AggregateError::NonFiniteNorm(norm));
    }
    Ok(if norm > clip { (clip / norm) as f32 } else { 1.0 })
}

/// The L2 norm of an update over every tensor it carries, accumulated in `f64` — the same value
/// as `PoolDelta::l2_norm` up to rounding, but with eight independent accumulators so that the
/// loop vectorises (a single running sum is bound by the latency of one add per value).
pub fn l2_norm(delta: &PoolDelta) -> f64 {
    delta.tensors.values().map(|t| sum_of_squares(t.data())).sum::<f64>().sqrt()
}

fn sum_of_squares(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>()
}

/// The trimmed weighted mean of `(value, weight)` pairs: with `n` pairs, drop the ⌊βn⌋ pairs of
/// largest value and the ⌊βn⌋ of smallest value (β = `trim_fraction` < 0.5, so at least one pair
/// is left), then return `Σ w x / Σ w` over the rest (their plain mean if every weight left is 0).
/// Ties between equal values are broken arbitrarily; `pairs` is reordered. Returns 0 for no pairs.
pub fn trimmed_weighted_mean(pairs: &mut [(f32, f64)], trim_fraction: f64) -> f64 {
    let n = pairs.len();
    if n == 0 {
        return 0.0;
    }
    let k = ((trim_fraction * n as f64).floor() as usize).min((n - 1) / 2);
    let by_value = |a: &(f32, f64), b: &(f32, f64)| -> Ordering { a.0.total_cmp(&b.0) };
    let kept: &[(f32, f64)] = if k == 0 {
        pairs
    } else {
        // After this, pairs[..k] hold the k smallest values.
        pairs.select_nth_unstable_by(k, by_value);
        let rest = &mut pairs[k..];
        // And rest[..n - 2k] the smallest n - 2k of the others: the middle.
        let mid = n - 2 * k;
        rest.select_nth_unstable_by(mid, by_value);
        &rest[..mid]
    };
    let total_w: f64 = kept.iter().map(|p| p.1).sum();
    if total_w > 0.0 {
        kept.iter().map(|&(x, w)| f64::from(x) * w).sum::<f64>() / total_w
    } else {
        kept.iter().map(|&(x, _)| f64::from(x)).sum::<f64>() / kept.len() as f64
    }
}

/// The median of the values of `(value, weight)` pairs, weights ignored (the mean of the two
/// middle values for an even count); `pairs` is reordered. Returns 0 for no pairs.
pub fn median(pairs: &mut [(f32, f64)]) -> f64 {
    let n = pairs.len();
    if n == 0 {
        return 0.0;
    }
    let by_value = |a: &(f32, f64), b: &(f32, f64)| -> Ordering { a.0.total_cmp(&b.0) };
    pairs.select_nth_unstable_by(n / 2, by_value);
    let upper = f64::from(pairs[n / 2].0);
    if n % 2 == 1 {
        return upper;
    }
    // The lower middle is the largest of the values below the upper one.
    let lower = pairs[..n / 2].iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
    0.5 * (f64::from(lower) + upper)
}

/// Multi-Krum's choice (Blanchard et al. 2017) from an n × n table of squared distances: each
/// update's score is the sum of its `n − byzantine − 2` (at least 1) smallest distances to the
/// others; the indices of the `select` lowest scores are returned in increasing order (ties by
/// index). With a single update it is chosen.
pub fn krum_select(dist: &[Vec<f64>], byzantine: usize, select: usize) -> Vec<usize> {
    let n = dist.len();
    if n <= 1 {
        return (0..n).collect();
    }
    let neighbours = n.saturating_sub(byzantine + 2).clamp(1, n - 1);
    let mut scored: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i][j]).collect();
            d.sort_by(f64::total_cmp);
            (d[..neighbours].iter().sum(), i)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut picked: Vec<usize> = scored.into_iter().take(select.clamp(1, n)).map(|(_, i)| i).collect();
    picked.sort_unstable();
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_ignores_weights_and_outliers() {
        let mut p: Vec<(f32, f64)> = [5.0, -100.0, 1.0, 2.0, 1e6].iter().map(|&x| (x, 1.0)).collect();
        assert_eq!(median(&mut p), 2.0);
        let mut p = vec![(1.0, 1e9), (4.0, 1.0), (3.0, 1.0), (2.0, 1.0)];
        assert_eq!(median(&mut p), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn krum_leaves_out_the_far_updates() {
        // Four close points on a line and two far ones.
        let x = [0.0f64, 0.1, 0.2, 0.3, 50.0, -80.0];
        let dist: Vec<Vec<f64>> = x.iter().map(|a| x.iter().map(|b| (a - b) * (a - b)).collect()).collect();
        let picked = krum_select(&dist, 2, 3);
        assert_eq!(picked.len(), 3);
        assert!(picked.iter().all(|&i| i < 4), "{picked:?}");
        assert_eq!(krum_select(&dist, 2, 1).len(), 1);
        assert_eq!(krum_select(&dist[..1], 2, 3), vec![0]);
    }

    #[test]
    fn trimming_drops_the_extremes_at_both_ends() {
        let mut p: Vec<(f32, f64)> = [5.0, -100.0, 1.0, 2.0, 1e6].iter().map(|&x| (x, 1.0)).collect();
        // n = 5, β = 0.2: drop one at each end; mean of {1, 2, 5}.
        assert!((trimmed_weighted_mean(&mut p, 0.2) - 8.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn no_trimming_is_the_weighted_mean() {
        let mut p = vec![(1.0, 1.0), (4.0, 3.0)];
        assert!((trimmed_weighted_mean(&mut p, 0.0) - 13.0 / 4.0).abs() < 1e-12);
        let mut p = vec![(1.0, 1.0), (4.0, 3.0), (0.0, 2.0)];
        // n = 3, β = 0.4: ⌊1.2⌋ = 1 at each end; only 1.0 is left.
        assert_eq!(trimmed_weighted_mean(&mut p, 0.4), 1.0);
    }

    #[test]
    fn fast_norm_agrees_with_the_plain_one() {
        let data: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = fedpool_common::HostTensor::new(vec![1003], data).unwrap();
        let d = PoolDelta {
            spec_hash: fedpool_common::SpecHash(fedpool_common::Sha256::of(b"t")),
            slots: None,
            tensors: [("x".to_string(), t)].into_iter().collect(),
        };
        assert!((l2_norm(&d) - d.l2_norm()).abs() < 1e-9 * d.l2_norm());
    }

    #[test]
    fn clip_scale_only_shrinks() {
        assert_eq!(clip_scale(0.5, 1.0).unwrap(), 1.0);
        assert!((clip_scale(4.0, 1.0).unwrap() - 0.25).abs() < 1e-7);
        assert!(clip_scale(f64::NAN, 1.0).is_err());
    }
}
