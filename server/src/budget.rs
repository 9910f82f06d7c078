//! Per-client, per-target LoRA rank budgets under bandwidth and deadline.
//!
//! Each round the server grants every selected client a rank per LoRA target: the client trains
//! and uploads that target's first `r` triplets (rows `0..r` of A, entries `0..r` of E, columns
//! `0..r` of B). The grant must let the update arrive before the deadline and keep the most
//! important triplets. Everything here is a pure function of its inputs: no I/O, no clock.
//!
//! **Byte budget.** Client `k` with upload estimate `b_k` (bytes per second), expected time
//! before it can start uploading `c_k` (download, local training, latency), round deadline `T`
//! and safety margin `m ∈ (0, 1]` may send ([`byte_budget`])
//!
//! ```text
//! budget_k = ⌊ b_k · (T − c_k) · m ⌋ bytes        (0 when c_k ≥ T)
//! ```
//!
//! **What an update costs.** [`TripletCosts`] bounds the size of the whole `Update` frame (frame
//! header, ids, nonce, metrics, importance scores and the encoded delta) by an affine function of
//! the ranks, `bytes(r) = fixed + ⌈Σ_t c_t · r_t⌉`, measured once per (spec, codec) with the real
//! codec on the spec's shapes. For dense fp32/int8/int4 the size of a tensor depends only on its
//! shape, so the bound is exact up to the length fields' few bytes. Top-k sparsification keeps a
//! fixed fraction of each tensor's values, so it is still linear in the rank; only its position
//! gaps depend on the values, and zstd's output depends on them too: both are covered by their
//! worst cases (see [`TripletCosts::measure`]).
//!
//! **Schedule.** AdaLoRA (Zhang et al., ICLR 2023; HF PEFT `RankAllocator.budget_schedule`)
//! shrinks the total number of triplets from `init` to `target` by a cubic ([`CubicSchedule`]):
//!
//! ```text
//! budget(t) = init                                       t ≤ warmup
//!           = target + (init − target)·(1 − (t − warmup)/(total − final − warmup))³   (floored)
//!           = target                                     t > total − final
//! ```
//!
//! Budgets count triplets over all targets of one client (`init_rank × targets` down to
//! `target_rank × targets`).
//!
//! **Allocation** ([`allocate`]). Every client that takes part trains at least rank 1 on every
//! target. The triplets beyond rank 1 are put in one order, shared by all clients: repeatedly the
//! next triplet (index `r_t`) of the target whose next triplet has the highest importance, ties to
//! the lower target index. Each client gets the longest prefix of that order that fits both its
//! byte budget and the schedule's budget. A client for which rank 1 everywhere does not fit sits
//! out the round instead of missing the deadline.
//!
//! Why a prefix, not "skip the triplet that does not fit and try cheaper ones": skipping is not
//! monotone in bandwidth. With an important but expensive target X and a cheap one Y, a client
//! just short of one X triplet would fill its budget with Y triplets, and one byte more would buy
//! a single X triplet and lose them all. The prefix never takes a triplet away from a faster
//! client, keeps the granted set the most important one, and leaves less than one triplet of the
//! costliest target unused.

use std::collections::BTreeMap;
use std::time::Duration;

