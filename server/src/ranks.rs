//! Which LoRA ranks each selected client trains this round: the rank policy, what the server
//! knows of each client (bandwidth, compute time) and the global triplet importance. The round
//! engine asks [`RankPlanner::plan`] when it starts an attempt and puts the answer in each task's
//! `rank_budget`; the client trains and uploads only those triplets.
//!
//! Policies ([`RankPolicy`]), the arms of the rank-budget study:
//! - **fixed**: every client trains the same rank on every target (FedAvg-LoRA);
//! - **classes**: the rank follows the client's upload-bandwidth class (HetLoRA with the
//!   zero-padding merge, FlexLoRA with the exact merge);
//! - **importance**: [`crate::budget::allocate`] under each client's bytes = bandwidth ×
//!   (deadline − compute) × margin, AdaLoRA's cubic schedule as the cap, the most important
//!   triplets first;
//! - **knapsack**: the same budgets and schedule, each client's ranks the exact knapsack
//!   solution ([`crate::budget::allocate_knapsack`], Fed-piLot's idea).
//!
//! **Global importance.** After each commit, per target `t` and triplet index `i`:
//!
//! ```text
//! c_t,i = Σ_k w_k s_k,t,i / Σ_k w_k        clients' AdaLoRA scores, example-weighted (w_k), over
//!                                          the clients that trained triplet i (sent its score)
//! σ_t,i = |E_t,i|                          the merged global's singular values
//! u_t,i = ½ c_t,i / Σ c  +  ½ σ_t,i / Σ σ  (a part whose total is 0 is left out)
//! I_t,i ← β I_t,i + (1 − β) u_t,i          smoothed across rounds (β = `smoothing`)
//! ```
//!
//! The exact merge re-factorises each target and sorts its triplets by singular value, so index
//! `i` of round `r + 1` is the `i`-th singular direction, not the same vector as index `i` of
//! round `r`: the smoothing is by position, an approximation that holds while the leading
//! directions are stable. Before the first commit, `I_t,i = 1 / (i + 1)` (every target alike).
//!
//! **Compute time** of a client is the moving average of the training seconds it reported, or
//! `default_compute` before its first update; the download of its task (at its download
//! estimate) is added.

use std::collections::BTreeMap;
use std::time::Duration;

use fedpool_common::codec::{CodecConfig, CodecSettings};
use fedpool_common::wire::{Enroll, TargetBudget, Update};
use fedpool_common::{AdapterKind, AdapterPool, PoolSpec, Round};
use serde::{Deserialize, Serialize};

use crate::aggregate::{AggregateConfig, AggregateError, Aggregator, Merge, ZeroPadLora};
use crate::bandwidth::BandwidthEstimator;
use crate::budget::{self, AllocationInput, BudgetError, ClientLink, CubicSchedule, Grant, TripletCosts};

/// A rank by upload-bandwidth class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankClass {
    /// Clients whose upload estimate is at least this many bytes per second…
    pub min_upload_bps: f64,
    /// …train this rank on every target (the class with the highest threshold they reach).
    pub rank: usize,
}

/// The importance policy's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportanceSettings {
    /// Fraction of the ideal upload bytes a client may plan to send, in (0, 1].
    pub safety_margin: f64,
    /// Triplets per target at the start of the schedule.
    pub init_rank: usize,
    /// Triplets per target at its end.
    pub target_rank: usize,
    /// Rounds at the initial budget.
    pub warmup_rounds: u64,
    /// Last rounds at the target budget.
    pub final_rounds: u64,
    /// β of the importance smoothing, in [0, 1).
    pub smoothing: f64,
    /// The codec clients upload with (update sizes are measured with it).
    pub upload_codec: CodecConfig,
}

/// How ranks are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum RankPolicy {
    /// Every client, every target, this rank.
    Fixed {
        /// The rank.
        rank: usize,
    },
    /// The rank of the client's upload-bandwidth class (a client with no estimate: the lowest).
    Classes {
        /// The classes, any order.
        classes: Vec<RankClass>,
    },
    /// Bandwidth-and-importance budgets, the greedy prefix of one importance order.
    Importance(ImportanceSettings),
    /// The same budgets, each client's ranks the knapsack optimum of importance within its bytes.
    Knapsack(ImportanceSettings),
}

