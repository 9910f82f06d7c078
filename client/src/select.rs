//! Instance-adaptive pool selection (FedIns, Feng et al. ICCV 2023), per instance in one batched
//! pass.
//!
//! Each example's query q (the frozen backbone's pooled feature) is compared with the pool's keys
//! K by cosine similarity; the example takes its top-k slots, and its adapter at every point is the
//! mean of those slots' rows ([`gather_mean`]: one `index_select` with the `[B·k]` slot ids, a
//! reshape to `[B, k, ...]` and a mean over k — no loop over examples). FedIns' own code selects
//! once per batch (FedIns issue #2); here every row of a batch has its own slots.
//!
//! [`SlotCounter`] counts which slots the examples used, for the slot-restricted upload and to make
//! a collapse of the pool onto a few slots visible (its [`entropy`](SlotCounter::entropy_bits)).

use candle_core::{Device, Tensor, D};
use fedpool_common::adapter::SlotUsage;

/// Norms below this are treated as this when normalising for the cosine (avoids 0/0).
const COSINE_EPS: f64 = 1e-8;

/// The slots each row of a batch selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Rows in the batch (B).
    pub batch: usize,
    /// Slots per row (k).
    pub k: usize,
    /// Slot ids, row-major `[B, k]`; within a row, by decreasing similarity.
    pub slots: Vec<u32>,
}

impl Selection {
    /// The slots of row `i`.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.slots[i * self.k..(i + 1) * self.k]
    }

    /// Every row uses slot 0 (a pool of one slot: plain SSF, LoRA's plain head).
    pub fn single(batch: usize) -> Self {
        Self { batch, k: 1, slots: vec![0; batch] }
    }

    /// The slot ids as a `[B·k]` u32 tensor, for `index_select`.
    pub fn index_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.slots, self.slots.len(), device)
    }
}

/// Rows of `x: [N, d]` divided by their L2 norms.
fn normalize_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(COSINE_EPS, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Cosine similarity of every query with every key: `queries: [B, d]`, `keys: [P, d]` → `[B, P]`.
/// Differentiable in both (the keys are trained through it).
pub fn cosine_similarity(queries: &Tensor, keys: &Tensor) -> candle_core::Result<Tensor> {
    normalize_rows(queries)?.matmul(&normalize_rows(keys)?.t()?)
}

/// The `k` most similar slots of each row of `similarity: [B, P]`, by decreasing similarity; ties
/// go to the lower slot id (so selection is deterministic).
///
/// # Errors
/// If `similarity` is not `[B, P]` with `1 ≤ k ≤ P`, or holds a NaN.
pub fn top_k(similarity: &Tensor, k: usize) -> candle_core::Result<Selection> {
    let (batch, pool) = similarity.dims2()?;
    if k == 0 || k > pool {
        candle_core::bail!("top-k: k = {k} must be in 1..={pool}");
    }
    let rows = similarity.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let mut slots = Vec::with_capacity(batch * k);
    let mut order: Vec<u32> = Vec::with_capacity(pool);
    for row in &rows {
        if row.iter().any(|v| v.is_nan()) {
            candle_core::bail!("top-k: similarity holds a NaN");
        }
        order.clear();
        order.extend(0..pool as u32);
        // Stable sort: equal similarities keep the lower slot first.
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        slots.extend_from_slice(&order[..k]);
    }
    Ok(Selection { batch, k, slots })
}

/// Each row's mean of its selected slots of `pool: [P, ...]` → `[B, ...]`, in one batched op.
pub fn gather_mean(pool: &Tensor, selection: &Selection) -> candle_core::Result<Tensor> {
    let idx = selection.index_tensor(pool.device())?;
    let picked = pool.index_select(&idx, 0)?;
    let mut dims = vec![selection.batch, selection.k];
    dims.extend_from_slice(&pool.dims()[1..]);
    picked.reshape(dims)?.mean(1)
}

/// Each row's sum of cosines with its selected keys: `similarity: [B, P]` → `[B]`, differentiable
/// (the surrogate loss `1 − Σ_k cos(q, K_s)` pulls the selected keys toward the query).
pub fn matched_cosine(similarity: &Tensor, selection: &Selection) -> candle_core::Result<Tensor> {
    let idx = Tensor::from_slice(&selection.slots, (selection.batch, selection.k), similarity.device())?;
    similarity.gather(&idx, 1)?.sum(1)
}

/// Counts, per slot, the examples that selected it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCounter {
    counts: Vec<u64>,
}