use fedpool_common::adapter::TensorRole;
use fedpool_common::codec::{self, CodecConfig, CodecError, EncodedDelta};
use fedpool_common::frame;
use fedpool_common::wire::{TargetBudget, TrainMetrics, TripletImportance, Update};
use fedpool_common::{AdapterKind, HostTensor, Nonce, PoolDelta, PoolSpec, Round, TaskId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `raw_len` and the payload's length in an encoded delta are bincode varints (1, 3, 5 or 9
/// bytes) that grow with the payload: whatever the ranks, each is at most 8 bytes longer than in
/// the rank-1 measurement.
const LENGTH_FIELDS_SLACK: f64 = 16.0;

/// Top-k positions travel as LEB128 gaps: one byte per kept value when the gaps are below 128.
/// A gap `g` takes at most `1 + g/128` bytes and the gaps of a tensor of `n` values sum to less
/// than `n`, so any values cost at most `n/128` bytes more than the one byte per kept value that
/// every measurement already pays.
const TOP_K_GAP_BYTES_PER_VALUE: f64 = 1.0 / 128.0;

/// The length of a tensor's gap bytes is a varint that may also grow (1 → 3 → 5 bytes).
const TOP_K_GAP_LENGTH_SLACK: f64 = 4.0;

/// zstd's worst case (`ZSTD_COMPRESSBOUND`, zstd.h): `n + n/256 + (128 KiB − n)/2048` for an
/// input of `n < 128 KiB` bytes, `n + n/256` above.
const ZSTD_EXPANSION: f64 = 1.0 / 256.0;
/// `(128 KiB) >> 11`, the small-input term of `ZSTD_COMPRESSBOUND`.
const ZSTD_SMALL_INPUT_BYTES: f64 = 64.0;
/// With zstd the codec config carries the level (at most 5 more bytes) and the payload length may
/// take up to 8 more bytes than the uncompressed one measured.
const ZSTD_FIELDS_SLACK: f64 = 13.0;

/// Why budgets could not be measured or allocated.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The pool spec has no LoRA ranks to budget, or is invalid.
    #[error("rank budgets: {0}")]
    Spec(String),
    /// The codec refused its settings or the probe delta.
    #[error("rank budgets: measuring updates encoded with {codec}: {source}")]
    Codec {
        /// The codec, as [`CodecConfig::describe`] names it.
        codec: String,
        /// What the codec said.
        #[source]
        source: CodecError,
    },
    /// An allocation input is unusable.
    #[error("rank budgets: {field}: {problem}")]
    Input {
        /// The input, e.g. `clients[2] "hospital-a": upload_bps` or `importance[1]`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn input_error(field: impl Into<String>, problem: impl Into<String>) -> BudgetError {
    BudgetError::Input { field: field.into(), problem: problem.into() }
}

/// An upper bound on the bytes of a client's `Update` frame as a function of its ranks:
/// `bytes(r) = fixed + ⌈Σ_t per_triplet[t] · r_t⌉`.
#[derive(Debug, Clone, PartialEq)]
pub struct TripletCosts {
    fixed: u64,
    per_triplet: Vec<f64>,
}

impl TripletCosts {
    /// Costs given directly (a simulator's model, tests): `fixed` bytes plus `per_triplet[t]`
    /// bytes per triplet of target `t`. Each must be finite and non-negative.
    pub fn new(fixed: u64, per_triplet: Vec<f64>) -> Result<Self, BudgetError> {
        if let Some((t, c)) = per_triplet.iter().enumerate().find(|(_, c)| !(c.is_finite() && **c >= 0.0)) {
            return Err(input_error(format!("per_triplet[{t}]"), format!("{c} is not a finite number ≥ 0 of bytes")));
        }
        Ok(Self { fixed, per_triplet })
    }

    /// Measures the costs of `spec`'s updates encoded with `codec`, on random values drawn from
    /// `seed`:
    ///
    /// - `base`: the `Update` frame of a delta with every target at rank 1 and the head, with
    ///   the largest ids and step count (varints at their longest) and one importance score per
    ///   triplet of every target at `max_rank`;
    /// - `per_triplet[t] = (s_t(max_rank) − s_t(1)) / (max_rank − 1)`, where `s_t(r)` is the
    ///   encoded size of a delta holding target `t` alone at rank `r` (0 when `max_rank` is 1:
    ///   every participant then sends rank 1 everywhere, all of it counted in `fixed`);
    /// - `excess_t`: the most `s_t(r)` rises above that line at any rank in between (length
    ///   prefixes and quantization blocks make sizes step, not slope), so the line bounds every
    ///   rank; targets of one shape share both;
    /// - `fixed = base + 16 + Σ_t excess_t − Σ_t per_triplet[t]` (never below 0), the 16 bytes
    ///   for the varint length fields that grow with the payload.
    ///
    /// With top-k, `n/128` bytes per value and 4 per tensor are added for the position gaps a real
    /// delta may spread wider than random values do. With zstd the sizes are measured without it
    /// and raised to zstd's worst case, `n·(1 + 1/256) + 64` (compression only ever helps).
    pub fn measure(spec: &PoolSpec, codec: &CodecConfig, seed: u64) -> Result<Self, BudgetError> {
        check_lora_spec(spec)?;
        codec.validate().map_err(|source| codec_error(codec, source))?;
        let dense = CodecConfig { zstd_level: None, ..*codec };
        let probe = Probe { spec, codec: &dense, seed };
        let base = probe.update_len(&vec![1; spec.targets.len()])? as f64;
        let mut by_shape: BTreeMap<(usize, usize), Line> = BTreeMap::new();
        let mut per_triplet = Vec::with_capacity(spec.targets.len());
        let mut excess = 0.0;
        for (t, target) in spec.targets.iter().enumerate() {
            let shape = (target.dim_in, target.dim_out);
            let line = match by_shape.get(&shape) {
                Some(&line) => line,
                None => probe.line(t)?,
            };
            by_shape.insert(shape, line);
            per_triplet.push(line.slope);
            excess += line.excess;
        }
        let mut fixed = base + LENGTH_FIELDS_SLACK + excess - per_triplet.iter().sum::<f64>();
        if codec.top_k.is_some() {
            fixed += add_top_k_allowance(spec, &mut per_triplet);
        }
        if codec.zstd_level.is_some() {
            fixed = fixed * (1.0 + ZSTD_EXPANSION) + ZSTD_SMALL_INPUT_BYTES + ZSTD_FIELDS_SLACK;
            per_triplet.iter_mut().for_each(|c| *c *= 1.0 + ZSTD_EXPANSION);
        }
        Ok(Self { fixed: fixed.max(0.0).ceil() as u64, per_triplet })
    }

    /// Bytes that do not depend on the ranks.
    pub fn fixed(&self) -> u64 {
        self.fixed
    }

    /// Bytes per triplet, by target (the spec's target order).
    pub fn per_triplet(&self) -> &[f64] {
        &self.per_triplet
    }

    /// The bound on an update with rank `ranks[t]` on target `t` (the spec's target order; meant
    /// for ranks in `1..=max_rank`; missing entries count as 0, extra ones are ignored).
    pub fn bytes(&self, ranks: &[usize]) -> u64 {
        let variable: f64 = self.per_triplet.iter().zip(ranks).map(|(c, &r)| c * r as f64).sum();
        self.fixed.saturating_add(variable.ceil() as u64)
    }
}

/// Adds the top-k gap allowance (see [`TOP_K_GAP_BYTES_PER_VALUE`]) to the per-triplet costs and
/// returns what it adds to the fixed part.
fn add_top_k_allowance(spec: &PoolSpec, per_triplet: &mut [f64]) -> f64 {
    let mut fixed = 0.0;
    for (c, target) in per_triplet.iter_mut().zip(&spec.targets) {
        // One triplet: a row of A, an entry of E, a column of B.
        *c += (target.dim_in + 1 + target.dim_out) as f64 * TOP_K_GAP_BYTES_PER_VALUE;
        fixed += 3.0 * TOP_K_GAP_LENGTH_SLACK;
    }
    for l in spec.layout().iter().filter(|l| l.target.is_none()) {
        fixed += l.shape.iter().product::<usize>() as f64 * TOP_K_GAP_BYTES_PER_VALUE + TOP_K_GAP_LENGTH_SLACK;
    }
    fixed
}

fn check_lora_spec(spec: &PoolSpec) -> Result<(), BudgetError> {
    if spec.kind != AdapterKind::AdaLora {
        return Err(BudgetError::Spec(format!(
            "rank budgets cut AdaLoRA triplets: they need an adalora pool, the spec is {:?}",
            spec.kind
        )));
    }
    spec.validate().map_err(|e| BudgetError::Spec(e.to_string()))?;
    if u32::try_from(spec.max_rank).is_err() {
        return Err(BudgetError::Spec(format!("max_rank {} does not fit a TargetBudget (u32)", spec.max_rank)));
    }
    Ok(())
}

fn codec_error(codec: &CodecConfig, source: CodecError) -> BudgetError {
    BudgetError::Codec { codec: codec.describe(), source }
}

/// An upper bound on a target's encoded bytes: `s(1) + excess + slope · (r − 1)`.
#[derive(Debug, Clone, Copy)]
struct Line {
    slope: f64,
    excess: f64,
}

/// Random LoRA deltas of chosen ranks, encoded with the codec being measured.
struct Probe<'a> {
    spec: &'a PoolSpec,
    codec: &'a CodecConfig,
    seed: u64,
}

