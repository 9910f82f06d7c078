//! Aggregation strategies, streaming: each accepted update is folded into running sums as it
//! arrives, so memory is O(model), not O(clients × model).
//!
//! [`Aggregator`] implements [`Merge`] for every pool kind, configured by [`AggregateConfig`]:
//!
//! - **Weighted FedAvg** (McMahan et al. 2017) on plain tensors (a LoRA pool's head): the new
//!   value is `global + Σ_k w_k Δ_k / Σ_k w_k`, `w_k` the client's example count.
//! - **Usage-weighted pool merge** on pooled tensors (SSF pools: scale, shift, keys, head): each
//!   carried slot row counts with the number of the client's examples that selected it, so slots
//!   a client never used do not dilute the others ([`Aggregator`] says how this reduces to FedAvg
//!   when P = 1).
//! - **Factor FedAvg** on standard LoRA (`B·A`): A and B averaged as plain tensors (FedIT, what
//!   PEFT federations do; avg(B)·avg(A) is not avg(B·A), which the AdaLoRA form's exact merge is).
//! - **Exact LoRA merge** on each AdaLoRA target: the weighted mean of the clients' products
//!   `B_k diag(E_k) A_k`, re-factorised to the spec's `max_rank` by a truncated SVD of the stacked
//!   factors, never forming a `d_out × d_in` matrix (module [`lora`]).
//! - **Robustness** (module [`robust`]): per-update L2 norm clipping, and three Byzantine-robust
//!   rules that buffer the round's updates (bounded by `max_updates`): the coordinate-wise trimmed
//!   mean, the coordinate-wise median and Multi-Krum. The streaming mean stays the default.
//! - **Server optimiser** (module [`fedadam`]): the averaged delta applied as is, or as the
//!   pseudo-gradient of FedAdam (Reddi et al. 2021), whose moments persist across rounds.
//!
//! All running sums are `f32` (the updates themselves are `f32`); with `n` updates the rounding
//! error of a sum is at most about `n · 2⁻²⁴` of the sum of magnitudes, ~6·10⁻⁵ for 1,000 updates
//! and typically √n times smaller. The LoRA stacks and their decompositions are `f64`.

use std::collections::BTreeMap;

use fedpool_common::adapter::{PoolError, SpecError, TensorLayout, TensorRole};
use fedpool_common::tensor::TensorError;
use fedpool_common::{AdapterKind, AdapterPool, HostTensor, PoolDelta, PoolSpec, SlotUsage, SpecHash};

pub mod fedadam;
pub mod lora;
pub mod robust;
pub mod zeropad;

pub use fedadam::{FedAdamConfig, FEDADAM_M_PREFIX, FEDADAM_V_PREFIX};
pub use lora::{truncate_lora, LORA_STACK_SLACK};
pub use zeropad::ZeroPadLora;

use fedadam::FedAdamState;
use lora::{LoraStack, LoraTriplet};