/// What one selected client is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Train and upload these ranks.
    Train(Vec<TargetBudget>),
    /// Sit this round out (the reason, for the log).
    SitOut(String),
}

/// The planner: policy, estimates and importance; see the module documentation.
#[derive(Debug, Clone)]
pub struct RankPlanner {
    policy: RankPolicy,
    spec: PoolSpec,
    deadline: Duration,
    total_rounds: u64,
    default_compute: Duration,
    costs: Option<TripletCosts>,
    bandwidth: BandwidthEstimator,
    compute: BTreeMap<String, f64>,
    importance: Vec<Vec<f64>>,
    /// This round's Σ w·score and Σ w per target and index (over the clients that scored it).
    round_scores: Vec<Vec<f64>>,
    round_weights: Vec<Vec<f64>>,
}

/// Weight of the newest compute-time report.
const COMPUTE_ALPHA: f64 = 0.5;

impl RankPlanner {
    /// A planner for the LoRA `spec` with rounds of `deadline` and `total_rounds` rounds;
    /// `default_compute` stands for a client's training time until it reports one. The
    /// importance policy measures update sizes with its codec here.
    pub fn new(
        spec: PoolSpec,
        policy: RankPolicy,
        deadline: Duration,
        total_rounds: u64,
        default_compute: Duration,
    ) -> Result<Self, BudgetError> {
        let bad = |field: &str, problem: String| BudgetError::Input { field: field.into(), problem };
        // Fixed and class ranks cut either LoRA form (the global is kept in SVD order: exact merge);
        // importance budgets score AdaLoRA's triplets.
        let needs_triplets = matches!(policy, RankPolicy::Importance(_) | RankPolicy::Knapsack(_));
        if !spec.kind.is_lora() || (needs_triplets && spec.kind != AdapterKind::AdaLora) {
            return Err(bad(
                "budget",
                format!(
                    "{} need adapter kind {}, not {:?}",
                    if needs_triplets { "importance budgets score AdaLoRA triplets: they" } else { "rank budgets" },
                    if needs_triplets { "adalora" } else { "lora or adalora" },
                    spec.kind
                ),
            ));
        }
        let max = spec.max_rank;
        let in_range = |r: usize| (1..=max).contains(&r);
        let costs = match &policy {
            RankPolicy::Fixed { rank } if !in_range(*rank) => {
                return Err(bad("budget.rank", format!("{rank} must be in 1..={max}")));
            }
            RankPolicy::Classes { classes } if classes.is_empty() || classes.iter().any(|c| !in_range(c.rank)) => {
                return Err(bad("budget.classes", format!("need at least one class, each rank in 1..={max}")));
            }
            RankPolicy::Importance(s) | RankPolicy::Knapsack(s) => {
                if !in_range(s.init_rank) || !in_range(s.target_rank) {
                    return Err(bad("budget.init_rank", format!("init_rank and target_rank must be in 1..={max}")));
                }
                if !(0.0..1.0).contains(&s.smoothing) {
                    return Err(bad("budget.smoothing", format!("{} must be in [0, 1)", s.smoothing)));
                }
                Some(TripletCosts::measure(&spec, &s.upload_codec, 0)?)
            }
            _ => None,
        };
        let importance = spec.targets.iter().map(|_| (0..max).map(|i| 1.0 / (i as f64 + 1.0)).collect()).collect();
        let targets = spec.targets.len();
        Ok(Self {
            policy,
            spec,
            deadline,
            total_rounds,
            default_compute,
            costs,
            bandwidth: BandwidthEstimator::default(),
            compute: BTreeMap::new(),
            importance,
            round_scores: vec![vec![0.0; max]; targets],
            round_weights: vec![vec![0.0; max]; targets],
        })
    }

    /// The policy.
    pub fn policy(&self) -> &RankPolicy {
        &self.policy
    }

    /// The smoothed global importance, per target (spec order) and triplet index.
    pub fn importance(&self) -> &[Vec<f64>] {
        &self.importance
    }

    /// The bandwidth estimates.
    pub fn bandwidth(&self) -> &BandwidthEstimator {
        &self.bandwidth
    }

    /// A client enrolled: its declared bandwidths are the priors.
    pub fn enrolled(&mut self, client: &str, enroll: &Enroll) {
        self.bandwidth.declare(client, enroll.declared_upload_bps, enroll.declared_download_bps);
    }