impl Probe<'_> {
    /// The size of a whole `Update` frame carrying a delta at `ranks` plus the head.
    fn update_len(&self, ranks: &[usize]) -> Result<usize, BudgetError> {
        let delta = self.encode(ranks, true)?;
        let update = worst_case_update(self.spec, delta);
        let body = frame::encoded_len(&update).map_err(|e| codec_error(self.codec, e.into()))?;
        Ok(frame::HEADER_LEN + body)
    }

    /// The line through target `t`'s encoded sizes at ranks 1 and `max_rank`, target `t` alone,
    /// and how far the sizes in between rise above it.
    fn line(&self, t: usize) -> Result<Line, BudgetError> {
        let max_rank = self.spec.max_rank;
        let mut ranks = vec![0; self.spec.targets.len()];
        let mut sizes = Vec::with_capacity(max_rank);
        for r in 1..=max_rank {
            ranks[t] = r;
            sizes.push(self.encode(&ranks, false)?.wire_len() as f64);
        }
        let (first, last) = (sizes[0], sizes[max_rank - 1]);
        let slope = if max_rank > 1 { (last - first) / (max_rank - 1) as f64 } else { 0.0 };
        let excess = sizes.iter().enumerate().map(|(i, s)| s - first - slope * i as f64).fold(0.0, f64::max);
        Ok(Line { slope, excess })
    }

    fn encode(&self, ranks: &[usize], with_head: bool) -> Result<EncodedDelta, BudgetError> {
        let delta = random_delta(self.spec, ranks, with_head, self.seed)?;
        codec::encode(&delta, self.codec, None, self.seed).map_err(|e| codec_error(self.codec, e))
    }
}