/// Why a merge could not be built, an update could not be folded, a round could not be finished
/// or a server state could not be restored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// The pool spec is invalid.
    #[error("aggregation: {0}")]
    Spec(#[from] SpecError),
    /// A setting is out of its range (`clip_norm`, `trim_fraction`, FedAdam's hyper-parameters, ...).
    #[error("aggregation: {setting} {problem}")]
    Setting {
        /// The setting, as the configuration names it.
        setting: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
    /// A combination of adapter kind and settings the merge does not define; says what does.
    #[error("aggregation: {0}")]
    Unsupported(&'static str),
    /// `fold` or `finish` without a `begin` before it.
    #[error("aggregation: {0} called outside a round (call begin first)")]
    OutsideRound(&'static str),
    /// The global pool does not fit the spec.
    #[error("aggregation: global pool: {0}")]
    Global(#[source] PoolError),
    /// `finish` got another global pool than `begin` (a LoRA target differs).
    #[error("aggregation: finish got a global pool whose LoRA target {0:?} differs from begin's")]
    GlobalChanged(String),
    /// An update does not fit the spec (names, shapes, slot list, spec hash).
    #[error("aggregation: update: {0}")]
    Update(#[source] PoolError),
    /// An update claims no examples, so it has no weight.
    #[error("aggregation: an update with 0 examples has no weight")]
    ZeroExamples,
    /// An update carries some but not all factors of a LoRA target.
    #[error("aggregation: update carries part of LoRA target {target:?}: all of {parts} or none")]
    PartialTriplet {
        /// The LoRA target.
        target: String,
        /// The factors a target needs (`A and B`, or `A, E, B`).
        parts: &'static str,
    },
    /// An update's L2 norm is NaN or infinite (clipping is on).
    #[error("aggregation: update has a non-finite L2 norm ({0}); refused before folding")]
    NonFiniteNorm(f64),
    /// The trimmed mean's buffer is full for this round.
    #[error(
        "aggregation: the trimmed mean buffers at most {max_updates} updates per round (max_updates); this update \
         is refused"
    )]
    BufferFull {
        /// The buffer's size.
        max_updates: usize,
    },
    /// A rank grant names a target the spec does not have.
    #[error("aggregation: rank granted for unknown LoRA target {0:?}")]
    UnknownTarget(String),
    /// A rank grant exceeds the spec's `max_rank`.
    #[error("aggregation: rank {rank} granted for LoRA target {target:?} exceeds max_rank {max_rank}")]
    RankAboveMax {
        /// The LoRA target.
        target: String,
        /// The rank granted.
        rank: usize,
        /// The spec's maximum.
        max_rank: usize,
    },
    /// A combined or merged value is NaN or infinite; nothing was applied.
    #[error("aggregation: {0} is not finite")]
    NotFinite(String),
    /// The SVD that re-factorises a LoRA target's merged product did not converge.
    #[error("aggregation: LoRA target {target:?}: the SVD of the {rows}×{cols} core did not converge")]
    SvdDiverged {
        /// The LoRA target.
        target: String,
        /// Rows of the core matrix.
        rows: usize,
        /// Columns of the core matrix.
        cols: usize,
    },
    /// A tensor could not be built.
    #[error("aggregation: {0}")]
    Tensor(#[from] TensorError),
    /// A server state was given to a merge that keeps none.
    #[error("aggregation: this merge keeps no state across rounds, got {0} tensors")]
    Stateless(usize),
    /// A server state cannot be loaded while a round is open.
    #[error("aggregation: cannot load the server state during a round")]
    StateDuringRound,
    /// A saved server state does not fit the optimiser (a tensor missing, unknown, of another
    /// shape, or not finite).
    #[error("aggregation: FedAdam state: {0}")]
    ServerState(#[source] PoolError),
    /// A saved second moment of FedAdam is negative.
    #[error("aggregation: FedAdam state tensor {0:?} holds a negative second moment")]
    NegativeMoment(String),
}

/// A round's merge of client updates into the next global pool. The round engine drives it:
/// `begin` at the start of a round (or a retry), `fold` per accepted update, `finish` at commit.
pub trait Merge: Send {
    /// Resets the running sums for a round that starts from `global`.
    fn begin(&mut self, global: &AdapterPool) -> Result<(), AggregateError>;
    /// Folds one validated update, weighted by its example count.
    fn fold(&mut self, delta: &PoolDelta, examples: u64) -> Result<(), AggregateError>;
    /// Folds one validated update that claims `examples` (its slot counts are checked against
    /// that claim) but weighs only `weight` ≤ `examples`, the coordinator's cap: every weight the
    /// update carries (its examples, its slot counts) is scaled by `weight / examples`. A merge
    /// that cannot scale refuses anything but `weight == examples`.
    fn fold_weighted(&mut self, delta: &PoolDelta, examples: u64, weight: u64) -> Result<(), AggregateError> {
        if weight == examples {
            self.fold(delta, examples)
        } else {
            Err(AggregateError::Unsupported("this merge cannot weigh an update below its example count"))
        }
    }
    /// The next global pool from the updates folded since `begin`.
    fn finish(&mut self, global: &AdapterPool) -> Result<AdapterPool, AggregateError>;

    /// State the merge keeps across rounds (a server optimiser's moments), as named tensors for
    /// the store to checkpoint next to the pool it belongs to. None by default.
    fn server_state(&self) -> BTreeMap<String, HostTensor> {
        BTreeMap::new()
    }

    /// Restores what [`Merge::server_state`] returned, on resume; only an empty state by default.
    fn load_server_state(&mut self, state: &BTreeMap<String, HostTensor>) -> Result<(), AggregateError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(AggregateError::Stateless(state.len()))
        }
    }
}

/// How the updates of a round are combined, coordinate by coordinate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The weighted mean, folded as updates arrive (memory O(model)).
    Mean,
    /// Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the ⌊βn⌋
    /// largest and the ⌊βn⌋ smallest of the `n` values, then take the weighted mean of the rest
    /// (same weights as [`Rule::Mean`]; with β = 0 it is the mean). It needs every value of a
    /// coordinate at once, so it **buffers the round's updates**: memory is up to `max_updates`
    /// deltas, and the update after that is refused. Not defined for the exact LoRA merge (the
    /// factors of different clients live in different bases): refused at construction.
    TrimmedMean {
        /// β in [0, 0.5): the fraction trimmed at each end.
        trim_fraction: f64,
        /// The most updates a round may buffer.
        max_updates: usize,
    },
    /// Coordinate-wise median (Yin et al., ICML 2018): per coordinate, the median of the values
    /// of the updates that carry it (unweighted: a weighted median breaks down with the weight
    /// an attacker holds, not with the number of attackers). Buffers the round's updates like the
    /// trimmed mean (memory: up to `max_updates` deltas).
    Median {
        /// The most updates a round may buffer.
        max_updates: usize,
    },
    /// Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    /// Gradient Descent", NeurIPS 2017): each update is scored by the sum of squared L2 distances
    /// to its `n − f − 2` nearest others (at least 1), and the weighted mean of the `select`
    /// best-scored updates is taken (`select = 1`: Krum). A slot or factor an update does not
    /// carry counts as a zero delta in the distances. Needs `n ≥ 2f + 3` for its guarantee.
    /// Buffers the round's updates (memory: up to `max_updates` deltas plus an n × n distance
    /// table; time O(n² · model) at commit).
    Krum {
        /// f: the Byzantine updates to tolerate.
        byzantine: usize,
        /// m: the updates averaged (≥ 1).
        select: usize,
        /// The most updates a round may buffer.
        max_updates: usize,
    },
}

impl Rule {
    /// The most updates the rule buffers per round; `None` for the streaming mean.
    pub fn max_updates(&self) -> Option<usize> {
        match *self {
            Rule::Mean => None,
            Rule::TrimmedMean { max_updates, .. } | Rule::Median { max_updates } | Rule::Krum { max_updates, .. } => {
                Some(max_updates)
            }
        }
    }
}

/// What the server does with the combined delta.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOpt {
    /// `global += combined delta` (FedAvg's server step, learning rate 1).
    Plain,
    /// FedAdam (Reddi et al. 2021, Algorithm 2): the combined delta is a pseudo-gradient.
    FedAdam(FedAdamConfig),
}

/// How the factors of standard LoRA (`B·A`) are merged. AdaLoRA's triplets always take the exact
/// product merge.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LoraMerge {
    /// A and B averaged separately, like any plain tensor (FedIT, Zhang et al. 2024; what PEFT
    /// federations do): cheap, and the rule and server optimiser apply; avg(B)·avg(A) is not
    /// avg(B·A).
    #[default]
    FactorMean,
    /// The weighted mean of the products `B_k A_k`, re-factorised to the spec's rank by a
    /// truncated SVD (FlexLoRA's merge; module [`lora`]) and split evenly, `B = U√σ`, `A = √σ Vᵀ`.
    Exact,
    /// LoRA-FAIR's server-side refinement (Bian et al. 2025): A = Ā (the factor mean) and B the
    /// B̄ + ΔB that brings `B·Ā` closest to the mean product `M = Σ w_k B_k A_k / Σ w_k` —
    /// `min ‖M − (B̄ + ΔB) Ā‖²_F + λ‖ΔB‖²_F`, in closed form `B = (M Āᵀ + λ B̄)(Ā Āᵀ + λ I)⁻¹`
    /// (the paper weighs a cosine similarity and solves by gradient steps; the Frobenius form has
    /// this exact solution). `lambda` is relative to `tr(Ā Āᵀ)/r`; M stays in factored form.
    Fair {
        /// The ridge weight λ, relative to the mean squared row norm of Ā.
        lambda: f64,
    },
}

