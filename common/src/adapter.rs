//! Adapter pools: what clients train and the server merges.
//!
//! A [`PoolSpec`] says which adapter is trained (an SSF pool as in FedIns, LoRA in PEFT's standard
//! form, or LoRA in AdaLoRA's SVD form), on which targets and with which sizes. It determines the names and shapes of every
//! tensor (its [`PoolSpec::layout`]). An [`AdapterPool`] holds those tensors; a [`PoolDelta`] is
//! what a client sends back: the difference from the pool it started from, for the slots it used.
//!
//! Tensor names (HF module paths, so that LoRA maps to HF PEFT names):
//! - SSF at target `T` (after the op `T`): `T.ssf_scale` and `T.ssf_shift`, shape `[P, d_out]`;
//! - pool keys: `pool.keys`, shape `[P, key_dim]` (SSF pools with P > 1 only);
//! - standard LoRA on linear `T` (ΔW = B·A · α/r): `T.lora_A.weight` `[r, d_in]` and
//!   `T.lora_B.weight` `[d_out, r]` — PEFT LoRA's names, so PEFT adapters map one to one;
//! - AdaLoRA on linear `T` (ΔW = B·diag(E)·A · α/r): `T.lora_A.weight` `[r, d_in]` (Q),
//!   `T.lora_E.weight` `[r, 1]` (Λ) and `T.lora_B.weight` `[d_out, r]` (P) — PEFT AdaLoRA's names;
//! - the classification head: `classifier.weight` `[labels, d_in]` and `classifier.bias`
//!   `[labels]`, with a leading pool axis `[P, ...]` in SSF pools (the head is a pool too).

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::ids::{Sha256, SpecHash};
use crate::tensor::HostTensor;

/// FedIns default (Feng et al., ICCV 2023): 25 slots per pool.
pub const FEDINS_POOL_SIZE: usize = 25;
/// FedIns default (Feng et al., ICCV 2023): each instance mixes its top 3 slots.
pub const FEDINS_TOP_K: usize = 3;
/// SSF initialisation (Lian et al., NeurIPS 2022, official code): γ ~ N(1, 0.02²), β ~ N(0, 0.02²).
pub const SSF_INIT_STD: f32 = 0.02;
/// AdaLoRA initialisation (HF PEFT `tuners/adalora`): A and B ~ N(0, 0.02²), E = 0.
pub const LORA_INIT_STD: f32 = 0.02;
// Standard LoRA follows PEFT's `reset_lora_parameters` instead: A Kaiming-uniform with a = √5
// (uniform in ±1/√d_in), B = 0, so ΔW = 0 and B learns from the first step.
/// Name of the pool keys tensor.
pub const KEYS: &str = "pool.keys";
/// Name of the classification head's weight.
pub const HEAD_WEIGHT: &str = "classifier.weight";
/// Name of the classification head's bias.
pub const HEAD_BIAS: &str = "classifier.bias";

/// Which adapter a pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdapterKind {
    /// SSF scale-and-shift after each target; with `pool_size > 1` a FedIns pool of slots
    /// selected per instance by key; with `pool_size == 1` plain SSF.
    SsfPool,
    /// LoRA in PEFT's standard form on linear targets: ΔW = B·A·α/r, A Kaiming-uniform, B = 0.
    Lora,
    /// LoRA in AdaLoRA's SVD form (ΔW = P·diag(λ)·Q·α/r, λ = 0 at the start): the form rank
    /// budgets cut by triplet, and the exact product merge re-factorises.
    AdaLora,
}

impl AdapterKind {
    /// True for both LoRA forms.
    pub fn is_lora(self) -> bool {
        matches!(self, AdapterKind::Lora | AdapterKind::AdaLora)
    }
}

/// One adapted point of the backbone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// The module path, e.g. `encoder.layer.0.attention.self.query`.
    pub name: String,
    /// Input width of the op (LoRA's `d_in`; unused by SSF).
    pub dim_in: usize,
    /// Output width of the op (SSF's width, LoRA's `d_out`).
    pub dim_out: usize,
}

/// The sentence feature a classification head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The masked mean of the last hidden state (sentence-transformers).
    #[default]
    Mean,
    /// HF `BertForSequenceClassification`'s: the frozen pretrained pooler `tanh(dense(h_[CLS]))`.
    ClsPooler,
}

impl Pooling {
    /// The name in configuration files and on the command line: `mean`, `cls-pooler`.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::ClsPooler => "cls-pooler",
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Pooling::Mean, Pooling::ClsPooler]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| SpecError(format!("unknown pooling {s:?}: expected mean or cls-pooler")))
    }
}

/// The classification head trained with the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSpec {
    /// Width of the pooled feature the head reads.
    pub dim_in: usize,
    /// Number of classes.
    pub num_labels: usize,
    /// The feature it reads (part of the spec: a federation's clients must agree on it).
    #[serde(default)]
    pub pooling: Pooling,
}

impl HeadSpec {
    /// A head of `num_labels` classes on the `dim_in`-wide mean-pooled feature.
    pub fn new(dim_in: usize, num_labels: usize) -> Self {
        Self { dim_in, num_labels, pooling: Pooling::Mean }
    }
}

/// Everything that fixes the names and shapes of a pool's tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// SSF pool or LoRA.
    pub kind: AdapterKind,
    /// Slots per pool, P (1 for plain SSF and for LoRA).
    pub pool_size: usize,
    /// Slots mixed per instance (FedIns' k); 1 when there is no selection.
    pub top_k: usize,
    /// Width of the selection query and keys (the backbone's pooled feature); 0 when P = 1.
    pub key_dim: usize,
    /// The adapted points.
    pub targets: Vec<TargetSpec>,
    /// LoRA's maximum (initial) rank per target; 0 for SSF.
    pub max_rank: usize,
    /// LoRA's α (ΔW is scaled by α / r); 0 for SSF.
    pub lora_alpha: f32,
    /// The classification head, if one is trained.
    pub head: Option<HeadSpec>,
}