/// A LoRA delta with target `t` at rank `ranks[t]` (0: left out), and the spec's other tensors
/// (the head) when `with_head`, filled with standard normal values.
fn random_delta(spec: &PoolSpec, ranks: &[usize], with_head: bool, seed: u64) -> Result<PoolDelta, BudgetError> {
    let index: BTreeMap<&str, usize> = spec.targets.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for l in spec.layout() {
        let shape = match (&l.target, l.role) {
            (None, _) if with_head => l.shape.clone(),
            (None, _) => continue,
            (Some(target), role) => {
                let r = index.get(target.as_str()).and_then(|&i| ranks.get(i)).copied().unwrap_or(0);
                match role {
                    _ if r == 0 => continue,
                    TensorRole::LoraB => vec![l.shape[0], r],
                    _ => vec![r, l.shape[1]],
                }
            }
        };
        let data = (0..shape.iter().product()).map(|_| standard_normal(&mut rng)).collect();
        let tensor = HostTensor::new(shape, data).map_err(|e| BudgetError::Spec(format!("{}: {e}", l.name)))?;
        tensors.insert(l.name, tensor);
    }
    Ok(PoolDelta { spec_hash: spec.hash(), slots: None, tensors })
}

/// One N(0, 1) sample by Box–Muller.
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// An update whose fields other than the delta take their longest encoding: ids and counts at
/// their maximum, one importance score per triplet of every target at `max_rank`.
fn worst_case_update(spec: &PoolSpec, delta: EncodedDelta) -> Update {
    let importance = spec
        .targets
        .iter()
        .map(|t| TripletImportance { target: t.name.clone(), scores: vec![0.0; spec.max_rank] })
        .collect();
    Update {
        round: Round(u64::MAX),
        task_id: TaskId(u64::MAX),
        nonce: Nonce([0xff; 16]),
        examples: u64::MAX,
        delta,
        metrics: TrainMetrics { loss: 0.0, accuracy: 0.0, steps: u32::MAX, seconds: 0.0 },
        importance,
    }
}

/// AdaLoRA's cubic budget schedule (Zhang et al., ICLR 2023; HF PEFT
/// `RankAllocator.budget_schedule`), in rounds; budgets are total triplets over all targets of
/// one client. Named fields rather than six positional integers, which are easy to swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CubicSchedule {
    /// Triplets before and at the end of the warm-up (AdaLoRA: `init_r × targets`).
    pub init_budget: usize,
    /// Triplets in the final rounds (AdaLoRA: `target_r × targets`).
    pub target_budget: usize,
    /// Rounds at the initial budget (PEFT's `tinit`).
    pub warmup_rounds: u64,
    /// Last rounds at the target budget (PEFT's `tfinal`).
    pub final_rounds: u64,
    /// Rounds in the whole run (PEFT's `total_step`).
    pub total_rounds: u64,
}