/// How an [`Aggregator`] merges a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggregateConfig {
    /// Scale each update so that its L2 norm (over all tensors it carries) is at most this.
    pub clip_norm: Option<f64>,
    /// Mean or trimmed mean.
    pub rule: Rule,
    /// The server step.
    pub server_opt: ServerOpt,
    /// How standard LoRA's factors merge (ignored for other kinds).
    pub lora_merge: LoraMerge,
}

impl Default for AggregateConfig {
    /// Plain weighted FedAvg: no clipping, mean, global += mean delta, LoRA factors averaged.
    fn default() -> Self {
        Self { clip_norm: None, rule: Rule::Mean, server_opt: ServerOpt::Plain, lora_merge: LoraMerge::FactorMean }
    }
}

/// A non-LoRA tensor seen as `rows × row_len`: a pooled tensor has one row per slot; a plain
/// tensor is one row.
#[derive(Debug, Clone)]
struct DenseTensor {
    name: String,
    shape: Vec<usize>,
    pooled: bool,
    rows: usize,
    row_len: usize,
    /// A standard LoRA factor: an update may leave it out (it was frozen), and its mean is over
    /// the updates that carried it.
    optional: bool,
}

/// The LoRA factor names of one target (`e`: AdaLoRA's E; standard LoRA has none).
#[derive(Debug, Clone)]
struct LoraNames {
    target: String,
    a: String,
    e: Option<String>,
    b: String,
    d_in: usize,
    d_out: usize,
}

/// One update kept for the buffering rules (trimmed mean, median, Krum).
#[derive(Debug)]
struct Buffered {
    delta: PoolDelta,
    /// The clipping factor to apply to its values.
    scale: f32,
    /// Its weight (the coordinator's, ≤ its claimed examples).
    weight: f64,
    /// `weight / examples`: the factor on its slot counts.
    count_factor: f64,
}

/// The running state of a round.
#[derive(Debug, Default)]
struct RoundState {
    active: bool,
    updates: usize,
    /// Σ examples over the updates that carried each plain tensor, in `dense` order.
    plain_weights: Vec<f64>,
    /// Σ usage counts per slot (the weight of every pooled tensor's row).
    slot_weight: Vec<f64>,
    /// Σ weight · delta per dense tensor (rule Mean only), in `dense` order.
    sums: Vec<Vec<f32>>,
    /// The updates of the round (rule TrimmedMean only).
    buffered: Vec<Buffered>,
    /// The stacked factors per LoRA target, in `lora` order.
    lora: Vec<LoraStack>,
}

/// The aggregator of a federation: a [`Merge`] for the pool kind of its spec, configured by an
/// [`AggregateConfig`], with the server optimiser's state kept across rounds.
///
/// **Weights.** A plain tensor and a LoRA target weigh each update by its example count. A
/// pooled tensor (SSF pool) weighs the row of slot `s` of client `k` by `c_k,s`, the number of the
/// client's examples that selected `s` (`SlotUsage::counts`), and the rule applies per slot:
/// `new_row_s = global_row_s + Σ_k c_k,s Δ_k,s / Σ_k c_k,s` over the clients that carried `s`; a
/// slot no client carried stays as it was (and its FedAdam moments too). With P = 1 every example
/// selects the only slot, so `c_k,0` is client k's example count and this is exactly weighted
/// FedAvg. Because a count is a number of examples, each count must be at most `examples` and
/// their sum at most `top_k · examples`; an update claiming more is refused.
///
/// **LoRA.** A target's update is the client's factors minus the global's first `r_k`
/// triplets (see [`truncate_lora`]); the client's product is `B_k diag(E_k) A_k` with
/// `B_k = B[:, :r_k] + ΔB_k` etc. The merged target is `Σ_k w_k B_k diag(E_k) A_k / Σ_k w_k`
/// over the clients that sent the target (a target nobody sent stays as it was), re-factorised
/// exactly as described in [`lora`]. The scale α / max_rank is the same for every client, so it
/// passes through the merge unchanged.
///
/// **Round protocol.** [`Merge::begin`] checks the global pool and resets the sums (keeping their
/// allocations); [`Merge::fold`] checks the update's structure completely before changing any
/// sum, so a refused update leaves the round as it was; [`Merge::finish`] returns the next pool
/// and ends the round (the FedAdam moments advance only when it succeeds). A round with no update
/// returns the global unchanged. FedAdam's moments are exposed for checkpointing by
/// [`Merge::server_state`] and restored by [`Merge::load_server_state`]. Values are assumed finite (`PoolDelta::validate` checks them);
/// a non-finite clipping norm or result is refused rather than committed.
#[derive(Debug)]
pub struct Aggregator {
    spec: PoolSpec,
    spec_hash: SpecHash,
    config: AggregateConfig,
    dense: Vec<DenseTensor>,
    lora: Vec<LoraNames>,
    round: RoundState,
    adam: Option<FedAdamState>,
}