    /// An upload of `bytes` took `seconds`, as the server saw it.
    pub fn observe_upload(&mut self, client: &str, bytes: u64, seconds: f64) {
        self.bandwidth.observe_upload(client, bytes, seconds);
    }

    /// An accepted update: its training time and its triplet scores (weighted by its examples).
    /// A client under a grant of rank `r` scores its `r` triplets only: the others it did not
    /// train (they are zero), so they neither count nor dilute the mean.
    pub fn observe_update(&mut self, client: &str, update: &Update) {
        let seconds = f64::from(update.metrics.seconds);
        if seconds.is_finite() && seconds >= 0.0 {
            let e = self.compute.entry(client.to_string()).or_insert(seconds);
            *e = COMPUTE_ALPHA * seconds + (1.0 - COMPUTE_ALPHA) * *e;
        }
        let w = update.examples as f64;
        for imp in &update.importance {
            let Some(t) = self.spec.targets.iter().position(|s| s.name == imp.target) else { continue };
            for (i, s) in imp.scores.iter().take(self.spec.max_rank).enumerate() {
                if s.is_finite() {
                    self.round_scores[t][i] += w * f64::from(*s);
                    self.round_weights[t][i] += w;
                }
            }
        }
    }

    /// A round committed with `global`: updates the importance (module documentation).
    pub fn committed(&mut self, global: &AdapterPool) {
        let max = self.spec.max_rank;
        let mut clients: Vec<Vec<f64>> = Vec::with_capacity(self.spec.targets.len());
        let mut sigma: Vec<Vec<f64>> = Vec::with_capacity(self.spec.targets.len());
        for (t, target) in self.spec.targets.iter().enumerate() {
            let weights = &self.round_weights[t];
            clients.push(
                self.round_scores[t].iter().zip(weights).map(|(s, &w)| if w > 0.0 { s / w } else { 0.0 }).collect(),
            );
            let e = global.tensors.get(&format!("{}.lora_E.weight", target.name));
            sigma.push((0..max).map(|i| e.and_then(|e| e.data().get(i)).map_or(0.0, |v| f64::from(v.abs()))).collect());
        }
        let parts: Vec<Vec<Vec<f64>>> = [clients, sigma].into_iter().filter_map(normalized).collect();
        if !parts.is_empty() {
            let share = 1.0 / parts.len() as f64;
            let beta = match &self.policy {
                RankPolicy::Importance(s) | RankPolicy::Knapsack(s) => s.smoothing,
                _ => 0.5,
            };
            for (t, row) in self.importance.iter_mut().enumerate() {
                for (i, v) in row.iter_mut().enumerate() {
                    let u: f64 = parts.iter().map(|p| share * p[t][i]).sum();
                    *v = beta * *v + (1.0 - beta) * u;
                }
            }
        }
        self.round_scores.iter_mut().for_each(|r| r.iter_mut().for_each(|s| *s = 0.0));
        self.round_weights.iter_mut().for_each(|r| r.iter_mut().for_each(|w| *w = 0.0));
    }