impl CubicSchedule {
    /// The budget of `round`: `init` up to and at `warmup_rounds`, `target` after
    /// `total_rounds − final_rounds`, the floored cubic in between. When the phases overlap
    /// (`total ≤ warmup + final`) the warm-up wins and the cubic has no rounds.
    pub fn budget(&self, round: Round) -> usize {
        let step = round.0;
        if step <= self.warmup_rounds {
            return self.init_budget;
        }
        let cubic_end = self.total_rounds.saturating_sub(self.final_rounds);
        if step > cubic_end {
            return self.target_budget;
        }
        // warmup < step ≤ cubic_end, so the span is at least 1.
        let span = cubic_end.saturating_sub(self.warmup_rounds).max(1) as f64;
        let left = 1.0 - (step - self.warmup_rounds) as f64 / span;
        let (init, target) = (self.init_budget as f64, self.target_budget as f64);
        (target + (init - target) * left.powi(3)).floor() as usize
    }
}

/// `⌊upload_bps · (deadline − compute) · safety_margin⌋` bytes, 0 when `compute ≥ deadline`
/// (saturating at `u64::MAX`). `upload_bps` is in bytes per second.
pub fn byte_budget(upload_bps: f64, compute: Duration, deadline: Duration, safety_margin: f64) -> u64 {
    let window = deadline.saturating_sub(compute).as_secs_f64();
    // `as` saturates, and maps NaN to 0.
    (upload_bps * window * safety_margin).floor() as u64
}

/// One selected client as the allocation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLink {
    /// The client's name.
    pub client: String,
    /// Its upload bandwidth estimate, bytes per second (finite, ≥ 0; 0 makes it sit out).
    pub upload_bps: f64,
    /// The time before it can start uploading, measured from when the deadline starts: the
    /// task's download, local training and latency.
    pub compute: Duration,
}

/// Everything one round's allocation needs.
#[derive(Debug, Clone, Copy)]
pub struct AllocationInput<'a> {
    /// The LoRA pool spec (targets, names, `max_rank`).
    pub spec: &'a PoolSpec,
    /// Update sizes for this spec and the upload codec.
    pub costs: &'a TripletCosts,
    /// Importance per target (the spec's order), per rank index, `max_rank` finite scores each;
    /// the score of index 0 is never used (rank 1 is always granted).
    pub importance: &'a [Vec<f64>],
    /// Most triplets per client this round (e.g. [`CubicSchedule::budget`]); raised to one per
    /// target, since every participant trains rank 1 everywhere.
    pub schedule_budget: usize,
    /// Time from the task's dispatch until the server stops waiting (must be positive).
    pub deadline: Duration,
    /// Fraction of the ideal bytes a client may plan to send, in (0, 1].
    pub safety_margin: f64,
    /// The selected clients, each named once; the result keeps their order.
    pub clients: &'a [ClientLink],
}

/// What one client is granted this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAllocation {
    /// The client's name.
    pub client: String,
    /// Its grant.
    pub grant: Grant,
}

/// A client's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Train and upload these ranks (one per target in the spec's order, each in
    /// `1..=max_rank`): `RoundTask::rank_budget`.
    Train {
        /// The rank per target.
        ranks: Vec<TargetBudget>,
        /// The update's bound, [`TripletCosts::bytes`] of the ranks (≤ `byte_budget`).
        expected_bytes: u64,
        /// What the client may send, [`byte_budget`].
        byte_budget: u64,
    },
    /// Rank 1 everywhere does not fit (or the compute alone reaches the deadline, or there is
    /// no bandwidth): the client sits this round out.
    SitOut {
        /// What the client may send, [`byte_budget`].
        byte_budget: u64,
        /// The bound on an update at rank 1 everywhere.
        needed_bytes: u64,
    },
}

/// Grants each of `input.clients` its ranks, in the same order (see the module docs for the
/// rule). Refuses inputs that do not fit together or hold non-finite numbers, naming the field.
pub fn allocate(input: &AllocationInput<'_>) -> Result<Vec<ClientAllocation>, BudgetError> {
    check_input(input)?;
    let targets = input.spec.targets.len();
    let max_rank = input.spec.max_rank;
    let order = importance_order(input.importance, max_rank);
    let cap = input.schedule_budget.clamp(targets, targets * max_rank);
    let grants = input
        .clients
        .iter()
        .map(|c| ClientAllocation { client: c.client.clone(), grant: grant(input, c, &order, cap) });
    Ok(grants.collect())
}