/// An update that does not fit the spec.
fn bad_update<T>(e: PoolError) -> Result<T, AggregateError> {
    Err(AggregateError::Update(e))
}

/// A setting out of its range.
fn bad_setting<T>(setting: &'static str, problem: String) -> Result<T, AggregateError> {
    Err(AggregateError::Setting { setting, problem })
}

impl Aggregator {
    /// An aggregator for pools of `spec`. Refused: an invalid spec or configuration, the trimmed
    /// mean or FedAdam with a LoRA pool (the exact merge re-factorises the adapter, so factor
    /// coordinates are neither comparable across clients nor across rounds).
    pub fn new(spec: PoolSpec, config: AggregateConfig) -> Result<Self, AggregateError> {
        spec.validate()?;
        if let Some(c) = config.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad_setting("clip_norm", format!("{c} must be positive and finite"));
            }
        }
        // AdaLoRA's triplets go through the exact product merge; standard LoRA's factors as its
        // `lora_merge` says: averaged like plain tensors (FactorMean, Fair) and/or stacked into the
        // exact product (Exact, Fair).
        let standard = spec.kind == AdapterKind::Lora;
        let merge = if standard { config.lora_merge } else { LoraMerge::FactorMean };
        let factor_mean = standard && merge != LoraMerge::Exact;
        let stacked = spec.kind == AdapterKind::AdaLora || (standard && merge != LoraMerge::FactorMean);
        if let LoraMerge::Fair { lambda } = merge {
            if !(lambda.is_finite() && lambda > 0.0) {
                return bad_setting("LoRA-FAIR's lambda", format!("{lambda} must be positive and finite"));
            }
        }
        if let Rule::TrimmedMean { trim_fraction, .. } = config.rule {
            if !(0.0..0.5).contains(&trim_fraction) {
                return bad_setting("trim_fraction", format!("{trim_fraction} must be in [0, 0.5)"));
            }
        }
        if let Rule::Krum { select, .. } = config.rule {
            if select == 0 {
                return bad_setting("krum_select", "must be at least 1".into());
            }
        }
        if let Some(max_updates) = config.rule.max_updates() {
            if max_updates == 0 {
                return bad_setting("max_updates", "must be at least 1".into());
            }
            if stacked {
                return Err(AggregateError::Unsupported(
                    "the trimmed mean, median and Krum are not defined for the exact LoRA merge (AdaLoRA, or \
                     lora_merge exact / fair): use Rule::Mean with clip_norm, or standard LoRA's factor mean",
                ));
            }
        }
        if let ServerOpt::FedAdam(cfg) = config.server_opt {
            cfg.validate()?;
            if stacked {
                return Err(AggregateError::Unsupported(
                    "FedAdam needs coordinate-wise pseudo-gradients, but the exact LoRA merge re-factorises the \
                     adapter every round (AdaLoRA, or lora_merge exact / fair): use ServerOpt::Plain, or standard \
                     LoRA's factor mean",
                ));
            }
        }
        let mut dense = Vec::new();
        let mut lora = Vec::new();
        for l in spec.layout() {
            match l.role {
                TensorRole::Pooled | TensorRole::Plain => dense.push(dense_tensor(&l)),
                TensorRole::LoraA | TensorRole::LoraB => {
                    if factor_mean {
                        dense.push(DenseTensor { optional: true, ..dense_tensor(&l) });
                    }
                    if stacked && l.role == TensorRole::LoraA {
                        let target = l.target.clone().unwrap_or_default();
                        let t = spec.targets.iter().find(|t| t.name == target);
                        let (d_in, d_out) = t.map_or((0, 0), |t| (t.dim_in, t.dim_out));
                        lora.push(LoraNames {
                            a: format!("{target}.lora_A.weight"),
                            e: (!standard).then(|| format!("{target}.lora_E.weight")),
                            b: format!("{target}.lora_B.weight"),
                            target,
                            d_in,
                            d_out,
                        });
                    }
                }
                TensorRole::LoraE => {}
            }
        }
        let adam = match config.server_opt {
            ServerOpt::FedAdam(cfg) => {
                Some(FedAdamState::new(cfg, dense.iter().map(|d| (d.name.clone(), d.shape.clone()))))
            }
            ServerOpt::Plain => None,
        };
        let round = RoundState {
            slot_weight: vec![0.0; spec.pool_size],
            lora: lora.iter().map(|n| LoraStack::new(n.d_in, n.d_out, spec.max_rank)).collect(),
            ..Default::default()
        };
        Ok(Self { spec_hash: spec.hash(), spec, config, dense, lora, round, adam })
    }

    /// The spec this aggregator merges.
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// Its configuration.
    pub fn config(&self) -> &AggregateConfig {
        &self.config
    }

    /// The updates folded since `begin` (0 outside a round).
    pub fn updates_folded(&self) -> usize {
        if self.round.active {
            self.round.updates
        } else {
            0
        }
    }

    /// The current number of stacked columns of a LoRA target's running sum (diagnostics: it
    /// stays below `LORA_STACK_SLACK · min(d_in, d_out) + max_rank` however many updates arrive).
    pub fn lora_stacked_rank(&self, target: &str) -> Option<usize> {
        let i = self.lora.iter().position(|n| n.target == target)?;
        Some(self.round.lora[i].rank())
    }

    fn check_global(&self, global: &AdapterPool) -> Result<(), AggregateError> {
        global.validate(&self.spec).map_err(AggregateError::Global)
    }

    /// Checks everything about an update's structure that folding relies on, before any sum
    /// changes: spec hash, slot list and counts, names, shapes, LoRA ranks.
    fn check_update(&self, delta: &PoolDelta, examples: u64) -> Result<(), AggregateError> {
        if examples == 0 {
            return Err(AggregateError::ZeroExamples);
        }
        if delta.spec_hash != self.spec_hash {
            return bad_update(PoolError::SpecHashMismatch { expected: self.spec_hash, got: delta.spec_hash });
        }
        let is_pool = self.spec.kind == AdapterKind::SsfPool;
        let n_slots = match (&delta.slots, is_pool) {
            (Some(u), true) => {
                check_slots(u, self.spec.pool_size, self.spec.top_k, examples)?;
                u.slots.len()
            }
            (None, true) => return bad_update(PoolError::BadSlots("an SSF pool update must list its slots".into())),
            (Some(_), false) => return bad_update(PoolError::BadSlots("a LoRA update carries no slot list".into())),
            (None, false) => 0,
        };
        for d in &self.dense {
            let Some(t) = delta.tensors.get(&d.name) else {
                if d.optional {
                    continue;
                }
                return bad_update(PoolError::MissingTensor(d.name.clone()));
            };
            let ok = if d.pooled {
                t.shape().len() == d.shape.len() && t.shape()[0] == n_slots && t.shape()[1..] == d.shape[1..]
            } else {
                t.shape() == d.shape.as_slice()
            };
            if !ok {
                let want = if d.pooled {
                    let mut s = d.shape.clone();
                    s[0] = n_slots;
                    format!("{s:?} ({n_slots} slots)")
                } else {
                    format!("{:?}", d.shape)
                };
                return bad_update(PoolError::BadShape {
                    name: d.name.clone(),
                    got: t.shape().to_vec(),
                    expected: want,
                });
            }
        }
        for n in &self.lora {
            triplet(delta, n, self.spec.max_rank)?;
        }
        let known = |name: &str| {
            self.dense.iter().any(|d| d.name == name)
                || self.lora.iter().any(|n| n.a == name || n.b == name || n.e.as_deref() == Some(name))
        };
        if let Some(name) = delta.tensors.keys().find(|name| !known(name)) {
            return bad_update(PoolError::UnknownTensor(name.clone()));
        }
        Ok(())
    }

    /// The clipping factor of an update: min(1, clip / ‖Δ‖).
    fn clip_scale(&self, delta: &PoolDelta) -> Result<f32, AggregateError> {
        let Some(clip) = self.config.clip_norm else { return Ok(1.0) };
        robust::clip_scale(robust::l2_norm(delta), clip)
    }
}