/// How one tensor of a pool relates to the pool's structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// Leading axis is the pool slot (SSF pools: scale, shift, keys, head).
    Pooled,
    /// A plain tensor (LoRA's head).
    Plain,
    /// LoRA's A = Q, `[r, d_in]`; rank is the first axis.
    LoraA,
    /// LoRA's E = Λ, `[r, 1]`; rank is the first axis.
    LoraE,
    /// LoRA's B = P, `[d_out, r]`; rank is the last axis.
    LoraB,
}

/// The name, full shape and role of one tensor of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    /// The tensor's name.
    pub name: String,
    /// Its shape in a full pool (all slots, max rank).
    pub shape: Vec<usize>,
    /// How it relates to slots and ranks.
    pub role: TensorRole,
    /// For LoRA factors, the target they belong to.
    pub target: Option<String>,
}

/// A spec that cannot describe a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pool spec: {0}")]
pub struct SpecError(pub String);

impl PoolSpec {
    /// A FedIns SSF pool of `pool_size` slots with keys of width `key_dim`, mixing `top_k` per
    /// instance.
    pub fn ssf_pool(
        targets: Vec<TargetSpec>,
        key_dim: usize,
        pool_size: usize,
        top_k: usize,
        head: Option<HeadSpec>,
    ) -> Self {
        let key_dim = if pool_size > 1 { key_dim } else { 0 };
        Self { kind: AdapterKind::SsfPool, pool_size, top_k, key_dim, targets, max_rank: 0, lora_alpha: 0.0, head }
    }

    /// Plain SSF: one slot, no keys, no selection.
    pub fn ssf(targets: Vec<TargetSpec>, head: Option<HeadSpec>) -> Self {
        Self::ssf_pool(targets, 0, 1, 1, head)
    }

    /// LoRA in PEFT's standard form (B·A) with rank `rank` per target and scale `alpha / rank`.
    pub fn lora(targets: Vec<TargetSpec>, rank: usize, alpha: f32, head: Option<HeadSpec>) -> Self {
        Self { kind: AdapterKind::Lora, ..Self::adalora(targets, rank, alpha, head) }
    }

    /// LoRA in AdaLoRA's SVD form with `rank` triplets per target and scale `alpha / rank`.
    pub fn adalora(targets: Vec<TargetSpec>, rank: usize, alpha: f32, head: Option<HeadSpec>) -> Self {
        Self {
            kind: AdapterKind::AdaLora,
            pool_size: 1,
            top_k: 1,
            key_dim: 0,
            targets,
            max_rank: rank,
            lora_alpha: alpha,
            head,
        }
    }

    /// True for an SSF pool with selection (P > 1).
    pub fn has_keys(&self) -> bool {
        self.kind == AdapterKind::SsfPool && self.pool_size > 1
    }

    /// Checks that the spec describes a pool.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |m: String| Err(SpecError(m));
        if self.pool_size == 0 {
            return err("pool_size must be at least 1".into());
        }
        if self.top_k == 0 || self.top_k > self.pool_size {
            return err(format!("top_k {} must be in 1..={}", self.top_k, self.pool_size));
        }
        if self.has_keys() && self.key_dim == 0 {
            return err("an SSF pool with more than one slot needs key_dim > 0".into());
        }
        if self.kind.is_lora() {
            if self.pool_size != 1 {
                return err("LoRA pools have exactly one slot".into());
            }
            if self.max_rank == 0 {
                return err("LoRA needs max_rank >= 1".into());
            }
            if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
                return err(format!("lora_alpha {} must be positive", self.lora_alpha));
            }
        }
        if self.targets.is_empty() {
            return err("no targets".into());
        }
        let mut seen = BTreeSet::new();
        for t in &self.targets {
            if !seen.insert(t.name.as_str()) {
                return err(format!("target {:?} appears twice", t.name));
            }
            if t.dim_out == 0 || (self.kind.is_lora() && t.dim_in == 0) {
                return err(format!("target {:?} has a zero dimension", t.name));
            }
        }
        if let Some(h) = self.head {
            if h.dim_in == 0 || h.num_labels < 2 {
                return err(format!("head needs dim_in > 0 and at least 2 labels, got {h:?}"));
            }
        }
        Ok(())
    }

    /// The SHA-256 of the spec's canonical JSON.
    pub fn hash(&self) -> SpecHash {
        // Serialising a plain struct of numbers and strings to JSON cannot fail.
        let json = serde_json::to_vec(self).expect("PoolSpec serialises to JSON");
        SpecHash(Sha256::of(&json))
    }

    /// Every tensor of a full pool, in a fixed order: targets in spec order, then keys, then head.
    pub fn layout(&self) -> Vec<TensorLayout> {
        let p = self.pool_size;
        let mut out = Vec::new();
        let plain = |name: String, shape: Vec<usize>, role| TensorLayout { name, shape, role, target: None };
        for t in &self.targets {
            match self.kind {
                AdapterKind::SsfPool => {
                    out.push(plain(format!("{}.ssf_scale", t.name), vec![p, t.dim_out], TensorRole::Pooled));
                    out.push(plain(format!("{}.ssf_shift", t.name), vec![p, t.dim_out], TensorRole::Pooled));
                }
                AdapterKind::Lora | AdapterKind::AdaLora => {
                    let r = self.max_rank;
                    let lora = |suffix: &str, shape: Vec<usize>, role| TensorLayout {
                        name: format!("{}.{suffix}.weight", t.name),
                        shape,
                        role,
                        target: Some(t.name.clone()),
                    };
                    out.push(lora("lora_A", vec![r, t.dim_in], TensorRole::LoraA));
                    if self.kind == AdapterKind::AdaLora {
                        out.push(lora("lora_E", vec![r, 1], TensorRole::LoraE));
                    }
                    out.push(lora("lora_B", vec![t.dim_out, r], TensorRole::LoraB));
                }
            }
        }
        if self.has_keys() {
            out.push(plain(KEYS.into(), vec![p, self.key_dim], TensorRole::Pooled));
        }
        if let Some(h) = self.head {
            if self.kind == AdapterKind::SsfPool {
                out.push(plain(HEAD_WEIGHT.into(), vec![p, h.num_labels, h.dim_in], TensorRole::Pooled));
                out.push(plain(HEAD_BIAS.into(), vec![p, h.num_labels], TensorRole::Pooled));
            } else {
                out.push(plain(HEAD_WEIGHT.into(), vec![h.num_labels, h.dim_in], TensorRole::Plain));
                out.push(plain(HEAD_BIAS.into(), vec![h.num_labels], TensorRole::Plain));
            }
        }
        out
    }

    /// The number of trainable values in a full pool.
    pub fn num_params(&self) -> usize {
        self.layout().iter().map(|l| l.shape.iter().product::<usize>()).sum()
    }
}

