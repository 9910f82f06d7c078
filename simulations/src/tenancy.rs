//! Virtual clients as slices of stacked adapters over one shared backbone (issue "Simulator",
//! item 1): K clients' FedIns SSF pools are stacked into one pool of K·P slots; every step takes a
//! batch from each active client, runs **one** forward/backward over the frozen backbone, where
//! each row may select only among its own client's P slots (a slot bias on the query–key
//! similarities, [`fedpool_client::train::forward_masked`]), and the loss is the sum of the
//! clients' own mean losses, so each client's slots get exactly the gradient of its own loss.
//! [`MaskedAdamW`] keeps AdamW's moments per element and its step count per client, and updates
//! only the rows of the clients that took part in the step: a client whose steps are done drops
//! out without changing the others. The result equals training each client alone with
//! [`fedpool_client::train::train`] (the equivalence tests in `tests/integration/tenancy.rs`).
//!
//! LoRA (both forms) runs the same way: each factor is stacked with a leading client axis
//! `[K, ...]`, each row gathers its client's B, A (and AdaLoRA's λ) and head (per-row factors in
//! the model's hooks, batched matmuls), and each AdaLoRA client's loss adds its own orthogonality
//! term. Dropout masks are keyed by each client's seed, step and example
//! ([`fedpool_client::model::Dropout`]), so a row drops what it would drop trained alone.
//!
//! AdaLoRA's triplet importance is tracked per client as [`fedpool_client::train::train`] tracks
//! it: after each backward pass and before the optimizer step, every active client's
//! [`ImportanceTracker`] takes `|w · ∂L/∂w|` of its own slice of P, λ and Q. The gradient of the
//! summed loss on client k's slice is the gradient of client k's own loss (its mean cross-entropy
//! plus its orthogonality term), so its scores equal training alone up to f32 summation order
//! (within 1e-4 of the largest score: `tests/integration/tenancy.rs`).
//!
//! Memory: the backbone once; per client its adapters, two AdamW moments and, for AdaLoRA, its
//! importance averages (two per factor element).

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Tensor, Var};
use fedpool_client::model::BertEncoder;
use fedpool_client::model::Dropout;
use fedpool_client::select::SlotCounter;
use fedpool_client::train::{
    dropout_probability, forward_masked, head_features, weight_decays, Batch, BatchOrder, Encoded, ImportanceTracker,
    LoraTrain, QueryCache, TrainConfig, TrainError, TrainableParams,
};
use fedpool_common::adapter::{AdapterKind, AdapterPool, PoolDelta, PoolSpec, SlotUsage};
use fedpool_common::tensor::HostTensor;
use fedpool_common::wire::TripletImportance;

/// Bits of an example id left for the example: the client index goes above them, so ids of
/// different clients never collide in the shared query cache.
const CLIENT_SHIFT: u32 = 40;

/// Why lockstep training could not run.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    /// Training failed (shapes, data, numerics).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A tensor computation failed.
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    /// The setup cannot run in lockstep.
    #[error("{0}")]
    Unsupported(String),
}

/// One virtual client's work for a lockstep run.
#[derive(Debug, Clone)]
pub struct VirtualClient<'a> {
    /// A number unique to this client among all clients whose calls share a query cache (the
    /// cache keys its examples by it, so clients may reuse example ids).
    pub key: u64,
    /// Its training examples.
    pub train: &'a [Encoded],
    /// The pool it starts from (the global pool it received).
    pub start: &'a AdapterPool,
    /// Its local training settings (steps, batch size, learning rates, schedule, seed).
    pub config: TrainConfig,
}

/// What one virtual client's training produced.
#[derive(Debug, Clone)]
pub struct ClientOutcome {
    /// The trained pool.
    pub pool: AdapterPool,
    /// `pool − start`, restricted to the used slots, with their usage counts (ready to encode).
    pub delta: PoolDelta,
    /// Mean training loss over its steps.
    pub train_loss: f64,
    /// Steps it took.
    pub steps: usize,
    /// Training rows it processed.
    pub samples: usize,
    /// Of those, the rows its model classified correctly (at the time of the step).
    pub correct: usize,
    /// AdaLoRA's triplet importance after its steps, as `train::train`'s `TrainOutcome::importance`
    /// (empty for other adapters).
    pub importance: Vec<TripletImportance>,
}