fn dense_tensor(l: &TensorLayout) -> DenseTensor {
    let pooled = l.role == TensorRole::Pooled;
    let numel = l.shape.iter().product::<usize>();
    let (rows, row_len) = if pooled { (l.shape[0], l.shape[1..].iter().product()) } else { (1, numel) };
    DenseTensor { name: l.name.clone(), shape: l.shape.clone(), pooled, rows, row_len, optional: false }
}

/// Checks a slot list against the pool and the update's example count.
fn check_slots(u: &SlotUsage, pool_size: usize, top_k: usize, examples: u64) -> Result<(), AggregateError> {
    if u.slots.is_empty() || u.slots.len() != u.counts.len() {
        let problem = format!("slot list has {} slots and {} counts", u.slots.len(), u.counts.len());
        return bad_update(PoolError::BadSlots(problem));
    }
    if !u.slots.windows(2).all(|w| w[0] < w[1]) || u.slots.iter().any(|&s| s as usize >= pool_size) {
        let problem = format!("slots {:?} must be strictly increasing and below {pool_size}", u.slots);
        return bad_update(PoolError::BadSlots(problem));
    }
    if let Some((s, c)) = u.slots.iter().zip(&u.counts).find(|(_, &c)| c == 0 || c > examples) {
        let problem = format!("slot {s} has usage count {c}, expected 1..={examples} (the update's examples)");
        return bad_update(PoolError::BadSlots(problem));
    }
    let total: u128 = u.counts.iter().map(|&c| u128::from(c)).sum();
    if total > u128::from(examples) * top_k as u128 {
        let problem = format!("usage counts sum to {total}, more than top_k {top_k} × {examples} examples");
        return bad_update(PoolError::BadSlots(problem));
    }
    Ok(())
}