/// How a fresh pool is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitOptions {
    /// Standard deviation of SSF's γ around 1 and β around 0 (0 gives the identity).
    pub ssf_std: f32,
    /// Standard deviation of AdaLoRA's A and B (E starts at 0 whatever this is; standard LoRA
    /// uses PEFT's initialisation instead).
    pub lora_std: f32,
    /// Standard deviation of the head's weight (its bias starts at 0).
    pub head_std: f32,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self { ssf_std: SSF_INIT_STD, lora_std: LORA_INIT_STD, head_std: 0.02 }
    }
}

/// A pool or delta that does not fit its spec.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    /// The spec itself is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The pool or delta was made for another spec.
    #[error("spec hash {got} does not match the expected {expected}")]
    SpecHashMismatch {
        /// The expected spec hash.
        expected: SpecHash,
        /// The spec hash carried.
        got: SpecHash,
    },
    /// A tensor the spec does not have.
    #[error("unknown tensor {0:?}")]
    UnknownTensor(String),
    /// A tensor the spec requires is absent.
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    /// A tensor with the wrong shape.
    #[error("tensor {name:?} has shape {got:?}, expected {expected}")]
    BadShape {
        /// The tensor's name.
        name: String,
        /// Its shape.
        got: Vec<usize>,
        /// What was expected, in words (slot counts and ranks may vary).
        expected: String,
    },
    /// A NaN or infinite value.
    #[error("tensor {0:?} holds a NaN or infinite value")]
    NonFinite(String),
    /// The slot list of a delta is malformed.
    #[error("bad slot list: {0}")]
    BadSlots(String),
}

/// The trainable tensors of one adapter: a full pool (all slots, max rank).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterPool {
    /// The spec these tensors follow.
    pub spec_hash: SpecHash,
    /// The tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
}

/// Normal samples by Box–Muller (two uniforms per pair; one kept, for simplicity and determinism).
fn normal(rng: &mut ChaCha8Rng, mean: f32, std: f32) -> f32 {
    if std == 0.0 {
        return mean;
    }
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    mean + std * z as f32
}

impl AdapterPool {
    /// A fresh pool, initialised as docs/design.md says ("Initialisation"): SSF γ ~ N(1, σ²), β ~ N(0, σ²); keys uniform in
    /// [-1, 1] (as L2P does — FedIns' zero keys make the first selection arbitrary); AdaLoRA A, B
    /// random and E = 0; standard LoRA as PEFT (A uniform in ±1/√d_in, B = 0): ΔW = 0 either way;
    /// head weight random, bias 0. Deterministic in `seed`.
    pub fn init(spec: &PoolSpec, seed: u64) -> Result<Self, PoolError> {
        Self::init_with(spec, seed, &InitOptions::default())
    }