/// The order in which triplets beyond rank 1 are granted, as target indices: each entry adds
/// the next triplet of that target. Greedy on the next triplets' scores, ties to the lower index.
fn importance_order(importance: &[Vec<f64>], max_rank: usize) -> Vec<usize> {
    let mut next = vec![1usize; importance.len()];
    let mut order = Vec::with_capacity(importance.len() * max_rank.saturating_sub(1));
    loop {
        let mut best: Option<(usize, f64)> = None;
        for (t, scores) in importance.iter().enumerate() {
            if next[t] >= max_rank {
                continue;
            }
            let Some(&score) = scores.get(next[t]) else { continue };
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((t, score));
            }
        }
        let Some((t, _)) = best else { return order };
        order.push(t);
        next[t] += 1;
    }
}

fn grant(input: &AllocationInput<'_>, client: &ClientLink, order: &[usize], cap: usize) -> Grant {
    let byte_budget = byte_budget(client.upload_bps, client.compute, input.deadline, input.safety_margin);
    let mut ranks = vec![1usize; input.spec.targets.len()];
    let needed_bytes = input.costs.bytes(&ranks);
    if byte_budget == 0 || needed_bytes > byte_budget {
        return Grant::SitOut { byte_budget, needed_bytes };
    }
    // The longest prefix of the order within the schedule's cap that fits the byte budget.
    for &t in order.iter().take(cap.saturating_sub(ranks.len())) {
        ranks[t] += 1;
        if input.costs.bytes(&ranks) > byte_budget {
            ranks[t] -= 1;
            break;
        }
    }
    train_grant(input, &ranks, byte_budget)
}

/// The grant of `ranks` (one per target, the spec's order) with its bound.
fn train_grant(input: &AllocationInput<'_>, ranks: &[usize], byte_budget: u64) -> Grant {
    let expected_bytes = input.costs.bytes(ranks);
    let ranks = input
        .spec
        .targets
        .iter()
        .zip(ranks)
        .map(|(t, &r)| TargetBudget { target: t.name.clone(), rank: u32::try_from(r).unwrap_or(u32::MAX) })
        .collect();
    Grant::Train { ranks, expected_bytes, byte_budget }
}

/// Capacity units of [`allocate_knapsack`]'s table: a client's spare bytes are cut into this
/// many equal units, each triplet's cost rounded up to whole units (so a solution never exceeds
/// the budget; at most 1/2048 of it goes unused to the rounding).
const KNAPSACK_UNITS: usize = 2048;

/// Fed-piLot's allocation (Zhang et al., 2024: rank choice as a knapsack): per client, the ranks
/// that maximise the total importance of the granted triplets, `Σ_t Σ_{i < r_t} I_t,i`, with
/// the update's bound within the client's byte budget and at most the schedule's triplets; each
/// target's triplets are still a prefix (rank `r` is triplets `0..r`), so this is a
/// multiple-choice knapsack over targets (value: the prefix's importance, weight: its encoded
/// bytes, capacity: the byte budget), solved exactly by dynamic programming over byte units and
/// triplet counts. Where importance falls along every target's index the greedy prefix of
/// [`allocate`] is already optimal and both agree; where it does not (a later triplet scores
/// higher than an earlier one) the knapsack can buy it. Ties go to fewer bytes. Same checks,
/// sit-outs and result as [`allocate`].
pub fn allocate_knapsack(input: &AllocationInput<'_>) -> Result<Vec<ClientAllocation>, BudgetError> {
    check_input(input)?;
    let targets = input.spec.targets.len();
    let max_rank = input.spec.max_rank;
    let cap = input.schedule_budget.clamp(targets, targets * max_rank);
    let grants = input.clients.iter().map(|c| {
        let byte_budget = byte_budget(c.upload_bps, c.compute, input.deadline, input.safety_margin);
        let base = vec![1usize; targets];
        let needed_bytes = input.costs.bytes(&base);
        let grant = if byte_budget == 0 || needed_bytes > byte_budget {
            Grant::SitOut { byte_budget, needed_bytes }
        } else {
            train_grant(input, &knapsack_ranks(input, byte_budget, cap), byte_budget)
        };
        ClientAllocation { client: c.client.clone(), grant }
    });
    Ok(grants.collect())
}