impl SlotCounter {
    /// Zero counts for a pool of `pool_size` slots.
    pub fn new(pool_size: usize) -> Self {
        Self { counts: vec![0; pool_size] }
    }

    /// Adds one count to every slot each row selected.
    pub fn record(&mut self, selection: &Selection) {
        self.record_row(&selection.slots);
    }

    /// Adds one count to each of `slots` (one example's selection).
    pub fn record_row(&mut self, slots: &[u32]) {
        for &s in slots {
            if let Some(c) = self.counts.get_mut(s as usize) {
                *c += 1;
            }
        }
    }

    /// Counts by slot id (all slots, unused ones 0).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The sum of all counts (examples × k when every example was counted once).
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The used slots and their counts, as a delta carries them; `None` if no slot was used.
    pub fn usage(&self) -> Option<SlotUsage> {
        let (slots, counts): (Vec<u32>, Vec<u64>) =
            self.counts.iter().enumerate().filter(|(_, c)| **c > 0).map(|(s, c)| (s as u32, *c)).unzip();
        (!slots.is_empty()).then_some(SlotUsage { slots, counts })
    }

    /// Shannon entropy of the usage distribution, in bits: log2(P) when all slots are used
    /// equally, log2(k) when the pool has collapsed onto k slots.
    pub fn entropy_bits(&self) -> f64 {
        let total = self.total() as f64;
        if total == 0.0 {
            return 0.0;
        }
        self.counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / total).map(|p| -p * p.log2()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn top_k_takes_the_most_similar_and_breaks_ties_low() {
        let sims = t(&[0.1, 0.9, 0.5, 0.9, 0.3, 0.2, 0.1, 0.0], (2, 4));
        let sel = top_k(&sims, 2).unwrap();
        assert_eq!(sel.row(0), &[1, 3]);
        assert_eq!(sel.row(1), &[0, 1]);
        assert!(top_k(&sims, 5).is_err());
    }

    #[test]
    fn gather_mean_is_the_mean_of_each_rows_slots() {
        let pool = t(&[0.0, 0.0, 2.0, 4.0, 6.0, 8.0], (3, 2));
        let sel = Selection { batch: 2, k: 2, slots: vec![0, 1, 1, 2] };
        let mixed = gather_mean(&pool, &sel).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(mixed, vec![vec![1.0, 2.0], vec![4.0, 6.0]]);
    }

    #[test]
    fn cosine_and_matched_sum() {
        let q = t(&[1.0, 0.0, 0.0, 2.0], (2, 2));
        let k = t(&[3.0, 0.0, 0.0, 1.0, 1.0, 1.0], (3, 2));
        let sims = cosine_similarity(&q, &k).unwrap();
        let sel = top_k(&sims, 2).unwrap();
        assert_eq!(sel.slots, vec![0, 2, 1, 2]);
        let m = matched_cosine(&sims, &sel).unwrap().to_vec1::<f32>().unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((m[0] - (1.0 + h)).abs() < 1e-6 && (m[1] - (1.0 + h)).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn counter_reports_usage_and_entropy() {
        let mut c = SlotCounter::new(4);
        c.record(&Selection { batch: 2, k: 2, slots: vec![0, 1, 1, 0] });
        assert_eq!(c.usage().unwrap(), SlotUsage { slots: vec![0, 1], counts: vec![2, 2] });
        assert!((c.entropy_bits() - 1.0).abs() < 1e-12);
        assert_eq!(c.total(), 4);
        assert_eq!(SlotCounter::new(3).usage(), None);
    }
}