    /// As [`AdapterPool::init`] with explicit standard deviations.
    pub fn init_with(spec: &PoolSpec, seed: u64, opts: &InitOptions) -> Result<Self, PoolError> {
        spec.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for l in spec.layout() {
            let n: usize = l.shape.iter().product();
            let data: Vec<f32> = if l.name.ends_with(".ssf_scale") {
                (0..n).map(|_| normal(&mut rng, 1.0, opts.ssf_std)).collect()
            } else if l.name.ends_with(".ssf_shift") {
                (0..n).map(|_| normal(&mut rng, 0.0, opts.ssf_std)).collect()
            } else if l.name == KEYS {
                (0..n).map(|_| rng.random_range(-1.0f32..=1.0)).collect()
            } else if l.name == HEAD_WEIGHT {
                (0..n).map(|_| normal(&mut rng, 0.0, opts.head_std)).collect()
            } else if spec.kind == AdapterKind::Lora && l.role == TensorRole::LoraA {
                // PEFT: kaiming_uniform_(a=√5) on [r, d_in]: bound = √(6 / ((1 + a²)·d_in)) = 1/√d_in.
                let bound = 1.0 / (l.shape[1] as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
            } else if spec.kind == AdapterKind::AdaLora && (l.role == TensorRole::LoraA || l.role == TensorRole::LoraB)
            {
                (0..n).map(|_| normal(&mut rng, 0.0, opts.lora_std)).collect()
            } else {
                vec![0.0; n] // standard LoRA B, AdaLoRA E, head bias
            };
            // Lengths come from the layout itself.
            let t = HostTensor::new(l.shape.clone(), data).expect("layout shape matches data");
            tensors.insert(l.name, t);
        }
        Ok(Self { spec_hash: spec.hash(), tensors })
    }

    /// A pool of zeros with the spec's full shapes (the start of a running sum).
    pub fn zeros(spec: &PoolSpec) -> Self {
        let tensors = spec.layout().into_iter().map(|l| (l.name, HostTensor::zeros(&l.shape))).collect();
        Self { spec_hash: spec.hash(), tensors }
    }

    /// Checks names, shapes and finiteness against `spec`.
    pub fn validate(&self, spec: &PoolSpec) -> Result<(), PoolError> {
        let layout = checked_layout(spec, self.spec_hash, &self.tensors)?;
        for l in &layout {
            let t = self.tensors.get(&l.name).ok_or_else(|| PoolError::MissingTensor(l.name.clone()))?;
            if t.shape() != l.shape.as_slice() {
                return Err(PoolError::BadShape {
                    name: l.name.clone(),
                    got: t.shape().to_vec(),
                    expected: format!("{:?}", l.shape),
                });
            }
            if !t.all_finite() {
                return Err(PoolError::NonFinite(l.name.clone()));
            }
        }
        Ok(())
    }

    /// `self − start` over all slots: the delta a client would send had it used every slot.
    pub fn delta_from(&self, start: &AdapterPool) -> Result<PoolDelta, PoolError> {
        if self.spec_hash != start.spec_hash {
            return Err(PoolError::SpecHashMismatch { expected: start.spec_hash, got: self.spec_hash });
        }
        let mut tensors = BTreeMap::new();
        for (name, t) in &self.tensors {
            let s = start.tensors.get(name).ok_or_else(|| PoolError::MissingTensor(name.clone()))?;
            let mut d = t.clone();
            d.axpy(-1.0, s).map_err(|_| PoolError::BadShape {
                name: name.clone(),
                got: t.shape().to_vec(),
                expected: format!("{:?}", s.shape()),
            })?;
            tensors.insert(name.clone(), d);
        }
        Ok(PoolDelta { spec_hash: self.spec_hash, slots: None, tensors })
    }

    /// The pool as a delta from zero, the form a global pool travels in (`RoundTask::global`):
    /// for SSF pools every slot is listed (usage count 1 each), so the receiver can check it with
    /// the usual [`PoolDelta::validate`]; LoRA factors go whole.
    pub fn to_transfer(&self, spec: &PoolSpec) -> Result<PoolDelta, PoolError> {
        let delta = self.delta_from(&AdapterPool::zeros(spec))?;
        if spec.kind != AdapterKind::SsfPool {
            return Ok(delta);
        }
        let slots = u32::try_from(spec.pool_size).map_err(|_| PoolError::BadSlots("pool size exceeds u32".into()))?;
        delta.restrict_to_slots(SlotUsage { slots: (0..slots).collect(), counts: vec![1; spec.pool_size] })
    }

    /// The pool a [`AdapterPool::to_transfer`] delta describes, checked against `spec`: every
    /// slot and every plain tensor must be present; LoRA targets may come truncated to a granted
    /// rank ([`PoolDelta::truncate_lora`]) or be left out, their missing triplets zero.
    pub fn from_transfer(delta: &PoolDelta, spec: &PoolSpec) -> Result<AdapterPool, PoolError> {
        delta.validate(spec)?;
        if let Some(u) = &delta.slots {
            if u.slots.len() != spec.pool_size {
                return Err(PoolError::BadSlots(format!(
                    "a global pool lists {} of {} slots",
                    u.slots.len(),
                    spec.pool_size
                )));
            }
        }
        let mut pool = AdapterPool::zeros(spec);
        pool.apply_delta(delta)?;
        pool.validate(spec)?;
        Ok(pool)
    }

    /// Adds a delta to this pool in place: a full one, one restricted to slots, or one whose LoRA
    /// factors have a lower rank than the pool's (added into the leading rows of `A` and `E`
    /// and the leading columns of `B`: the first triplets).
    pub fn apply_delta(&mut self, delta: &PoolDelta) -> Result<(), PoolError> {
        if self.spec_hash != delta.spec_hash {
            return Err(PoolError::SpecHashMismatch { expected: self.spec_hash, got: delta.spec_hash });
        }
        for (name, d) in &delta.tensors {
            let t = self.tensors.get_mut(name).ok_or_else(|| PoolError::UnknownTensor(name.clone()))?;
            let full_shape = t.shape().to_vec();
            match &delta.slots {
                None if d.shape() == full_shape.as_slice() => t.axpy(1.0, d).map_err(|_| PoolError::BadShape {
                    name: name.clone(),
                    got: d.shape().to_vec(),
                    expected: format!("{full_shape:?}"),
                })?,
                None => add_leading_block(t, d).ok_or_else(|| PoolError::BadShape {
                    name: name.clone(),
                    got: d.shape().to_vec(),
                    expected: format!("{full_shape:?} or a leading block of it (a lower LoRA rank)"),
                })?,
                Some(slots) => {
                    if d.shape().first() != Some(&slots.slots.len()) || d.row_len() != t.row_len() {
                        return Err(PoolError::BadShape {
                            name: name.clone(),
                            got: d.shape().to_vec(),
                            expected: format!("[{}, ..] rows of {:?}", slots.slots.len(), full_shape),
                        });
                    }
                    for (i, &slot) in slots.slots.iter().enumerate() {
                        let slot = slot as usize;
                        if slot >= full_shape[0] {
                            return Err(PoolError::BadSlots(format!("slot {slot} out of range")));
                        }
                        for (y, x) in t.row_mut(slot).iter_mut().zip(d.row(i)) {
                            *y += x;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Adds the 2-D `d` into the leading `d.rows × d.cols` block of the 2-D `t` (None: not 2-D, or
/// larger than `t`).
fn add_leading_block(t: &mut HostTensor, d: &HostTensor) -> Option<()> {
    let (&[rows, cols], &[t_rows, t_cols]) = (d.shape(), t.shape()) else { return None };
    if rows > t_rows || cols > t_cols {
        return None;
    }
    for r in 0..rows {
        for (y, x) in t.row_mut(r)[..cols].iter_mut().zip(&d.data()[r * cols..(r + 1) * cols]) {
            *y += x;
        }
    }
    Some(())
}

/// Which pool slots a delta carries and how many of the client's examples selected each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotUsage {
    /// Slot indices, strictly increasing.
    pub slots: Vec<u32>,
    /// Examples that selected each slot (same length as `slots`, each ≥ 1).
    pub counts: Vec<u64>,
}

/// What a client sends: the difference from the pool it started from.
///
/// In an SSF pool (`slots` is `Some`), every tensor holds only the rows of the slots the client
/// used, in the order of `slots`; unused slots are absent, not zero. For LoRA (`slots` is
/// `None`) each target's triplet may have any rank from 1 to the spec's `max_rank` (the rank the
/// server granted), and a target may be left out whole; a standard LoRA target may also carry
/// only one of its factors (the other was frozen: FFA-LoRA, RoLoRA).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolDelta {
    /// The spec these tensors follow.
    pub spec_hash: SpecHash,
    /// For SSF pools, the slots carried and their usage counts.
    pub slots: Option<SlotUsage>,
    /// The tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
}

/// The spec's layout, after checking the spec hash and that every tensor name is in it.
fn checked_layout(
    spec: &PoolSpec,
    got: SpecHash,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<Vec<TensorLayout>, PoolError> {
    let expected = spec.hash();
    if expected != got {
        return Err(PoolError::SpecHashMismatch { expected, got });
    }
    let layout = spec.layout();
    if let Some(name) = tensors.keys().find(|name| !layout.iter().any(|l| &l.name == *name)) {
        return Err(PoolError::UnknownTensor(name.clone()));
    }
    Ok(layout)
}

impl PoolDelta {
    /// Keeps only the rows of `usage.slots` (an SSF pool's delta over all slots → what is sent).
    pub fn restrict_to_slots(&self, usage: SlotUsage) -> Result<PoolDelta, PoolError> {
        if self.slots.is_some() {
            return Err(PoolError::BadSlots("delta is already restricted to slots".into()));
        }
        check_slot_list(&usage, usize::MAX)?;
        let mut tensors = BTreeMap::new();
        for (name, t) in &self.tensors {
            let rows = t.shape().first().copied().unwrap_or(0);
            let mut data = Vec::with_capacity(usage.slots.len() * t.row_len());
            for &s in &usage.slots {
                if s as usize >= rows {
                    return Err(PoolError::BadSlots(format!(
                        "slot {s} out of range for tensor {name:?} with {rows} rows"
                    )));
                }
                data.extend_from_slice(t.row(s as usize));
            }
            let mut shape = t.shape().to_vec();
            shape[0] = usage.slots.len();
            // The data was built from whole rows of the right width.
            tensors.insert(name.clone(), HostTensor::new(shape, data).expect("rows fill the shape"));
        }
        Ok(PoolDelta { spec_hash: self.spec_hash, slots: Some(usage), tensors })
    }

    /// Keeps the first `ranks[target]` triplets of each LoRA target (the rank a client was
    /// granted): rows of `A` and `E`, columns of `B`. A target not in `ranks` is kept as it is;
    /// a rank of 0 leaves the target out; a rank above the carried one keeps what is carried.
    /// Plain tensors pass whole.
    pub fn truncate_lora(&self, spec: &PoolSpec, ranks: &BTreeMap<String, usize>) -> Result<PoolDelta, PoolError> {
        let layout = checked_layout(spec, self.spec_hash, &self.tensors)?;
        let mut tensors = BTreeMap::new();
        for l in &layout {
            let Some(t) = self.tensors.get(&l.name) else { continue };
            let Some(r) = l.target.as_ref().and_then(|target| ranks.get(target)).copied() else {
                tensors.insert(l.name.clone(), t.clone());
                continue;
            };
            if r == 0 {
                continue;
            }
            let (&[rows, cols], true) = (t.shape(), l.target.is_some()) else {
                return Err(PoolError::BadShape {
                    name: l.name.clone(),
                    got: t.shape().to_vec(),
                    expected: "2-D".into(),
                });
            };
            let (shape, data) = match l.role {
                TensorRole::LoraB => {
                    let keep = r.min(cols);
                    (vec![rows, keep], t.data().chunks(cols).flat_map(|row| row[..keep].iter().copied()).collect())
                }
                _ => {
                    let keep = r.min(rows);
                    (vec![keep, cols], t.data()[..keep * cols].to_vec())
                }
            };
            // Whole rows (or row prefixes) of the right width fill the shape.
            tensors.insert(l.name.clone(), HostTensor::new(shape, data).expect("a leading block fills its shape"));
        }
        Ok(PoolDelta { spec_hash: self.spec_hash, slots: self.slots.clone(), tensors })
    }

    /// The rank each LoRA target carries (targets left out are absent).
    pub fn lora_ranks(&self, spec: &PoolSpec) -> BTreeMap<String, usize> {
        spec.layout()
            .into_iter()
            .filter(|l| l.role == TensorRole::LoraA)
            .filter_map(|l| Some((l.target?, self.tensors.get(&l.name)?.shape().first().copied()?)))
            .collect()
    }

    /// The number of values carried.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(HostTensor::numel).sum()
    }

    /// The L2 norm over all tensors.
    pub fn l2_norm(&self) -> f64 {
        self.tensors.values().map(|t| t.l2_norm().powi(2)).sum::<f64>().sqrt()
    }

    /// Checks the delta against `spec`: its spec hash, the slot list, every name known, every
    /// shape as the spec allows (slot rows; LoRA ranks consistent within a triplet and at most
    /// `max_rank`), every required tensor present, every value finite.
    pub fn validate(&self, spec: &PoolSpec) -> Result<(), PoolError> {
        let layout = checked_layout(spec, self.spec_hash, &self.tensors)?;
        let is_pool = spec.kind == AdapterKind::SsfPool;
        match (&self.slots, is_pool) {
            (Some(u), true) => check_slot_list(u, spec.pool_size)?,
            (None, true) => return Err(PoolError::BadSlots("an SSF pool delta must list its slots".into())),
            (Some(_), false) => return Err(PoolError::BadSlots("a LoRA delta has no slots".into())),
            (None, false) => {}
        }
        let mut ranks: BTreeMap<&str, usize> = BTreeMap::new();
        for l in &layout {
            let Some(t) = self.tensors.get(&l.name) else {
                if l.target.is_some() {
                    // A LoRA target may be left out whole; a partial triplet is caught below.
                    continue;
                }
                return Err(PoolError::MissingTensor(l.name.clone()));
            };
            let bad =
                |expected: String| PoolError::BadShape { name: l.name.clone(), got: t.shape().to_vec(), expected };
            let shape = t.shape();
            match l.role {
                TensorRole::Pooled => {
                    let n = self.slots.as_ref().map_or(0, |u| u.slots.len());
                    if shape.len() != l.shape.len() || shape[0] != n || shape[1..] != l.shape[1..] {
                        return Err(bad(format!("[{n}{}] ({n} slots)", tail(&l.shape[1..]))));
                    }
                }
                TensorRole::Plain => {
                    if shape != l.shape.as_slice() {
                        return Err(bad(format!("{:?}", l.shape)));
                    }
                }
                TensorRole::LoraA | TensorRole::LoraE | TensorRole::LoraB => {
                    let (rank_axis, fixed_axis) = if l.role == TensorRole::LoraB { (1, 0) } else { (0, 1) };
                    let r = if shape.len() == 2 { shape[rank_axis] } else { 0 };
                    let fixed_ok = shape.len() == 2 && shape[fixed_axis] == l.shape[fixed_axis];
                    let target = l.target.as_deref().unwrap_or_default();
                    let prev = *ranks.entry(target).or_insert(r);
                    if !fixed_ok || r == 0 || r > spec.max_rank || r != prev {
                        let mut want = l.shape.clone();
                        want[rank_axis] = prev.clamp(1, spec.max_rank);
                        return Err(bad(format!("{want:?} (rank 1..={}, one rank per triplet)", spec.max_rank)));
                    }
                }
            }
            if !t.all_finite() {
                return Err(PoolError::NonFinite(l.name.clone()));
            }
        }
        // A standard LoRA delta may carry one factor only (FFA-LoRA, RoLoRA: the other was frozen);
        // an AdaLoRA triplet is whole or absent.
        for l in layout.iter().filter(|l| l.target.is_some() && spec.kind == AdapterKind::AdaLora) {
            let target = l.target.as_deref().unwrap_or_default();
            if ranks.contains_key(target) && !self.tensors.contains_key(&l.name) {
                return Err(PoolError::MissingTensor(l.name.clone()));
            }
        }
        Ok(())
    }
}

fn tail(dims: &[usize]) -> String {
    dims.iter().map(|d| format!(", {d}")).collect()
}

fn check_slot_list(u: &SlotUsage, pool_size: usize) -> Result<(), PoolError> {
    if u.slots.len() != u.counts.len() {
        return Err(PoolError::BadSlots(format!("{} slots but {} counts", u.slots.len(), u.counts.len())));
    }
    if u.slots.is_empty() {
        return Err(PoolError::BadSlots("no slots".into()));
    }
    if !u.slots.windows(2).all(|w| w[0] < w[1]) {
        return Err(PoolError::BadSlots("slots must be strictly increasing".into()));
    }
    if let Some(&last) = u.slots.last() {
        if last as usize >= pool_size {
            return Err(PoolError::BadSlots(format!("slot {last} out of range for a pool of {pool_size}")));
        }
    }
    if u.counts.contains(&0) {
        return Err(PoolError::BadSlots("a carried slot must have a usage count of at least 1".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<TargetSpec> {
        vec![
            TargetSpec { name: "layer.0.query".into(), dim_in: 8, dim_out: 8 },
            TargetSpec { name: "layer.0.value".into(), dim_in: 8, dim_out: 6 },
        ]
    }
    fn head() -> Option<HeadSpec> {
        Some(HeadSpec::new(8, 3))
    }

    #[test]
    fn ssf_pool_initialises_as_designed() {
        let spec = PoolSpec::ssf_pool(targets(), 8, 25, 3, head());
        let pool = AdapterPool::init(&spec, 7).unwrap();
        pool.validate(&spec).unwrap();
        let scale = &pool.tensors["layer.0.query.ssf_scale"];
        assert_eq!(scale.shape(), &[25, 8]);
        let mean = scale.data().iter().sum::<f32>() / scale.numel() as f32;
        assert!((mean - 1.0).abs() < 0.01, "γ mean {mean}");
        assert!(scale.data().iter().any(|&v| v != 1.0), "γ is not exactly 1 everywhere");
        let shift = &pool.tensors["layer.0.value.ssf_shift"];
        assert!(shift.data().iter().all(|v| v.abs() < 0.2));
        let keys = &pool.tensors[KEYS];
        assert_eq!(keys.shape(), &[25, 8]);
        assert!(keys.l2_norm() > 1.0, "keys are random, not zero");
        assert!(keys.data().iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_eq!(pool.tensors[HEAD_WEIGHT].shape(), &[25, 3, 8]);
        assert_eq!(AdapterPool::init(&spec, 7).unwrap(), pool, "deterministic in the seed");
        assert_ne!(AdapterPool::init(&spec, 8).unwrap(), pool);
    }

    #[test]
    fn a_truncated_lora_transfer_rebuilds_the_leading_triplets_and_zeros_the_rest() {
        let spec = PoolSpec::adalora(targets(), 4, 8.0, head());
        let pool = AdapterPool::init(&spec, 3).unwrap();
        let ranks = BTreeMap::from([("layer.0.query".to_string(), 2), ("layer.0.value".to_string(), 0)]);
        let sent = pool.to_transfer(&spec).unwrap().truncate_lora(&spec, &ranks).unwrap();
        sent.validate(&spec).unwrap();
        assert_eq!(sent.lora_ranks(&spec), BTreeMap::from([("layer.0.query".to_string(), 2)]));
        assert_eq!(sent.tensors["layer.0.query.lora_B.weight"].shape(), &[8, 2]);
        let got = AdapterPool::from_transfer(&sent, &spec).unwrap();
        let (a, b) = (&got.tensors["layer.0.query.lora_A.weight"], &pool.tensors["layer.0.query.lora_A.weight"]);
        assert_eq!(&a.data()[..16], &b.data()[..16], "rows 0 and 1 of A kept");
        assert!(a.data()[16..].iter().all(|&v| v == 0.0), "rows 2 and 3 zero");
        let bq = &got.tensors["layer.0.query.lora_B.weight"];
        for (row, full) in bq.data().chunks(4).zip(pool.tensors["layer.0.query.lora_B.weight"].data().chunks(4)) {
            assert_eq!((&row[..2], &row[2..]), (&full[..2], &[0.0f32, 0.0][..]));
        }
        assert!(got.tensors["layer.0.value.lora_E.weight"].data().iter().all(|&v| v == 0.0), "left-out target zero");
        assert_eq!(got.tensors[HEAD_WEIGHT], pool.tensors[HEAD_WEIGHT]);
        // A block larger than the pool's is refused, naming the tensor.
        let mut too_big = sent.clone();
        too_big.tensors.insert("layer.0.query.lora_A.weight".into(), HostTensor::zeros(&[5, 8]));
        let err = AdapterPool::zeros(&spec).apply_delta(&too_big).unwrap_err().to_string();
        assert!(err.contains("layer.0.query.lora_A.weight"), "{err}");
    }

    #[test]
    fn identity_ssf_init() {
        let spec = PoolSpec::ssf(targets(), None);
        let opts = InitOptions { ssf_std: 0.0, ..Default::default() };
        let pool = AdapterPool::init_with(&spec, 1, &opts).unwrap();
        assert!(pool.tensors["layer.0.query.ssf_scale"].data().iter().all(|&v| v == 1.0));
        assert!(pool.tensors["layer.0.query.ssf_shift"].data().iter().all(|&v| v == 0.0));
        assert!(!pool.tensors.contains_key(KEYS), "plain SSF has no keys");
    }

    #[test]
    fn lora_initialises_in_svd_form_with_zero_lambda() {
        let spec = PoolSpec::adalora(targets(), 4, 8.0, head());
        let pool = AdapterPool::init(&spec, 3).unwrap();
        assert_eq!(pool.tensors["layer.0.value.lora_A.weight"].shape(), &[4, 8]);
        assert_eq!(pool.tensors["layer.0.value.lora_B.weight"].shape(), &[6, 4]);
        let e = &pool.tensors["layer.0.value.lora_E.weight"];
        assert_eq!(e.shape(), &[4, 1]);
        assert!(e.data().iter().all(|&v| v == 0.0));
        assert!(pool.tensors["layer.0.value.lora_A.weight"].l2_norm() > 0.0);
        assert_eq!(pool.tensors[HEAD_WEIGHT].shape(), &[3, 8]);
    }

    #[test]
    fn standard_lora_initialises_as_peft_with_zero_b_and_no_e() {
        let spec = PoolSpec::lora(targets(), 4, 8.0, head());
        let pool = AdapterPool::init(&spec, 3).unwrap();
        pool.validate(&spec).unwrap();
        assert!(!pool.tensors.contains_key("layer.0.value.lora_E.weight"), "no E in the standard form");
        let a = &pool.tensors["layer.0.value.lora_A.weight"];
        assert_eq!(a.shape(), &[4, 8]);
        let bound = 1.0 / 8f32.sqrt();
        assert!(a.data().iter().all(|v| v.abs() <= bound), "A uniform in ±1/√d_in");
        assert!(a.data().iter().any(|v| v.abs() > bound / 2.0), "A spread over its range");
        assert!(pool.tensors["layer.0.value.lora_B.weight"].data().iter().all(|&v| v == 0.0), "B = 0");
        assert_ne!(spec.hash(), PoolSpec::adalora(targets(), 4, 8.0, head()).hash());
        // One factor alone is a valid standard delta (the other was frozen), not an AdaLoRA one.
        let mut b_only = pool.delta_from(&pool).unwrap();
        b_only.tensors.remove("layer.0.value.lora_A.weight");
        b_only.validate(&spec).unwrap();
        let ada = PoolSpec::adalora(targets(), 4, 8.0, head());
        let mut partial = AdapterPool::init(&ada, 3).unwrap().delta_from(&AdapterPool::init(&ada, 3).unwrap()).unwrap();
        partial.tensors.remove("layer.0.value.lora_A.weight");
        assert!(matches!(partial.validate(&ada), Err(PoolError::MissingTensor(_))));
        // A standard delta carrying an E is refused by name.
        let mut d = pool.delta_from(&pool).unwrap();
        d.validate(&spec).unwrap();
        d.tensors.insert("layer.0.value.lora_E.weight".into(), HostTensor::zeros(&[4, 1]));
        assert_eq!(d.validate(&spec), Err(PoolError::UnknownTensor("layer.0.value.lora_E.weight".into())));
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = PoolSpec::ssf_pool(targets(), 8, 4, 5, None);
        assert!(s.validate().unwrap_err().0.contains("top_k"));
        s.top_k = 2;
        s.key_dim = 0;
        assert!(s.validate().is_err());
        let mut l = PoolSpec::adalora(targets(), 0, 8.0, None);
        assert!(l.validate().is_err());
        l.max_rank = 2;
        l.targets.push(l.targets[0].clone());
        assert!(l.validate().unwrap_err().0.contains("twice"));
    }

    #[test]
    fn spec_hash_distinguishes_specs() {
        let a = PoolSpec::adalora(targets(), 4, 8.0, head());
        let b = PoolSpec::adalora(targets(), 8, 8.0, head());
        assert_eq!(a.hash(), a.clone().hash());
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn restricted_delta_validates_and_applies_to_its_slots() {
        let spec = PoolSpec::ssf_pool(targets(), 8, 5, 2, head());
        let start = AdapterPool::init(&spec, 1).unwrap();
        let mut trained = start.clone();
        for t in trained.tensors.values_mut() {
            t.data_mut().iter_mut().for_each(|v| *v += 0.5);
        }
        let full = trained.delta_from(&start).unwrap();
        assert!(full.validate(&spec).is_err(), "an SSF pool delta must list its slots");
        let usage = SlotUsage { slots: vec![1, 3], counts: vec![10, 2] };
        let delta = full.restrict_to_slots(usage).unwrap();
        delta.validate(&spec).unwrap();
        assert_eq!(delta.tensors[KEYS].shape(), &[2, 8]);

        let mut pool = start.clone();
        pool.apply_delta(&delta).unwrap();
        let (before, after) = (&start.tensors[KEYS], &pool.tensors[KEYS]);
        assert_eq!(before.row(0), after.row(0), "unused slot untouched");
        assert!(after.row(1).iter().zip(before.row(1)).all(|(a, b)| (a - b - 0.5).abs() < 1e-6));
    }

    #[test]
    fn a_pool_survives_its_transfer_form() {
        for spec in [PoolSpec::ssf_pool(targets(), 8, 5, 2, head()), PoolSpec::adalora(targets(), 4, 8.0, head())] {
            let pool = AdapterPool::init(&spec, 9).unwrap();
            let t = pool.to_transfer(&spec).unwrap();
            t.validate(&spec).unwrap();
            assert_eq!(AdapterPool::from_transfer(&t, &spec).unwrap(), pool);
        }
        let spec = PoolSpec::ssf_pool(targets(), 8, 5, 2, head());
        let pool = AdapterPool::init(&spec, 9).unwrap();
        let partial = pool
            .delta_from(&AdapterPool::zeros(&spec))
            .unwrap()
            .restrict_to_slots(SlotUsage { slots: vec![0, 1], counts: vec![1, 1] })
            .unwrap();
        assert!(matches!(AdapterPool::from_transfer(&partial, &spec), Err(PoolError::BadSlots(_))));
    }

    #[test]
    fn invalid_deltas_name_the_problem() {
        let spec = PoolSpec::ssf_pool(targets(), 8, 5, 2, head());
        let pool = AdapterPool::init(&spec, 1).unwrap();
        let good = pool
            .delta_from(&pool)
            .unwrap()
            .restrict_to_slots(SlotUsage { slots: vec![0, 2], counts: vec![1, 1] })
            .unwrap();

        let mut d = good.clone();
        d.tensors.get_mut("layer.0.query.ssf_scale").unwrap().data_mut()[3] = f32::NAN;
        assert_eq!(d.validate(&spec), Err(PoolError::NonFinite("layer.0.query.ssf_scale".into())));

        let mut d = good.clone();
        d.tensors.insert("layer.0.query.ssf_scale".into(), HostTensor::zeros(&[2, 9]));
        let msg = d.validate(&spec).unwrap_err().to_string();
        assert!(msg.contains("layer.0.query.ssf_scale") && msg.contains("[2, 9]") && msg.contains("[2, 8]"), "{msg}");

        let mut d = good.clone();
        d.tensors.insert("layer.9.query.ssf_scale".into(), HostTensor::zeros(&[2, 8]));
        assert!(matches!(d.validate(&spec), Err(PoolError::UnknownTensor(_))));

        let mut d = good.clone();
        d.tensors.remove(KEYS);
        assert_eq!(d.validate(&spec), Err(PoolError::MissingTensor(KEYS.into())));

        let mut d = good.clone();
        d.slots = Some(SlotUsage { slots: vec![2, 0], counts: vec![1, 1] });
        assert!(matches!(d.validate(&spec), Err(PoolError::BadSlots(_))));
        d.slots = Some(SlotUsage { slots: vec![0, 5], counts: vec![1, 1] });
        assert!(matches!(d.validate(&spec), Err(PoolError::BadSlots(_))));

        let other = PoolSpec::ssf_pool(targets(), 8, 6, 2, head());
        assert!(matches!(good.validate(&other), Err(PoolError::SpecHashMismatch { .. })));
    }

    #[test]
    fn lora_delta_ranks_may_vary_per_target_but_not_within_a_triplet() {
        let spec = PoolSpec::adalora(targets(), 4, 8.0, head());
        let pool = AdapterPool::init(&spec, 1).unwrap();
        let mut d = pool.delta_from(&pool).unwrap();
        d.validate(&spec).unwrap();
        // Rank 2 on the query target: every factor of the triplet must agree.
        d.tensors.insert("layer.0.query.lora_A.weight".into(), HostTensor::zeros(&[2, 8]));
        d.tensors.insert("layer.0.query.lora_E.weight".into(), HostTensor::zeros(&[2, 1]));
        d.tensors.insert("layer.0.query.lora_B.weight".into(), HostTensor::zeros(&[8, 2]));
        d.validate(&spec).unwrap();
        d.tensors.insert("layer.0.query.lora_B.weight".into(), HostTensor::zeros(&[8, 3]));
        let msg = d.validate(&spec).unwrap_err().to_string();
        assert!(msg.contains("lora_B") && msg.contains("[8, 3]"), "{msg}");
        // Above max rank.
        let mut d = pool.delta_from(&pool).unwrap();
        d.tensors.insert("layer.0.value.lora_E.weight".into(), HostTensor::zeros(&[5, 1]));
        assert!(d.validate(&spec).is_err());
        // A whole target left out is fine; part of a triplet is not.
        let mut d = pool.delta_from(&pool).unwrap();
        for f in ["lora_A", "lora_E", "lora_B"] {
            d.tensors.remove(&format!("layer.0.value.{f}.weight"));
        }
        d.validate(&spec).unwrap();
        d.tensors.remove("layer.0.query.lora_E.weight");
        assert_eq!(d.validate(&spec), Err(PoolError::MissingTensor("layer.0.query.lora_E.weight".into())));
    }
}