/// A LoRA target's factor deltas in an update, after checking that they form one triplet of one
/// rank in 1..=max_rank (`None`: the target was left out).
fn triplet<'a>(
    delta: &'a PoolDelta,
    n: &LoraNames,
    max_rank: usize,
) -> Result<Option<LoraTriplet<'a>>, AggregateError> {
    let (a, b) = (delta.tensors.get(&n.a), delta.tensors.get(&n.b));
    let e = n.e.as_ref().map(|name| (name, delta.tensors.get(name)));
    let (a, e, b) = match (a, e, b) {
        (None, None | Some((_, None)), None) => return Ok(None),
        (Some(a), None, Some(b)) => (a, None, b),
        (Some(a), Some((name, Some(e))), Some(b)) => (a, Some((name, e)), b),
        _ => {
            let parts = if n.e.is_some() { "A, E, B" } else { "A and B" };
            return Err(AggregateError::PartialTriplet { target: n.target.clone(), parts });
        }
    };
    let r = a.shape().first().copied().unwrap_or(0);
    let want =
        |name: &str, shape: [usize; 2]| format!("{name:?} {shape:?} (rank 1..={max_rank}, one rank per triplet)");
    let bad_shape = |name: &str, t: &HostTensor, shape: [usize; 2]| {
        bad_update(PoolError::BadShape { name: name.to_string(), got: t.shape().to_vec(), expected: want(name, shape) })
    };
    if r == 0 || r > max_rank || a.shape() != [r, n.d_in] {
        return bad_shape(&n.a, a, [r, n.d_in]);
    }
    if let Some((name, e)) = e {
        if e.shape() != [r, 1] {
            return bad_shape(name, e, [r, 1]);
        }
    }
    if b.shape() != [n.d_out, r] {
        return bad_shape(&n.b, b, [n.d_out, r]);
    }
    Ok(Some(LoraTriplet { a: a.data(), e: e.map(|(_, e)| e.data()), b: b.data(), rank: r }))
}

/// Row `i` of an update's tensor: slot row `i` of a pooled tensor, the whole of a plain one.
fn update_row(t: &HostTensor, pooled: bool, i: usize) -> &[f32] {
    if pooled {
        t.row(i)
    } else {
        t.data()
    }
}

/// `y += alpha * x`, the inner loop of every streaming sum.
#[inline]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

impl Merge for Aggregator {
    fn begin(&mut self, global: &AdapterPool) -> Result<(), AggregateError> {
        self.check_global(global)?;
        let r = &mut self.round;
        r.active = true;
        r.updates = 0;
        r.plain_weights.clear();
        r.plain_weights.resize(self.dense.len(), 0.0);
        r.slot_weight.iter_mut().for_each(|w| *w = 0.0);
        r.buffered.clear();
        if self.config.rule == Rule::Mean {
            if r.sums.len() != self.dense.len() {
                r.sums = self.dense.iter().map(|d| vec![0.0; d.rows * d.row_len]).collect();
            } else {
                r.sums.iter_mut().for_each(|s| s.fill(0.0));
            }
        }
        for (stack, n) in r.lora.iter_mut().zip(&self.lora) {
            // The global passed validation, so every factor is present with its full shape.
            let get = |name: &str| global.tensors.get(name).map(HostTensor::data).unwrap_or_default();
            // Standard LoRA is the SVD form with E = 1.
            let ones = vec![1.0; self.spec.max_rank];
            let e = n.e.as_deref().map_or(ones.as_slice(), get);
            stack.reset(get(&n.a), e, get(&n.b));
        }
        Ok(())
    }

    fn fold(&mut self, delta: &PoolDelta, examples: u64) -> Result<(), AggregateError> {
        self.fold_weighted(delta, examples, examples)
    }

    fn fold_weighted(&mut self, delta: &PoolDelta, examples: u64, weight: u64) -> Result<(), AggregateError> {
        if !self.round.active {
            return Err(AggregateError::OutsideRound("fold"));
        }
        self.check_update(delta, examples)?;
        if weight == 0 {
            return Err(AggregateError::ZeroExamples);
        }
        if weight > examples {
            return bad_setting("weight", format!("{weight} is above the update's {examples} examples"));
        }
        let scale = self.clip_scale(delta)?;
        let count_factor = weight as f64 / examples as f64;
        if let Some(max_updates) = self.config.rule.max_updates() {
            if self.round.buffered.len() >= max_updates {
                return Err(AggregateError::BufferFull { max_updates });
            }
            self.round.buffered.push(Buffered { delta: delta.clone(), scale, weight: weight as f64, count_factor });
            self.round.updates += 1;
            return Ok(());
        }
        let w = weight as f64;
        let r = &mut self.round;
        for (i, d) in self.dense.iter().enumerate() {
            // Presence and shape were checked by check_update.
            let Some(t) = delta.tensors.get(&d.name) else { continue };
            if !d.pooled {
                r.plain_weights[i] += w;
            }
            let Some(sum) = r.sums.get_mut(i) else { continue };
            match &delta.slots {
                Some(u) if d.pooled => {
                    for (i, (&slot, &count)) in u.slots.iter().zip(&u.counts).enumerate() {
                        let row = &mut sum[slot as usize * d.row_len..(slot as usize + 1) * d.row_len];
                        axpy(row, (count as f64 * count_factor * f64::from(scale)) as f32, t.row(i));
                    }
                }
                _ => axpy(sum, (w * f64::from(scale)) as f32, t.data()),
            }
        }
        if let Some(u) = &delta.slots {
            for (&slot, &count) in u.slots.iter().zip(&u.counts) {
                r.slot_weight[slot as usize] += count as f64 * count_factor;
            }
        }
        for (stack, n) in r.lora.iter_mut().zip(&self.lora) {
            if let Some(t) = triplet(delta, n, self.spec.max_rank)? {
                stack.fold(&t, scale, w);
            }
        }
        r.updates += 1;
        Ok(())
    }