/// AdamW over tensors whose leading axis is made of per-client blocks of rows: moments per
/// element, step count and learning rate per client, and only the rows of the clients active in
/// a step move. Its update is candle's `AdamW` formula (decoupled weight decay, as the trainer
/// uses: [`fedpool_client::train::weight_decays`]), element by element.
#[derive(Debug)]
pub struct MaskedAdamW {
    vars: Vec<(Var, Tensor, Tensor, bool)>,
    rows_per_client: usize,
    steps: Vec<u32>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Weight decay of (adapter, head) tensors.
    decays: (f64, f64),
}

impl MaskedAdamW {
    /// An optimizer for `vars` (leading axis `clients × rows_per_client`); `is_head[i]` says
    /// whether var i learns at the head's rate and decays by `decays.1` (else `decays.0`). β and
    /// ε are candle's `ParamsAdamW` defaults.
    pub fn new(
        vars: Vec<(Var, bool)>,
        clients: usize,
        rows_per_client: usize,
        decays: (f64, f64),
    ) -> Result<Self, TenancyError> {
        let mut out = Vec::new();
        for (v, head) in vars {
            let zeros = v.as_tensor().zeros_like()?;
            if v.dims().first() != Some(&(clients * rows_per_client)) {
                return Err(TenancyError::Unsupported(format!(
                    "a stacked tensor of shape {:?} does not lead with {clients} × {rows_per_client} rows",
                    v.dims()
                )));
            }
            out.push((v, zeros.clone(), zeros, head));
        }
        let d = candle_nn::ParamsAdamW::default();
        Ok(Self {
            vars: out,
            rows_per_client,
            steps: vec![0; clients],
            beta1: d.beta1,
            beta2: d.beta2,
            eps: d.eps,
            decays,
        })
    }

    /// One step for the clients in `active` (by index), each at its own learning rates
    /// `(adapter lr, head lr)`.
    pub fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        active: &[bool],
        lrs: &[(f64, f64)],
    ) -> Result<(), TenancyError> {
        let clients = self.steps.len();
        for (c, a) in active.iter().enumerate() {
            if *a {
                self.steps[c] += 1;
            }
        }
        let per_row = |f: &dyn Fn(usize) -> f64| -> Vec<f32> {
            (0..clients).flat_map(|c| std::iter::repeat_n(f(c) as f32, self.rows_per_client)).collect()
        };
        let mask = per_row(&|c| if active[c] { 1.0 } else { 0.0 });
        let scale_m = per_row(&|c| 1.0 / (1.0 - self.beta1.powi(self.steps[c].max(1) as i32)));
        let scale_v = per_row(&|c| 1.0 / (1.0 - self.beta2.powi(self.steps[c].max(1) as i32)));
        for (var, m, v, head) in self.vars.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let dims = var.dims().to_vec();
            let mut col = vec![1usize; dims.len()];
            col[0] = dims[0];
            let device = var.device().clone();
            let column = |values: &[f32]| Tensor::from_slice(values, col.as_slice(), &device);
            let lr = per_row(&|c| if *head { lrs[c].1 } else { lrs[c].0 });
            let decay = if *head { self.decays.1 } else { self.decays.0 };
            // candle's θ·(1 − lr·λ) for an active row, θ·1 for the others.
            let shrink =
                per_row(&|c| if active[c] { 1.0 - (if *head { lrs[c].1 } else { lrs[c].0 }) * decay } else { 1.0 });
            let (mask_t, keep_t) = (column(&mask)?, column(&mask.iter().map(|x| 1.0 - x).collect::<Vec<_>>())?);
            let next_m = ((&*m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let next_v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = next_m.broadcast_mul(&column(&scale_m)?)?;
            let v_hat = next_v.broadcast_mul(&column(&scale_v)?)?;
            let adjusted = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let step = adjusted.broadcast_mul(&column(&lr)?)?.broadcast_mul(&mask_t)?;
            let theta =
                if decay > 0.0 { var.as_tensor().broadcast_mul(&column(&shrink)?)? } else { var.as_tensor().clone() };
            var.set(&(theta - step)?)?;
            *m = (next_m.broadcast_mul(&mask_t)? + m.broadcast_mul(&keep_t)?)?;
            *v = (next_v.broadcast_mul(&mask_t)? + v.broadcast_mul(&keep_t)?)?;
        }
        Ok(())
    }
}