    /// The plan for each of `clients` in `round`; `task_bytes` is the size of a full task (its
    /// download time counts against the deadline).
    pub fn plan(&self, round: Round, clients: &[String], task_bytes: u64) -> Result<Vec<Plan>, BudgetError> {
        let every = |rank: usize| {
            self.spec.targets.iter().map(|t| TargetBudget { target: t.name.clone(), rank: rank as u32 }).collect()
        };
        match &self.policy {
            RankPolicy::Fixed { rank } => Ok(clients.iter().map(|_| Plan::Train(every(*rank))).collect()),
            RankPolicy::Classes { classes } => Ok(clients
                .iter()
                .map(|c| {
                    let bps = self.bandwidth.estimate(c).upload_bps.unwrap_or(0.0);
                    let lowest = classes.iter().min_by(|a, b| a.min_upload_bps.total_cmp(&b.min_upload_bps));
                    let class = classes
                        .iter()
                        .filter(|k| bps >= k.min_upload_bps)
                        .max_by(|a, b| a.min_upload_bps.total_cmp(&b.min_upload_bps))
                        .or(lowest);
                    Plan::Train(every(class.map_or(1, |k| k.rank)))
                })
                .collect()),
            RankPolicy::Importance(s) | RankPolicy::Knapsack(s) => {
                let Some(costs) = &self.costs else { return Ok(Vec::new()) };
                let targets = self.spec.targets.len();
                let schedule = CubicSchedule {
                    init_budget: s.init_rank * targets,
                    target_budget: s.target_rank * targets,
                    warmup_rounds: s.warmup_rounds,
                    final_rounds: s.final_rounds,
                    total_rounds: self.total_rounds,
                };
                // A client with neither a declared nor a measured upload speed trains rank 1
                // everywhere: its first upload gives the estimate.
                let (known, unknown): (Vec<&String>, Vec<&String>) =
                    clients.iter().partition(|c| self.bandwidth.estimate(c).upload_bps.is_some());
                let links: Vec<ClientLink> = known
                    .iter()
                    .map(|c| {
                        let est = self.bandwidth.estimate(c);
                        let download = est.download_bps.filter(|b| *b > 0.0).map_or(0.0, |b| task_bytes as f64 / b);
                        let compute = self.compute.get(*c).copied().unwrap_or(self.default_compute.as_secs_f64());
                        ClientLink {
                            client: c.to_string(),
                            upload_bps: est.upload_bps.unwrap_or(0.0),
                            compute: Duration::from_secs_f64((download + compute).clamp(0.0, 1e9)),
                        }
                    })
                    .collect();
                let input = AllocationInput {
                    spec: &self.spec,
                    costs,
                    importance: &self.importance,
                    schedule_budget: schedule.budget(round),
                    deadline: self.deadline,
                    safety_margin: s.safety_margin,
                    clients: &links,
                };
                let allocation = match &self.policy {
                    RankPolicy::Knapsack(_) => budget::allocate_knapsack(&input)?,
                    _ => budget::allocate(&input)?,
                };
                let mut plans: BTreeMap<String, Plan> = allocation
                    .into_iter()
                    .map(|a| {
                        let plan = match a.grant {
                            Grant::Train { ranks, .. } => Plan::Train(ranks),
                            Grant::SitOut { byte_budget, needed_bytes } => Plan::SitOut(format!(
                                "rank 1 on every target needs {needed_bytes} bytes, its link allows {byte_budget} before the deadline"
                            )),
                        };
                        (a.client, plan)
                    })
                    .collect();
                plans.extend(unknown.into_iter().map(|c| (c.clone(), Plan::Train(every(1)))));
                Ok(clients.iter().map(|c| plans.remove(c).unwrap_or_else(|| Plan::Train(every(1)))).collect())
            }
        }
    }
}

/// `parts[t][i] / Σ parts` (None when the total is 0 or not finite).
fn normalized(parts: Vec<Vec<f64>>) -> Option<Vec<Vec<f64>>> {
    let total: f64 = parts.iter().flatten().sum();
    (total.is_finite() && total > 0.0)
        .then(|| parts.into_iter().map(|r| r.into_iter().map(|v| v / total).collect()).collect())
}

/// The `[budget]` table of `server.toml` and of a simulation: which rank policy, with what
/// settings, and how LoRA updates are merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    /// `none` (every client trains every triplet), `fixed`, `classes`, `importance` or
    /// `knapsack` (importance's settings, each client's ranks the knapsack optimum).
    #[serde(default = "default_policy")]
    pub policy: String,
    /// `exact` (the product merge; FlexLoRA with `classes`) or `zero-pad` (HetLoRA's average).
    #[serde(default = "default_merge")]
    pub merge: String,
    /// fixed: the rank of every client.
    #[serde(default)]
    pub rank: Option<usize>,
    /// classes: rank by upload bandwidth.
    #[serde(default)]
    pub classes: Vec<RankClass>,
    /// importance: fraction of the ideal upload bytes planned for (default 0.8).
    #[serde(default = "default_margin")]
    pub safety_margin: f64,
    /// importance: triplets per target at the start (default: the spec's max_rank).
    #[serde(default)]
    pub init_rank: Option<usize>,
    /// importance: triplets per target at the end (default: half of max_rank).
    #[serde(default)]
    pub target_rank: Option<usize>,
    /// importance: rounds at the initial budget (default 1).
    #[serde(default = "default_one")]
    pub warmup_rounds: u64,
    /// importance: last rounds at the target budget (default 1).
    #[serde(default = "default_one")]
    pub final_rounds: u64,
    /// importance: β of the importance smoothing (default 0.5).
    #[serde(default = "default_smoothing")]
    pub smoothing: f64,
    /// A client's training seconds before it reports any (default 30).
    #[serde(default = "default_compute")]
    pub expected_compute_s: f64,
    /// importance: the codec clients upload with (update sizes are measured with it).
    #[serde(default)]
    pub upload_codec: CodecSettings,
}