    fn finish(&mut self, global: &AdapterPool) -> Result<AdapterPool, AggregateError> {
        if !self.round.active {
            return Err(AggregateError::OutsideRound("finish"));
        }
        self.check_global(global)?;
        for (stack, n) in self.round.lora.iter().zip(&self.lora) {
            let same = |name: &str, want: &[f32]| global.tensors.get(name).is_some_and(|t| t.data() == want);
            let (a, e, b) = stack.global();
            let same_e = n.e.as_deref().is_none_or(|name| same(name, e));
            if !(same(&n.a, a) && same_e && same(&n.b, b)) {
                return Err(AggregateError::GlobalChanged(n.target.clone()));
            }
        }
        if self.round.updates == 0 {
            self.round.active = false;
            return Ok(global.clone());
        }
        // Fallible work first: nothing below the "apply" line may fail.
        let fair = match (self.spec.kind, self.config.lora_merge) {
            (AdapterKind::Lora, LoraMerge::Fair { lambda }) => Some(lambda),
            _ => None,
        };
        let mut factors = Vec::with_capacity(self.lora.len());
        for (stack, n) in self.round.lora.iter().zip(&self.lora) {
            let f = if fair.is_some() {
                None // B is refined below, from the merged factor means.
            } else {
                let f = stack.refactor().map_err(|[rows, cols]| AggregateError::SvdDiverged {
                    target: n.target.clone(),
                    rows,
                    cols,
                })?;
                // Standard LoRA: B diag(E) A split evenly, B = B·√E, A = √E·A.
                f.map(|f| if n.e.is_none() { f.balanced() } else { f })
            };
            factors.push(f);
        }
        let combined = combined_deltas(&self.dense, &self.round, self.config.rule)?;
        let mut out = global.clone();
        for (d, c) in self.dense.iter().zip(&combined) {
            let Some(t) = out.tensors.get_mut(&d.name) else {
                return Err(AggregateError::Global(PoolError::MissingTensor(d.name.clone())));
            };
            let y = t.data_mut();
            match &self.adam {
                None => {
                    for row in 0..d.rows {
                        if let Some((x, s)) = c.row(row, d.row_len) {
                            axpy(&mut y[row * d.row_len..(row + 1) * d.row_len], s, x);
                        }
                    }
                }
                Some(adam) => adam.step_into(&d.name, y, |row| c.row(row, d.row_len), d.row_len),
            }
            if !t.all_finite() {
                return Err(AggregateError::NotFinite(format!("merged tensor {:?}", d.name)));
            }
        }
        for (f, n) in factors.into_iter().zip(&self.lora) {
            if let Some(f) = f {
                let mut parts = vec![(&n.a, f.a), (&n.b, f.b)];
                if let Some(e) = &n.e {
                    parts.push((e, f.e));
                }
                for (name, data) in parts {
                    if let Some(t) = out.tensors.get_mut(name) {
                        t.data_mut().copy_from_slice(&data);
                    }
                }
            }
        }
        if let Some(lambda) = fair {
            for (stack, n) in self.round.lora.iter().zip(&self.lora) {
                let (Some(a), Some(b)) = (out.tensors.get(&n.a), out.tensors.get(&n.b)) else {
                    let missing = if out.tensors.contains_key(&n.a) { &n.b } else { &n.a };
                    return Err(AggregateError::Global(PoolError::MissingTensor(missing.clone())));
                };
                if let Some(refined) = stack.fair_b(a.data(), b.data(), lambda) {
                    if let Some(t) = out.tensors.get_mut(&n.b) {
                        t.data_mut().copy_from_slice(&refined);
                        if !t.all_finite() {
                            return Err(AggregateError::NotFinite(format!("LoRA-FAIR's B of target {:?}", n.target)));
                        }
                    }
                }
            }
        }
        // Apply: the optimiser's moments advance only now that the round cannot fail.
        if let Some(adam) = &mut self.adam {
            for (d, c) in self.dense.iter().zip(&combined) {
                adam.advance(&d.name, |row| c.row(row, d.row_len), d.rows, d.row_len);
            }
        }
        self.round.active = false;
        Ok(out)
    }

    /// FedAdam's moments, `fedadam.m.<tensor>` and `fedadam.v.<tensor>` for every non-LoRA tensor;
    /// empty under [`ServerOpt::Plain`].
    fn server_state(&self) -> BTreeMap<String, HostTensor> {
        self.adam.as_ref().map(FedAdamState::to_named).unwrap_or_default()
    }

    /// Restores FedAdam's moments: every tensor present with its shape and finite (v also
    /// non-negative), nothing unknown; nothing changes on error. Refused during a round.
    fn load_server_state(&mut self, state: &BTreeMap<String, HostTensor>) -> Result<(), AggregateError> {
        if self.round.active {
            return Err(AggregateError::StateDuringRound);
        }
        match &mut self.adam {
            Some(adam) => adam.load_named(state),
            None if state.is_empty() => Ok(()),
            None => Err(AggregateError::Stateless(state.len())),
        }
    }
}

/// The combined delta of one dense tensor: values and, per row, the factor to apply to them
/// (`None`: no update carried the row, which stays as it was).
enum Combined<'a> {
    /// A running weighted sum and 1 / Σ weight per row.
    Sum { sum: &'a [f32], inv_weight: Vec<Option<f32>> },
    /// Values already combined (trimmed mean); `rows[i]` says whether row `i` had any value.
    Owned { values: Vec<f32>, rows: Vec<bool> },
}

impl Combined<'_> {
    /// Row `row`'s values and the factor to scale them by.
    fn row(&self, row: usize, row_len: usize) -> Option<(&[f32], f32)> {
        let span = row * row_len..(row + 1) * row_len;
        match self {
            Combined::Sum { sum, inv_weight } => inv_weight[row].map(|s| (&sum[span], s)),
            Combined::Owned { values, rows } => rows[row].then(|| (&values[span], 1.0)),
        }
    }
}

