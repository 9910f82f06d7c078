//! HetLoRA's zero-padding average (Cho et al., 2024, "Heterogeneous LoRA for Federated
//! Fine-tuning of On-Device Foundation Models"), the baseline the exact merge is compared with.
//!
//! Client `k` trains the global's first `r_k` triplets and sends their difference; the server pads
//! each client's factors `A_k = A[:r_k] + ΔA_k`, `E_k`, `B_k` with zeros up to `max_rank` and
//! averages them factor by factor, weighted by examples, over the clients that sent the target:
//!
//! ```text
//! A_new = Σ_k w_k pad(A_k) / Σ_k w_k      (the same for E and B)
//! ```
//!
//! Triplets beyond a client's rank count as zero for it, so the higher ranks shrink toward zero
//! when small-rank clients take part (the dilution the exact merge avoids), and averaging factors
//! is not averaging products. Plain tensors (the head) are merged by the wrapped [`Aggregator`].

use std::collections::BTreeMap;

use fedpool_common::adapter::PoolError;
use fedpool_common::{AdapterPool, HostTensor, PoolDelta, PoolSpec};

use super::{AggregateConfig, AggregateError, Aggregator, Merge};

/// One LoRA factor's running sum of padded, weighted client factors.
#[derive(Debug)]
struct Factor {
    name: String,
    target: String,
    rows: usize,
    cols: usize,
    sum: Vec<f64>,
}

/// The zero-padding average for LoRA pools; see the module documentation.
#[derive(Debug)]
pub struct ZeroPadLora {
    inner: Aggregator,
    spec: PoolSpec,
    factors: Vec<Factor>,
    /// Σ examples of the clients that sent each target this round.
    weights: BTreeMap<String, f64>,
    /// The global's factors at `begin`.
    base: BTreeMap<String, HostTensor>,
}

impl ZeroPadLora {
    /// A zero-padding merge for the LoRA pool `spec`; the head is merged by an [`Aggregator`] with
    /// `config`.
    pub fn new(spec: PoolSpec, config: AggregateConfig) -> Result<Self, AggregateError> {
        if spec.kind != fedpool_common::AdapterKind::AdaLora {
            return Err(AggregateError::Unsupported("the zero-padding average needs an AdaLoRA spec"));
        }
        let factors = spec
            .layout()
            .into_iter()
            .filter_map(|l| {
                let target = l.target?;
                Some(Factor { name: l.name, target, rows: l.shape[0], cols: l.shape[1], sum: Vec::new() })
            })
            .collect();
        Ok(Self {
            inner: Aggregator::new(spec.clone(), config)?,
            spec,
            factors,
            weights: BTreeMap::new(),
            base: BTreeMap::new(),
        })
    }
}

impl Merge for ZeroPadLora {
    fn begin(&mut self, global: &AdapterPool) -> Result<(), AggregateError> {
        self.inner.begin(global)?;
        self.weights.clear();
        self.base.clear();
        for f in &mut self.factors {
            f.sum.clear();
            f.sum.resize(f.rows * f.cols, 0.0);
            let missing = || AggregateError::Global(PoolError::MissingTensor(f.name.clone()));
            let t = global.tensors.get(&f.name).ok_or_else(missing)?;
            self.base.insert(f.name.clone(), t.clone());
        }
        Ok(())
    }

    fn fold(&mut self, delta: &PoolDelta, examples: u64) -> Result<(), AggregateError> {
        self.fold_weighted(delta, examples, examples)
    }

    fn fold_weighted(&mut self, delta: &PoolDelta, examples: u64, weight: u64) -> Result<(), AggregateError> {
        delta.validate(&self.spec).map_err(AggregateError::Update)?;
        // The head goes to the wrapped aggregator first: if it refuses, nothing here changed.
        let plain = PoolDelta {
            spec_hash: delta.spec_hash,
            slots: None,
            tensors: delta
                .tensors
                .iter()
                .filter(|(name, _)| !self.factors.iter().any(|f| &f.name == *name))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
        };
        self.inner.fold_weighted(&plain, examples, weight)?;
        let w = weight as f64;
        for f in &mut self.factors {
            let Some(d) = delta.tensors.get(&f.name) else { continue };
            let (&[rows, cols], Some(base)) = (d.shape(), self.base.get(&f.name)) else {
                let (name, got, expected) = (f.name.clone(), d.shape().to_vec(), "a 2-D factor".into());
                return Err(AggregateError::Update(PoolError::BadShape { name, got, expected }));
            };
            for r in 0..rows {
                for c in 0..cols {
                    let value = base.data()[r * f.cols + c] + d.data()[r * cols + c];
                    f.sum[r * f.cols + c] += w * f64::from(value);
                }
            }
        }
        for target in delta.lora_ranks(&self.spec).into_keys() {
            *self.weights.entry(target).or_insert(0.0) += w;
        }
        Ok(())
    }

    fn finish(&mut self, global: &AdapterPool) -> Result<AdapterPool, AggregateError> {
        let mut pool = self.inner.finish(global)?;
        for f in &self.factors {
            let Some(&w) = self.weights.get(&f.target).filter(|&&w| w > 0.0) else { continue };
            let data: Vec<f32> = f.sum.iter().map(|s| (s / w) as f32).collect();
            if !data.iter().all(|v| v.is_finite()) {
                return Err(AggregateError::NotFinite(format!("the zero-padding average of {:?}", f.name)));
            }
            let t = HostTensor::new(vec![f.rows, f.cols], data)?;
            pool.tensors.insert(f.name.clone(), t);
        }
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use fedpool_common::adapter::{HeadSpec, TargetSpec};

    use super::*;

    fn spec() -> PoolSpec {
        let targets = vec![TargetSpec { name: "q".into(), dim_in: 3, dim_out: 2 }];
        PoolSpec::adalora(targets, 2, 4.0, Some(HeadSpec::new(3, 2)))
    }

    fn delta(spec: &PoolSpec, rank: usize, a: f32) -> PoolDelta {
        let zero = AdapterPool::zeros(spec).to_transfer(spec).unwrap();
        let mut d = zero.truncate_lora(spec, &BTreeMap::from([("q".to_string(), rank)])).unwrap();
        for t in d.tensors.values_mut() {
            *t = HostTensor::new(t.shape().to_vec(), vec![a; t.numel()]).unwrap();
        }
        d
    }

    #[test]
    fn ranks_beyond_a_clients_budget_count_as_zero() {
        let spec = spec();
        let global = AdapterPool::zeros(&spec);
        let mut m = ZeroPadLora::new(spec.clone(), AggregateConfig::default()).unwrap();
        m.begin(&global).unwrap();
        m.fold(&delta(&spec, 2, 1.0), 1).unwrap(); // rank 2, factors all 1
        m.fold(&delta(&spec, 1, 3.0), 3).unwrap(); // rank 1, factors all 3
        let out = m.finish(&global).unwrap();
        // Row 0 of A: (1·1 + 3·3) / 4 = 2.5; row 1: (1·1 + 3·0) / 4 = 0.25.
        assert_eq!(out.tensors["q.lora_A.weight"].data(), &[2.5, 2.5, 2.5, 0.25, 0.25, 0.25]);
        // B [2, 2]: column 0 averaged over both, column 1 diluted.
        assert_eq!(out.tensors["q.lora_B.weight"].data(), &[2.5, 0.25, 2.5, 0.25]);
        // The head is plain FedAvg of the deltas: (1 + 9) / 4.
        assert!(out.tensors[fedpool_common::adapter::HEAD_BIAS].data().iter().all(|&v| v == 2.5));
    }
}