fn default_policy() -> String {
    "none".into()
}
fn default_merge() -> String {
    "exact".into()
}
fn default_margin() -> f64 {
    0.8
}
fn default_one() -> u64 {
    1
}
fn default_smoothing() -> f64 {
    0.5
}
fn default_compute() -> f64 {
    30.0
}

impl Default for BudgetSection {
    fn default() -> Self {
        Self {
            policy: default_policy(),
            merge: default_merge(),
            rank: None,
            classes: Vec::new(),
            safety_margin: default_margin(),
            init_rank: None,
            target_rank: None,
            warmup_rounds: default_one(),
            final_rounds: default_one(),
            smoothing: default_smoothing(),
            expected_compute_s: default_compute(),
            upload_codec: CodecSettings::default(),
        }
    }
}

impl BudgetSection {
    /// The planner this table asks for (None for `policy = "none"`), for rounds of `deadline`.
    pub fn planner(
        &self,
        spec: &PoolSpec,
        deadline: Duration,
        rounds: u64,
    ) -> Result<Option<RankPlanner>, BudgetError> {
        let bad = |field: &str, problem: String| BudgetError::Input { field: field.into(), problem };
        let max = spec.max_rank;
        let policy = match self.policy.as_str() {
            "none" => return Ok(None),
            "fixed" => {
                RankPolicy::Fixed { rank: self.rank.ok_or_else(|| bad("budget.rank", "fixed needs rank".into()))? }
            }
            "classes" => RankPolicy::Classes { classes: self.classes.clone() },
            "importance" | "knapsack" => {
                let settings = ImportanceSettings {
                    safety_margin: self.safety_margin,
                    init_rank: self.init_rank.unwrap_or(max),
                    target_rank: self.target_rank.unwrap_or(max.div_ceil(2)),
                    warmup_rounds: self.warmup_rounds,
                    final_rounds: self.final_rounds,
                    smoothing: self.smoothing,
                    upload_codec: self
                        .upload_codec
                        .to_codec()
                        .map_err(|e| bad("budget.upload_codec", e.to_string()))?,
                };
                if self.policy == "knapsack" {
                    RankPolicy::Knapsack(settings)
                } else {
                    RankPolicy::Importance(settings)
                }
            }
            other => {
                return Err(bad(
                    "budget.policy",
                    format!("{other:?} is not none, fixed, classes, importance or knapsack"),
                ))
            }
        };
        if !(self.expected_compute_s.is_finite() && self.expected_compute_s >= 0.0) {
            return Err(bad("budget.expected_compute_s", format!("{} must be ≥ 0", self.expected_compute_s)));
        }
        let compute = Duration::from_secs_f64(self.expected_compute_s);
        RankPlanner::new(spec.clone(), policy, deadline, rounds, compute).map(Some)
    }

    /// The merge for `spec`: the [`Aggregator`] (exact LoRA merge), or HetLoRA's zero-padding
    /// average for `merge = "zero-pad"`.
    pub fn merge(&self, spec: &PoolSpec, config: AggregateConfig) -> Result<Box<dyn Merge>, AggregateError> {
        match self.merge.as_str() {
            // Standard LoRA under budgets: the exact product merge (FlexLoRA) keeps the global in
            // SVD order, so a grant's leading pairs are the best rank-r part.
            "exact" if self.policy != "none" && spec.kind == AdapterKind::Lora => {
                let config = AggregateConfig { lora_merge: crate::aggregate::LoraMerge::Exact, ..config };
                Ok(Box::new(Aggregator::new(spec.clone(), config)?))
            }
            "exact" => Ok(Box::new(Aggregator::new(spec.clone(), config)?)),
            "zero-pad" => Ok(Box::new(ZeroPadLora::new(spec.clone(), config)?)),
            other => Err(AggregateError::Setting {
                setting: "budget.merge",
                problem: format!("{other:?} is not exact or zero-pad"),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
