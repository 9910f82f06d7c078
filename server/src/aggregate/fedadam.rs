//! FedAdam, the server optimiser of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
//! Algorithm 2 with the Adam update.
//!
//! The round's combined delta Δ (the weighted mean, or trimmed mean, of the client deltas) is a
//! pseudo-gradient; per coordinate
//!
//! ```text
//! m ← β1 m + (1 − β1) Δ
//! v ← β2 v + (1 − β2) Δ²
//! x ← x + η m / (√v + τ)
//! ```
//!
//! with m starting at 0 and v at τ² (the paper's initialisation asks v₋₁ ≥ τ²). As in the paper
//! there is no bias correction. Rows of a pooled tensor that no client carried this round (an SSF
//! slot nobody used) have no pseudo-gradient: their value and their moments stay as they were
//! ("lazy" Adam), rather than decaying m toward 0 and moving the slot anyway.
//!
//! The moments live in the aggregator across rounds. The store persists them as named tensors,
//! `fedadam.m.<tensor>` and `fedadam.v.<tensor>` (see `Merge::server_state`), next to the pool
//! they belong to, and restores them with `Merge::load_server_state` on resume.

use std::collections::BTreeMap;

use fedpool_common::adapter::PoolError;
use fedpool_common::HostTensor;

use super::AggregateError;

/// Reddi et al. 2021, Section 5: β1 = 0.9 in all their adaptive-optimiser experiments.
pub const FEDADAM_BETA1: f64 = 0.9;
/// Reddi et al. 2021, Section 5: β2 = 0.99 in all their adaptive-optimiser experiments.
pub const FEDADAM_BETA2: f64 = 0.99;
/// Server learning rate η. Reddi et al. 2021 tune η per task over powers of ten (their appendix
/// lists the best value per task, which varies); 10⁻² is a default inside that grid, to be tuned.
pub const FEDADAM_LR: f64 = 1e-2;
/// Adaptivity τ. Reddi et al. 2021 tune τ per task over powers of ten as well; 10⁻³ is a default
/// inside their grid, to be tuned.
pub const FEDADAM_TAU: f64 = 1e-3;
/// Name prefix of the first-moment tensors in [`super::Merge::server_state`].
pub const FEDADAM_M_PREFIX: &str = "fedadam.m.";
/// Name prefix of the second-moment tensors in [`super::Merge::server_state`].
pub const FEDADAM_V_PREFIX: &str = "fedadam.v.";

/// FedAdam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAdamConfig {
    /// Server learning rate η.
    pub lr: f64,
    /// First-moment decay β1 in [0, 1).
    pub beta1: f64,
    /// Second-moment decay β2 in [0, 1).
    pub beta2: f64,
    /// Adaptivity τ > 0 (Adam's ε).
    pub tau: f64,
}

impl Default for FedAdamConfig {
    /// η = 10⁻², β1 = 0.9, β2 = 0.99, τ = 10⁻³ (see the constants for their sources).
    fn default() -> Self {
        Self { lr: FEDADAM_LR, beta1: FEDADAM_BETA1, beta2: FEDADAM_BETA2, tau: FEDADAM_TAU }
    }
}

impl FedAdamConfig {
    /// Checks the ranges: η > 0, β1 and β2 in [0, 1), τ > 0, all finite.
    pub fn validate(&self) -> Result<(), AggregateError> {
        let ok = self.lr.is_finite()
            && self.lr > 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.tau.is_finite()
            && self.tau > 0.0;
        if ok {
            Ok(())
        } else {
            Err(AggregateError::Setting {
                setting: "FedAdam",
                problem: format!("needs lr > 0, beta1 and beta2 in [0, 1), tau > 0; got {self:?}"),
            })
        }
    }

    /// One coordinate's step: the new (m, v) and the increment of the parameter.
    #[inline]
    fn step(&self, m: f32, v: f32, delta: f64) -> (f64, f64, f64) {
        let m = self.beta1 * f64::from(m) + (1.0 - self.beta1) * delta;
        let v = self.beta2 * f64::from(v) + (1.0 - self.beta2) * delta * delta;
        (m, v, self.lr * m / (v.sqrt() + self.tau))
    }
}

/// The moments of every non-LoRA tensor.
#[derive(Debug)]
pub(super) struct FedAdamState {
    cfg: FedAdamConfig,
    m: BTreeMap<String, HostTensor>,
    v: BTreeMap<String, HostTensor>,
}