/// Consecutive groups of clients whose batches (`batch_sizes`, in client order) fit in
/// `max_rows` rows together; a client larger than the limit is a group of its own.
pub fn client_groups(batch_sizes: &[usize], max_rows: usize) -> Vec<Range<usize>> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut rows = 0usize;
    for (c, &b) in batch_sizes.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if rows + b <= max_rows => {
                g.end = c + 1;
                rows += b;
            }
            _ => {
                groups.push(c..c + 1);
                rows = b;
            }
        }
    }
    groups
}

/// [`train_lockstep`] over [`client_groups`] of at most `max_rows_per_pass` rows, one group after
/// another (all of a group's steps, then the next group), so memory holds one group's adapters,
/// moments and activations, not every client's. Clients share no parameters, so the result does
/// not depend on the grouping.
pub fn train_lockstep_bounded(
    model: &BertEncoder,
    spec: &PoolSpec,
    clients: &[VirtualClient<'_>],
    queries: &mut QueryCache,
    pad_id: u32,
    max_rows_per_pass: usize,
) -> Result<Vec<ClientOutcome>, TenancyError> {
    let batches: Vec<usize> = clients.iter().map(|vc| vc.config.batch_size).collect();
    let mut outcomes = Vec::with_capacity(clients.len());
    for group in client_groups(&batches, max_rows_per_pass) {
        outcomes.extend(train_lockstep(model, spec, &clients[group], queries, pad_id)?);
    }
    Ok(outcomes)
}

/// Trains `clients` (all on `spec`: a FedIns SSF pool with P > 1 slots, or LoRA) in lockstep over
/// one shared `model`, every step in one pass. `queries` caches frozen features across calls
/// (keyed by each client's `key` and the example's id).
pub fn train_lockstep(
    model: &BertEncoder,
    spec: &PoolSpec,
    clients: &[VirtualClient<'_>],
    queries: &mut QueryCache,
    pad_id: u32,
) -> Result<Vec<ClientOutcome>, TenancyError> {
    if clients.is_empty() {
        return Ok(Vec::new());
    }
    if spec.kind.is_lora() {
        return train_lockstep_lora(model, spec, clients, pad_id);
    }
    if !spec.has_keys() || spec.pool_size < 2 {
        return Err(TenancyError::Unsupported(
            "lockstep training is built for FedIns SSF pools with at least two slots and for LoRA".into(),
        ));
    }
    let k = clients.len();
    let p = spec.pool_size;
    let device = model.device().clone();
    let (dropout, decays) = check_clients(model, spec, clients)?;

    // The stacked pool: every tensor's slot axis concatenated over clients.
    let stacked_spec = PoolSpec { pool_size: k * p, ..spec.clone() };
    let mut stacked = AdapterPool::zeros(&stacked_spec);
    for (name, t) in stacked.tensors.iter_mut() {
        let data: Vec<f32> = clients.iter().flat_map(|vc| vc.start.tensors[name].data().iter().copied()).collect();
        *t = HostTensor::new(t.shape().to_vec(), data).map_err(|e| TenancyError::Unsupported(e.to_string()))?;
    }
    let params = TrainableParams::new(&stacked, false, &device)?;
    let (adapter_vars, head_vars) = params.trainable_vars_by_group();
    let vars: Vec<(Var, bool)> =
        adapter_vars.into_iter().map(|v| (v, false)).chain(head_vars.into_iter().map(|v| (v, true))).collect();
    let mut optimizer = MaskedAdamW::new(vars, k, p, decays)?;

    // Examples re-identified per client, batch orders as the solo trainer makes them.
    let rows: Vec<Vec<Encoded>> = clients
        .iter()
        .map(|vc| vc.train.iter().map(|e| Encoded { id: (vc.key << CLIENT_SHIFT) | e.id, ..e.clone() }).collect())
        .collect();
    let mut orders: Vec<BatchOrder> =
        clients.iter().map(|vc| BatchOrder::new(vc.train.len(), vc.config.batch_size, vc.config.seed)).collect();
    let max_steps = clients.iter().map(|vc| vc.config.steps).max().unwrap_or(0);
    let mut loss_sums = vec![0.0f64; k];
    let mut samples = vec![0usize; k];
    let mut correct = vec![0usize; k];
    let mut last_selection: Vec<HashMap<u64, Vec<u32>>> = vec![HashMap::new(); k];
    let lambda = clients[0].config.lambda_match;

    for step in 0..max_steps {
        // Every client still stepping takes part in this step's pass.
        let active: Vec<bool> = clients.iter().map(|vc| step < vc.config.steps).collect();
        let mut batch_rows: Vec<&Encoded> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut row_keys = Vec::new();
        for c in (0..k).filter(|&c| active[c]) {
            for i in orders[c].next_batch() {
                batch_rows.push(&rows[c][i]);
                owner.push(c);
                row_keys.push(Dropout::row_key(clients[c].config.seed, step, clients[c].train[i].id));
            }
        }
        let batch = Batch::pad(&batch_rows, pad_id, &device)?;
        queries.fill(model, batch_rows.iter().copied(), batch_rows.len(), pad_id)?;
        let q = queries.batch(&batch.example_ids, &device)?;
        // Each row may pick only its own client's slots; each client's loss is its own mean.
        let mut bias = vec![-1.0e4f32; owner.len() * k * p];
        let mut weights = vec![0f32; owner.len()];
        let count = |c: usize| owner.iter().filter(|&&o| o == c).count();
        let counts: Vec<usize> = (0..k).map(count).collect();
        for (b, &c) in owner.iter().enumerate() {
            bias[b * k * p + c * p..b * k * p + (c + 1) * p].iter_mut().for_each(|x| *x = 0.0);
            weights[b] = 1.0 / counts[c] as f32;
        }
        let bias = Tensor::from_vec(bias, (owner.len(), k * p), &device)?;
        let weights = Tensor::from_vec(weights, owner.len(), &device)?;
        let adapters = params.tracked(&stacked_spec, false).with_dropout(Dropout { p: dropout, row_keys });
        let out = forward_masked(model, &adapters, &batch, Some(&q), lambda, Some(&bias))?;
        let total = (&out.loss_per_example * &weights)?.sum_all()?;
        let per_row: Vec<f32> = out.loss_per_example.to_dtype(DType::F32)?.to_vec1()?;
        let predicted = out.predictions()?;
        for (b, &c) in owner.iter().enumerate() {
            loss_sums[c] += f64::from(per_row[b]) / counts[c] as f64;
            samples[c] += 1;
            correct[c] += usize::from(predicted[b] == batch_rows[b].label);
            let local: Vec<u32> = out.selection.row(b).iter().map(|&s| s - (c * p) as u32).collect();
            last_selection[c].insert(batch.example_ids[b], local);
        }
        let grads = total.backward()?;
        optimizer.step(&grads, &active, &learning_rates(clients, step))?;
    }

    // Slice each client's rows back out.
    let trained = params.to_pool()?;
    let mut outcomes = Vec::with_capacity(k);
    for (c, vc) in clients.iter().enumerate() {
        let mut pool = AdapterPool::zeros(spec);
        for (name, t) in pool.tensors.iter_mut() {
            let all = &trained.tensors[name];
            let row_len = all.numel() / (k * p);
            let data = all.data()[c * p * row_len..(c + 1) * p * row_len].to_vec();
            *t = HostTensor::new(t.shape().to_vec(), data).map_err(|e| TenancyError::Unsupported(e.to_string()))?;
        }
        let mut counter = SlotCounter::new(p);
        for slots in last_selection[c].values() {
            counter.record_row(slots);
        }
        let usage: SlotUsage =
            counter.usage().ok_or_else(|| TenancyError::Unsupported(format!("client {c} selected no slot")))?;
        outcomes.push(outcome(vc, pool, Some(usage), loss_sums[c], (samples[c], correct[c]), Vec::new())?);
    }
    Ok(outcomes)
}

/// A client's outcome from its trained pool: the delta from its start (restricted to the used
/// slots with `usage`), its mean loss over its steps, its rows seen and classified correctly, its
/// AdaLoRA importance.
fn outcome(
    vc: &VirtualClient<'_>,
    pool: AdapterPool,
    usage: Option<SlotUsage>,
    loss_sum: f64,
    (samples, correct): (usize, usize),
    importance: Vec<TripletImportance>,
) -> Result<ClientOutcome, TenancyError> {
    let mut delta = pool.delta_from(vc.start).map_err(TrainError::from)?;
    if let Some(u) = usage {
        delta = delta.restrict_to_slots(u).map_err(TrainError::from)?;
    }
    vc.config.lora_train.drop_frozen(&mut delta);
    let steps = vc.config.steps;
    Ok(ClientOutcome { pool, delta, train_loss: loss_sum / steps.max(1) as f64, steps, samples, correct, importance })
}

/// Checks what every lockstep run needs of its clients; returns the dropout probability and the
/// (adapter, head) weight decays they share.
fn check_clients(
    model: &BertEncoder,
    spec: &PoolSpec,
    clients: &[VirtualClient<'_>],
) -> Result<(f64, (f64, f64)), TenancyError> {
    let first = &clients[0].config;
    let shared = (dropout_probability(model, first)?, weight_decays(spec, first)?);
    for (c, vc) in clients.iter().enumerate() {
        if (dropout_probability(model, &vc.config)?, weight_decays(spec, &vc.config)?) != shared {
            return Err(TenancyError::Unsupported(format!(
                "client {c}'s dropout or weight decay differs from client 0's: lockstep clients share them"
            )));
        }
        vc.start.validate(spec).map_err(TrainError::from)?;
        if vc.train.is_empty() || vc.config.batch_size == 0 {
            return Err(TenancyError::Unsupported(format!("client {c} has no training examples or batch size 0")));
        }
        if vc.config.head_only || vc.config.lambda_match != clients[0].config.lambda_match {
            return Err(TenancyError::Unsupported("all clients must share λ and train adapters, not a probe".into()));
        }
    }
    Ok(shared)
}

/// The learning rates `(adapters, head)` of every client at `step`.
fn learning_rates(clients: &[VirtualClient<'_>], step: usize) -> Vec<(f64, f64)> {
    clients
        .iter()
        .map(|vc| {
            let c = &vc.config;
            let head = c.head_lr.unwrap_or(c.lr);
            (c.schedule.lr(c.lr, step, c.warmup_steps, c.steps), c.schedule.lr(head, step, c.warmup_steps, c.steps))
        })
        .collect()
}

/// LoRA in lockstep: every tensor stacked `[K, ...]`, per-row factors gathered by client.
fn train_lockstep_lora(
    model: &BertEncoder,
    spec: &PoolSpec,
    clients: &[VirtualClient<'_>],
    pad_id: u32,
) -> Result<Vec<ClientOutcome>, TenancyError> {
    use candle_core::D;
    use fedpool_client::model::{Hooks, Lora};
    use fedpool_client::train::{orthogonality, AdapterTensors};
    use std::collections::BTreeMap;

    let (dropout, decays) = check_clients(model, spec, clients)?;
    let k = clients.len();
    let device = model.device().clone();
    let head = spec.head.ok_or_else(|| TenancyError::Unsupported("the LoRA spec has no head".into()))?;
    let is_head = |n: &str| n == fedpool_common::adapter::HEAD_WEIGHT || n == fedpool_common::adapter::HEAD_BIAS;
    let mut stacked: BTreeMap<String, Var> = BTreeMap::new();
    for name in clients[0].start.tensors.keys() {
        let parts: Vec<Tensor> = clients
            .iter()
            .map(|vc| {
                let t = vc.start.tensors[name]
                    .to_candle(&device)
                    .map_err(|e| TenancyError::Unsupported(format!("tensor {name}: {e}")))?;
                Ok(t.unsqueeze(0)?)
            })
            .collect::<Result<_, TenancyError>>()?;
        stacked.insert(name.clone(), Var::from_tensor(&Tensor::cat(&parts, 0)?)?);
    }
    // Frozen factors (FFA-LoRA, RoLoRA) never reach the optimizer; the clients of a pass share them.
    let lora_train = clients[0].config.lora_train;
    if clients.iter().any(|vc| vc.config.lora_train != lora_train) {
        return Err(TenancyError::Unsupported("lockstep clients train the same LoRA factors".into()));
    }
    if lora_train != LoraTrain::Both && spec.kind != AdapterKind::Lora {
        // As `train::train` refuses it: AdaLoRA's λ and orthogonality need both factors.
        return Err(TenancyError::Unsupported(
            "training one LoRA factor (ffa, rolora) needs standard LoRA (adapter lora)".into(),
        ));
    }
    let vars: Vec<(Var, bool)> =
        stacked.iter().filter(|(n, _)| !lora_train.freezes(n)).map(|(n, v)| (v.clone(), is_head(n))).collect();
    let mut optimizer = MaskedAdamW::new(vars, k, 1, decays)?;
    let mut orders: Vec<BatchOrder> =
        clients.iter().map(|vc| BatchOrder::new(vc.train.len(), vc.config.batch_size, vc.config.seed)).collect();
    let max_steps = clients.iter().map(|vc| vc.config.steps).max().unwrap_or(0);
    let mut loss_sums = vec![0.0f64; k];
    let mut samples = vec![0usize; k];
    let mut correct = vec![0usize; k];
    let scaling = f64::from(spec.lora_alpha) / spec.max_rank as f64;
    // One AdaLoRA importance tracker per client (`None` for standard LoRA).
    let mut trackers: Option<Vec<ImportanceTracker>> = (0..k).map(|_| ImportanceTracker::new(spec)).collect();

    for step in 0..max_steps {
        // Every client still stepping takes part in this step's pass.
        let active: Vec<bool> = clients.iter().map(|vc| step < vc.config.steps).collect();
        let (mut batch_rows, mut owner): (Vec<&Encoded>, Vec<u32>) = (Vec::new(), Vec::new());
        let mut row_keys = Vec::new();
        for c in (0..k).filter(|&c| active[c]) {
            for i in orders[c].next_batch() {
                batch_rows.push(&clients[c].train[i]);
                owner.push(c as u32);
                row_keys.push(Dropout::row_key(clients[c].config.seed, step, clients[c].train[i].id));
            }
        }
        let batch = Batch::pad(&batch_rows, pad_id, &device)?;
        let counts: Vec<usize> = (0..k).map(|c| owner.iter().filter(|&&o| o as usize == c).count()).collect();
        let idx = Tensor::from_slice(&owner, owner.len(), &device)?;
        // A pass of one client's rows gives the model shared factors, not one copy per row: the
        // fused path then packs the real tokens (no padding) and runs each LoRA product as one
        // matmul. This is the CPU default (one client per pass).
        let only = owner.first().copied().filter(|&c| owner.iter().all(|&o| o == c));
        let rows = |name: &str| -> Result<Tensor, TenancyError> {
            let v = stacked.get(name).ok_or_else(|| TenancyError::Unsupported(format!("no tensor {name}")))?;
            Ok(match only {
                Some(c) => v.as_tensor().narrow(0, c as usize, 1)?.squeeze(0)?,
                None => v.as_tensor().index_select(&idx, 0)?,
            })
        };
        let mut hooks = Hooks::new();
        hooks.set_dropout(Dropout { p: dropout, row_keys });
        // Standard LoRA is B·A: a constant λ = 1 (per row when the factors are).
        let ones = match only {
            Some(_) => Tensor::ones(spec.max_rank, DType::F32, &device)?,
            None => Tensor::ones((owner.len(), spec.max_rank), DType::F32, &device)?,
        };
        for t in &spec.targets {
            let q = rows(&format!("{}.lora_A.weight", t.name))?;
            let lambda = match spec.kind {
                AdapterKind::AdaLora => rows(&format!("{}.lora_E.weight", t.name))?.squeeze(D::Minus1)?,
                _ => ones.clone(),
            };
            let p = rows(&format!("{}.lora_B.weight", t.name))?;
            hooks.set_lora(t.name.clone(), Lora::new(p, lambda, q, scaling));
        }
        let features = head_features(model, spec, &batch, &hooks)?;
        let w = rows(fedpool_common::adapter::HEAD_WEIGHT)?; // [B, L, d], or [L, d] shared
        let b = rows(fedpool_common::adapter::HEAD_BIAS)?; // [B, L], or [L] shared
        let logits = match only {
            Some(_) => features.matmul(&w.t()?)?.broadcast_add(&b)?,
            None => (w.matmul(&features.unsqueeze(2)?)?.squeeze(2)? + b)?,
        };
        debug_assert_eq!(logits.dim(1)?, head.num_labels);
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let ce = log_probs.gather(&batch.labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let weights: Vec<f32> = owner.iter().map(|&c| 1.0 / counts[c as usize] as f32).collect();
        let mut total = (&ce * Tensor::from_vec(weights, owner.len(), &device)?)?.sum_all()?;
        let per_row: Vec<f32> = ce.to_vec1()?;
        let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let mut orth_values = vec![0.0f64; k];
        for c in (0..k).filter(|&c| active[c]) {
            let weight = clients[c].config.orth_reg_weight;
            if weight > 0.0 && spec.kind == AdapterKind::AdaLora {
                let own: BTreeMap<String, Tensor> = stacked
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().narrow(0, c, 1)?.squeeze(0)?)))
                    .collect::<Result<_, candle_core::Error>>()?;
                let orth = (orthogonality(&AdapterTensors::from_tensors(spec, false, own, &device))? * weight)?;
                orth_values[c] = f64::from(orth.to_scalar::<f32>()?);
                total = (total + orth)?;
            }
        }
        for (r, &c) in owner.iter().enumerate() {
            loss_sums[c as usize] += f64::from(per_row[r]) / counts[c as usize] as f64;
            samples[c as usize] += 1;
            correct[c as usize] += usize::from(predicted[r] as usize == batch_rows[r].label);
        }
        for c in (0..k).filter(|&c| active[c]) {
            loss_sums[c] += orth_values[c];
        }
        let grads = total.backward()?;
        // As `train::train`: the values before this step's update, the gradients of the loss with
        // the orthogonality term; each active client's chunk of a stacked tensor is its own.
        if let Some(trackers) = trackers.as_mut() {
            for name in trackers[0].tensor_names() {
                let v = stacked.get(&name).ok_or_else(|| TenancyError::Unsupported(format!("no tensor {name}")))?;
                let all = ImportanceTracker::sensitivity(v.as_tensor(), grads.get(v.as_tensor()))?;
                let per_client = all.len() / k;
                for c in (0..k).filter(|&c| active[c]) {
                    trackers[c].update_element(&name, &all[c * per_client..(c + 1) * per_client]);
                }
            }
        }
        optimizer.step(&grads, &active, &learning_rates(clients, step))?;
    }

    let mut outcomes = Vec::with_capacity(k);
    for (c, vc) in clients.iter().enumerate() {
        let mut pool = vc.start.clone();
        for (name, t) in pool.tensors.iter_mut() {
            let data: Vec<f32> = stacked[name].as_tensor().narrow(0, c, 1)?.flatten_all()?.to_vec1()?;
            *t = HostTensor::new(t.shape().to_vec(), data).map_err(|e| TenancyError::Unsupported(e.to_string()))?;
        }
        let importance = trackers.as_ref().map(|t| t[c].scores()).unwrap_or_default();
        outcomes.push(outcome(vc, pool, None, loss_sums[c], (samples[c], correct[c]), importance)?);
    }
    Ok(outcomes)
}