/// The ranks (each ≥ 1) of [`allocate_knapsack`] for one client whose rank-1 update fits.
fn knapsack_ranks(input: &AllocationInput<'_>, byte_budget: u64, cap: usize) -> Vec<usize> {
    let targets = input.spec.targets.len();
    let max_rank = input.spec.max_rank;
    // Bytes beyond rank 1 everywhere, one byte kept for the bound's ceiling.
    let spare = byte_budget.saturating_sub(input.costs.bytes(&vec![1; targets])).saturating_sub(1) as f64;
    let unit = (spare / KNAPSACK_UNITS as f64).max(1.0);
    let units = (spare / unit).floor() as usize;
    let extra_cap = cap - targets;
    // best[u][n]: the most importance with `u` units and `n` extra triplets; NEG: unreachable.
    const NEG: f64 = f64::NEG_INFINITY;
    let width = extra_cap + 1;
    let mut best = vec![NEG; (units + 1) * width];
    best[0] = 0.0;
    let mut choice = vec![0u16; targets * (units + 1) * width];
    for t in 0..targets {
        let per = input.costs.per_triplet()[t];
        let scores = &input.importance[t];
        let mut next = vec![NEG; best.len()];
        for u in 0..=units {
            for n in 0..width {
                let here = best[u * width + n];
                if here == NEG {
                    continue;
                }
                let mut value = here;
                for (extra, score) in scores.iter().enumerate().take(max_rank) {
                    if extra > 0 {
                        value += score;
                    }
                    let cost = (per * extra as f64 / unit).ceil() as usize;
                    let (u2, n2) = (u + cost, n + extra);
                    if u2 > units || n2 > extra_cap {
                        break;
                    }
                    let slot = u2 * width + n2;
                    if value > next[slot] {
                        next[slot] = value;
                        choice[(t * (units + 1) + u2) * width + n2] = u16::try_from(extra).unwrap_or(u16::MAX);
                    }
                }
            }
        }
        best = next;
    }
    // The best end state, ties to fewer units (bytes), then fewer triplets.
    let mut end = (0usize, 0usize);
    let mut top = NEG;
    for u in 0..=units {
        for n in 0..width {
            if best[u * width + n] > top {
                top = best[u * width + n];
                end = (u, n);
            }
        }
    }
    let mut ranks = vec![1usize; targets];
    let (mut u, mut n) = end;
    for t in (0..targets).rev() {
        let extra = usize::from(choice[(t * (units + 1) + u) * width + n]);
        ranks[t] += extra;
        u -= (input.costs.per_triplet()[t] * extra as f64 / unit).ceil() as usize;
        n -= extra;
    }
    ranks
}

fn check_input(input: &AllocationInput<'_>) -> Result<(), BudgetError> {
    check_lora_spec(input.spec)?;
    let spec = input.spec;
    let targets = spec.targets.len();
    if input.costs.per_triplet.len() != targets {
        let problem = format!("measured for {} targets, the spec has {targets}", input.costs.per_triplet.len());
        return Err(input_error("costs", problem));
    }
    check_importance(input.importance, spec)?;
    if input.deadline.is_zero() {
        return Err(input_error("deadline", "must be positive"));
    }
    let m = input.safety_margin;
    if !(m.is_finite() && m > 0.0 && m <= 1.0) {
        return Err(input_error("safety_margin", format!("{m} is not in (0, 1]")));
    }
    check_clients(input.clients)
}