impl FedAdamState {
    /// Moments for tensors of these names and shapes: m = 0, v = τ².
    pub(super) fn new(cfg: FedAdamConfig, tensors: impl Iterator<Item = (String, Vec<usize>)>) -> Self {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, shape) in tensors {
            m.insert(name.clone(), HostTensor::zeros(&shape));
            v.insert(name, HostTensor::full(&shape, (cfg.tau * cfg.tau) as f32));
        }
        Self { cfg, m, v }
    }

    /// Adds this round's step to `y` (the tensor `name` of the next pool) without changing the
    /// moments; [`FedAdamState::advance`] then stores the same moments once the round is safe.
    pub(super) fn step_into<'a>(
        &self,
        name: &str,
        y: &mut [f32],
        rows: impl Fn(usize) -> Option<(&'a [f32], f32)>,
        row_len: usize,
    ) {
        let (Some(m), Some(v)) = (self.m.get(name), self.v.get(name)) else { return };
        let n_rows = y.len().checked_div(row_len).unwrap_or(0);
        for row in 0..n_rows {
            let Some((x, s)) = rows(row) else { continue };
            let span = row * row_len..(row + 1) * row_len;
            let (m, v) = (&m.data()[span.clone()], &v.data()[span.clone()]);
            for (j, y) in y[span].iter_mut().enumerate() {
                let (_, _, inc) = self.cfg.step(m[j], v[j], f64::from(x[j]) * f64::from(s));
                *y = (f64::from(*y) + inc) as f32;
            }
        }
    }

    /// Stores the moments after this round's pseudo-gradient (the same ones `step_into` used).
    pub(super) fn advance<'a>(
        &mut self,
        name: &str,
        rows: impl Fn(usize) -> Option<(&'a [f32], f32)>,
        n_rows: usize,
        row_len: usize,
    ) {
        let cfg = self.cfg;
        let (Some(m), Some(v)) = (self.m.get_mut(name), self.v.get_mut(name)) else { return };
        for row in 0..n_rows {
            let Some((x, s)) = rows(row) else { continue };
            let span = row * row_len..(row + 1) * row_len;
            let (m, v) = (&mut m.data_mut()[span.clone()], &mut v.data_mut()[span]);
            for j in 0..row_len {
                let (mn, vn, _) = cfg.step(m[j], v[j], f64::from(x[j]) * f64::from(s));
                m[j] = mn as f32;
                v[j] = vn as f32;
            }
        }
    }

    /// The moments as named tensors (`fedadam.m.<tensor>`, `fedadam.v.<tensor>`).
    pub(super) fn to_named(&self) -> BTreeMap<String, HostTensor> {
        let m = self.m.iter().map(|(k, t)| (format!("{FEDADAM_M_PREFIX}{k}"), t.clone()));
        let v = self.v.iter().map(|(k, t)| (format!("{FEDADAM_V_PREFIX}{k}"), t.clone()));
        m.chain(v).collect()
    }

    /// Replaces the moments by named tensors as `to_named` writes them, after checking all of
    /// them (nothing changes on error).
    pub(super) fn load_named(&mut self, state: &BTreeMap<String, HostTensor>) -> Result<(), AggregateError> {
        for (prefix, map, non_negative) in [(FEDADAM_M_PREFIX, &self.m, false), (FEDADAM_V_PREFIX, &self.v, true)] {
            for (name, cur) in map {
                let key = format!("{prefix}{name}");
                let Some(t) = state.get(&key) else {
                    return Err(AggregateError::ServerState(PoolError::MissingTensor(key)));
                };
                if t.shape() != cur.shape() {
                    let (got, expected) = (t.shape().to_vec(), format!("{:?}", cur.shape()));
                    return Err(AggregateError::ServerState(PoolError::BadShape { name: key, got, expected }));
                }
                if !t.all_finite() {
                    return Err(AggregateError::ServerState(PoolError::NonFinite(key)));
                }
                if non_negative && t.data().iter().any(|&x| x < 0.0) {
                    return Err(AggregateError::NegativeMoment(key));
                }
            }
        }
        let known = |key: &str| {
            key.strip_prefix(FEDADAM_M_PREFIX).is_some_and(|n| self.m.contains_key(n))
                || key.strip_prefix(FEDADAM_V_PREFIX).is_some_and(|n| self.v.contains_key(n))
        };
        if let Some(key) = state.keys().find(|k| !known(k)) {
            return Err(AggregateError::ServerState(PoolError::UnknownTensor(key.clone())));
        }
        for (name, t) in self.m.iter_mut() {
            *t = state[&format!("{FEDADAM_M_PREFIX}{name}")].clone();
        }
        for (name, t) in self.v.iter_mut() {
            *t = state[&format!("{FEDADAM_V_PREFIX}{name}")].clone();
        }
        Ok(())
    }
}