/// The combined delta of every dense tensor, in `dense` order; refused when one is not finite.
fn combined_deltas<'a>(
    dense: &[DenseTensor],
    r: &'a RoundState,
    rule: Rule,
) -> Result<Vec<Combined<'a>>, AggregateError> {
    let mut out = Vec::with_capacity(dense.len());
    // Krum picks whole updates first; their weighted mean is then taken like a trimmed mean
    // with nothing trimmed.
    let chosen: Vec<&Buffered> = match rule {
        Rule::Krum { byzantine, select, .. } => {
            let picked = robust::krum_select(&krum_distances(dense, &r.buffered), byzantine, select);
            picked.into_iter().map(|i| &r.buffered[i]).collect()
        }
        _ => r.buffered.iter().collect(),
    };
    for (i, d) in dense.iter().enumerate() {
        let c = match rule {
            Rule::Mean => {
                let inv = |w: f64| (w > 0.0).then(|| (1.0 / w) as f32);
                let inv_weight = if d.pooled {
                    r.slot_weight.iter().map(|&w| inv(w)).collect()
                } else {
                    vec![inv(r.plain_weights[i])]
                };
                Combined::Sum { sum: &r.sums[i], inv_weight }
            }
            Rule::TrimmedMean { trim_fraction, .. } => {
                let (values, rows) =
                    coordinate_wise(&chosen, d, |pairs| robust::trimmed_weighted_mean(pairs, trim_fraction));
                Combined::Owned { values, rows }
            }
            Rule::Krum { .. } => {
                let (values, rows) = coordinate_wise(&chosen, d, |pairs| robust::trimmed_weighted_mean(pairs, 0.0));
                Combined::Owned { values, rows }
            }
            Rule::Median { .. } => {
                let (values, rows) = coordinate_wise(&chosen, d, robust::median);
                Combined::Owned { values, rows }
            }
        };
        for row in 0..d.rows {
            if let Some((x, s)) = c.row(row, d.row_len) {
                if !x.iter().all(|v| (v * s).is_finite()) {
                    return Err(AggregateError::NotFinite(format!(
                        "combined delta of tensor {:?} (row {row})",
                        d.name
                    )));
                }
            }
        }
        out.push(c);
    }
    Ok(out)
}

/// The squared L2 distance between every two buffered updates over the dense tensors (clipped
/// values; a row or factor an update does not carry is a zero delta), as an n × n table.
fn krum_distances(dense: &[DenseTensor], buffered: &[Buffered]) -> Vec<Vec<f64>> {
    let n = buffered.len();
    let mut dist = vec![vec![0.0f64; n]; n];
    for d in dense {
        // Each update's full `rows × row_len` values of this tensor (zeros where not carried).
        let full: Vec<Vec<f32>> = buffered.iter().map(|b| dense_values(b, d)).collect();
        for i in 0..n {
            for j in i + 1..n {
                let s: f64 = full[i].iter().zip(&full[j]).map(|(&x, &y)| f64::from(x - y) * f64::from(x - y)).sum();
                dist[i][j] += s;
                dist[j][i] += s;
            }
        }
    }
    dist
}

/// A buffered update's values of dense tensor `d` laid out as the whole tensor, clipped, with
/// zeros where it carries nothing.
fn dense_values(b: &Buffered, d: &DenseTensor) -> Vec<f32> {
    let mut out = vec![0.0f32; d.rows * d.row_len];
    let Some(t) = b.delta.tensors.get(&d.name) else { return out };
    match &b.delta.slots {
        Some(u) if d.pooled => {
            for (i, &slot) in u.slots.iter().enumerate() {
                let row = &mut out[slot as usize * d.row_len..(slot as usize + 1) * d.row_len];
                for (o, &x) in row.iter_mut().zip(t.row(i)) {
                    *o = x * b.scale;
                }
            }
        }
        _ => {
            for (o, &x) in out.iter_mut().zip(t.data()) {
                *o = x * b.scale;
            }
        }
    }
    out
}

/// One dense tensor combined coordinate by coordinate over the updates that carry each row:
/// `reduce` gets the `(clipped value, weight)` pairs of one coordinate.
fn coordinate_wise(
    buffered: &[&Buffered],
    d: &DenseTensor,
    mut reduce: impl FnMut(&mut [(f32, f64)]) -> f64,
) -> (Vec<f32>, Vec<bool>) {
    let mut values = vec![0.0f32; d.rows * d.row_len];
    let mut rows = vec![false; d.rows];
    let mut scratch = Vec::new();
    for row in 0..d.rows {
        // (row values, clip scale, weight) of each update that carries this row.
        let mut members: Vec<(&[f32], f32, f64)> = Vec::new();
        for b in buffered {
            let Some(t) = b.delta.tensors.get(&d.name) else { continue };
            match &b.delta.slots {
                Some(u) if d.pooled => {
                    if let Ok(i) = u.slots.binary_search(&(row as u32)) {
                        members.push((update_row(t, true, i), b.scale, u.counts[i] as f64 * b.count_factor));
                    }
                }
                _ => members.push((update_row(t, false, 0), b.scale, b.weight)),
            }
        }
        if members.is_empty() {
            continue;
        }
        rows[row] = true;
        let out = &mut values[row * d.row_len..(row + 1) * d.row_len];
        for (j, o) in out.iter_mut().enumerate() {
            scratch.clear();
            scratch.extend(members.iter().map(|&(x, s, w)| (x[j] * s, w)));
            *o = reduce(&mut scratch) as f32;
        }
    }
    (values, rows)
}