fn check_importance(importance: &[Vec<f64>], spec: &PoolSpec) -> Result<(), BudgetError> {
    if importance.len() != spec.targets.len() {
        let problem = format!("{} targets scored, the spec has {}", importance.len(), spec.targets.len());
        return Err(input_error("importance", problem));
    }
    for (t, (scores, target)) in importance.iter().zip(&spec.targets).enumerate() {
        let field = || format!("importance[{t}] (target {:?})", target.name);
        if scores.len() != spec.max_rank {
            return Err(input_error(field(), format!("{} scores, expected max_rank {}", scores.len(), spec.max_rank)));
        }
        if let Some((r, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(input_error(field(), format!("score of rank index {r} is {s}")));
        }
    }
    Ok(())
}

fn check_clients(clients: &[ClientLink]) -> Result<(), BudgetError> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, c) in clients.iter().enumerate() {
        if let Some(first) = seen.insert(c.client.as_str(), i) {
            return Err(input_error(
                format!("clients[{i}]"),
                format!("client {:?} is also clients[{first}]", c.client),
            ));
        }
        let b = c.upload_bps;
        if !(b.is_finite() && b >= 0.0) {
            let problem = format!("{b} is not a finite number ≥ 0 of bytes per second");
            return Err(input_error(format!("clients[{i}] {:?}: upload_bps", c.client), problem));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedpool_common::TargetSpec;

    fn schedule() -> CubicSchedule {
        CubicSchedule { init_budget: 120, target_budget: 48, warmup_rounds: 5, final_rounds: 10, total_rounds: 55 }
    }

    #[test]
    fn schedule_holds_init_through_warmup_and_target_in_the_final_rounds() {
        let s = schedule();
        for r in 0..=5 {
            assert_eq!(s.budget(Round(r)), 120, "round {r}");
        }
        for r in 46..=60 {
            assert_eq!(s.budget(Round(r)), 48, "round {r}");
        }
    }

    #[test]
    fn schedule_matches_peft_budget_schedule_in_between() {
        // PEFT: int((init − target) · (1 − (step − tinit)/(total − tfinal − tinit))³ + target).
        let s = schedule();
        let peft = |step: u64| (72.0 * (1.0 - (step as f64 - 5.0) / 40.0).powi(3) + 48.0) as usize;
        for r in 6..=45 {
            assert_eq!(s.budget(Round(r)), peft(r), "round {r}");
        }
        assert_eq!(s.budget(Round(25)), 57); // 48 + 72 · 0.5³ = 57
        assert_eq!(s.budget(Round(45)), 48);
        let budgets: Vec<usize> = (0..=60).map(|r| s.budget(Round(r))).collect();
        assert!(budgets.windows(2).all(|w| w[0] >= w[1]), "non-increasing: {budgets:?}");
    }

    #[test]
    fn degenerate_schedules_do_not_panic() {
        let mut s =
            CubicSchedule { init_budget: 10, target_budget: 4, warmup_rounds: 8, final_rounds: 8, total_rounds: 10 };
        assert_eq!(s.budget(Round(8)), 10);
        assert_eq!(s.budget(Round(9)), 4);
        s.final_rounds = 100;
        s.warmup_rounds = 0;
        assert_eq!(s.budget(Round(0)), 10);
        assert_eq!(s.budget(Round(1)), 4);
        s = CubicSchedule { init_budget: 10, target_budget: 4, warmup_rounds: 0, final_rounds: 0, total_rounds: 0 };
        assert_eq!(s.budget(Round(u64::MAX)), 4);
        s.total_rounds = u64::MAX;
        assert_eq!(s.budget(Round(1)), 10, "1 − 1/u64::MAX rounds to 1");
    }

    #[test]
    fn byte_budget_is_bandwidth_times_window_times_margin() {
        let b = byte_budget(1_000.0, Duration::from_secs(4), Duration::from_secs(10), 0.5);
        assert_eq!(b, 3_000);
        assert_eq!(byte_budget(1e6, Duration::from_secs(10), Duration::from_secs(10), 1.0), 0);
        assert_eq!(byte_budget(1e6, Duration::from_secs(11), Duration::from_secs(10), 1.0), 0);
        assert_eq!(byte_budget(f64::MAX, Duration::ZERO, Duration::from_secs(10), 1.0), u64::MAX);
    }

    #[test]
    fn order_follows_the_marginal_triplet_even_when_scores_rise_within_a_target() {
        // Target 0's index 1 is weak but index 2 is strong: the prefix rule must take index 1 first.
        let importance = vec![vec![0.0, 1.0, 9.0], vec![0.0, 5.0, 4.0]];
        assert_eq!(importance_order(&importance, 3), vec![1, 1, 0, 0]);
        // Ties go to the lower target index.
        let importance = vec![vec![0.0, 5.0, 5.0], vec![0.0, 5.0, 5.0]];
        assert_eq!(importance_order(&importance, 3), vec![0, 0, 1, 1]);
        assert!(importance_order(&[vec![1.0], vec![2.0]], 1).is_empty());
    }

    #[test]
    fn top_k_allowance_covers_each_value_and_tensor() {
        let t = |name: &str| TargetSpec { name: name.into(), dim_in: 127, dim_out: 0 };
        let spec = PoolSpec::adalora(vec![t("a"), t("b")], 4, 8.0, None);
        let mut per = vec![1.0, 2.0];
        let fixed = add_top_k_allowance(&spec, &mut per);
        assert_eq!(per, vec![2.0, 3.0]);
        assert_eq!(fixed, 2.0 * 3.0 * TOP_K_GAP_LENGTH_SLACK);
    }
}
