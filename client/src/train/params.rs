//! Trainable parameters ↔ [`AdapterPool`]: every pool tensor becomes a candle `Var` (the backbone's
//! weights never do), and a view of them ([`AdapterTensors`]) builds the forward pass's hooks and
//! the head's logits for a batch's slot selection.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use fedpool_common::adapter::{AdapterKind, AdapterPool, PoolSpec, HEAD_BIAS, HEAD_WEIGHT, KEYS};
use fedpool_common::tensor::HostTensor;

use super::{LoraTrain, TrainError};
use crate::model::{Dropout, Hooks, Lora, Ssf};
use crate::select::{gather_mean, Selection};

/// The pool's tensors as `Var`s, and which of them the optimizer updates.
#[derive(Debug)]
pub struct TrainableParams {
    vars: BTreeMap<String, Var>,
    trainable: Vec<String>,
    spec_hash: fedpool_common::ids::SpecHash,
    device: Device,
}

impl TrainableParams {
    /// Moves `pool` to `device` as `Var`s. With `head_only`, only the head is trainable (the
    /// linear probe); otherwise every tensor is.
    pub fn new(pool: &AdapterPool, head_only: bool, device: &Device) -> Result<Self, TrainError> {
        Self::with_frozen(pool, head_only, LoraTrain::Both, device)
    }

    /// As [`TrainableParams::new`], with the LoRA factors `lora_train` leaves out frozen.
    pub fn with_frozen(
        pool: &AdapterPool,
        head_only: bool,
        lora_train: LoraTrain,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut vars = BTreeMap::new();
        for (name, t) in &pool.tensors {
            let tensor = t.to_candle(device).map_err(|e| TrainError::Input(format!("tensor {name:?}: {e}")))?;
            vars.insert(name.clone(), Var::from_tensor(&tensor)?);
        }
        let trainable = vars
            .keys()
            .filter(|n| !head_only || n.as_str() == HEAD_WEIGHT || n.as_str() == HEAD_BIAS)
            .filter(|n| !lora_train.freezes(n))
            .cloned()
            .collect();
        Ok(Self { vars, trainable, spec_hash: pool.spec_hash, device: device.clone() })
    }

    /// The `Var`s the optimizer updates.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.trainable.iter().filter_map(|n| self.vars.get(n)).cloned().collect()
    }

    /// The trainable `Var`s split into (adapter, head), for separate learning rates.
    pub fn trainable_vars_by_group(&self) -> (Vec<Var>, Vec<Var>) {
        let is_head = |n: &str| n == HEAD_WEIGHT || n == HEAD_BIAS;
        let pick = |head: bool| {
            self.trainable.iter().filter(|n| is_head(n) == head).filter_map(|n| self.vars.get(n)).cloned().collect()
        };
        (pick(false), pick(true))
    }

    /// The names of the trainable tensors.
    pub fn trainable_names(&self) -> &[String] {
        &self.trainable
    }

    /// The `Var` named `name`.
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// A view for a forward pass that records gradients (training).
    pub fn tracked<'a>(&self, spec: &'a PoolSpec, head_only: bool) -> AdapterTensors<'a> {
        let tensors = self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        AdapterTensors { spec, head_only, tensors, device: self.device.clone(), dropout: None }
    }

    /// A view with no gradient tracking (evaluation).
    pub fn detached<'a>(&self, spec: &'a PoolSpec, head_only: bool) -> AdapterTensors<'a> {
        let tensors = self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
        AdapterTensors { spec, head_only, tensors, device: self.device.clone(), dropout: None }
    }

    /// The current values as a pool (copied to the host).
    pub fn to_pool(&self) -> Result<AdapterPool, TrainError> {
        let mut tensors = BTreeMap::new();
        for (name, var) in &self.vars {
            let host = HostTensor::from_candle(var.as_tensor())
                .map_err(|e| TrainError::Input(format!("tensor {name:?}: {e}")))?;
            tensors.insert(name.clone(), host);
        }
        Ok(AdapterPool { spec_hash: self.spec_hash, tensors })
    }
}

/// The pool's tensors for one forward pass (tracked or detached).
#[derive(Debug, Clone)]
pub struct AdapterTensors<'a> {
    spec: &'a PoolSpec,
    head_only: bool,
    tensors: BTreeMap<String, Tensor>,
    device: Device,
    dropout: Option<Dropout>,
}

impl<'a> AdapterTensors<'a> {
    /// A view of plain tensors (no `Var`s), e.g. a pool loaded for inference.
    pub fn from_pool(
        spec: &'a PoolSpec,
        pool: &AdapterPool,
        head_only: bool,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut tensors = BTreeMap::new();
        for (name, t) in &pool.tensors {
            let tensor = t.to_candle(device).map_err(|e| TrainError::Input(format!("tensor {name:?}: {e}")))?;
            tensors.insert(name.clone(), tensor);
        }
        Ok(Self { spec, head_only, tensors, device: device.clone(), dropout: None })
    }

    /// A view of given tensors (tracked or not) by name, e.g. one client's slice of stacked
    /// `Var`s in the simulator.
    pub fn from_tensors(
        spec: &'a PoolSpec,
        head_only: bool,
        tensors: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Self {
        Self { spec, head_only, tensors, device: device.clone(), dropout: None }
    }

    /// The same view with dropout for a training pass (one key per batch row; `p = 0` is none).
    pub fn with_dropout(mut self, dropout: Dropout) -> Self {
        self.dropout = (!dropout.is_off()).then_some(dropout);
        self
    }

    /// The pass's dropout, if any.
    pub fn dropout(&self) -> Option<&Dropout> {
        self.dropout.as_ref()
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The spec the tensors follow.
    pub fn spec(&self) -> &PoolSpec {
        self.spec
    }

    /// True when the backbone runs without adapters (the linear probe).
    pub fn head_only(&self) -> bool {
        self.head_only
    }

    /// The tensor `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor, TrainError> {
        self.tensors.get(name).ok_or_else(|| TrainError::Input(format!("the pool has no tensor {name:?}")))
    }

    /// The pool keys `[P, key_dim]` (SSF pools with selection only).
    pub fn keys(&self) -> Result<&Tensor, TrainError> {
        self.get(KEYS)
    }

    /// A pooled tensor's rows for the batch: the mean of each row's selected slots (`[B, ...]`), or
    /// for a one-slot pool its single slot (`[1, ...]`, broadcast by the model).
    fn mixed(&self, name: &str, selection: &Selection) -> Result<Tensor, TrainError> {
        let pool = self.get(name)?;
        if self.spec.pool_size == 1 {
            return Ok(pool.clone());
        }
        Ok(gather_mean(pool, selection)?)
    }

    /// The model hooks for a batch with this slot `selection` (none for the linear probe).
    pub fn hooks(&self, selection: &Selection) -> Result<Hooks, TrainError> {
        let mut hooks = Hooks::new();
        if let Some(d) = &self.dropout {
            hooks.set_dropout(d.clone());
        }
        if self.head_only {
            return Ok(hooks);
        }
        for t in &self.spec.targets {
            match self.spec.kind {
                AdapterKind::SsfPool => {
                    let scale = self.mixed(&format!("{}.ssf_scale", t.name), selection)?;
                    let shift = self.mixed(&format!("{}.ssf_shift", t.name), selection)?;
                    hooks.set_ssf(t.name.clone(), Ssf::new(scale, shift));
                }
                AdapterKind::Lora | AdapterKind::AdaLora => {
                    let q = self.get(&format!("{}.lora_A.weight", t.name))?.clone();
                    let lambda = if self.spec.kind == AdapterKind::AdaLora {
                        self.get(&format!("{}.lora_E.weight", t.name))?.flatten_all()?
                    } else {
                        // Standard LoRA: ΔW = B·A, a constant λ = 1 (no gradient, r values).
                        Tensor::ones(self.spec.max_rank, candle_core::DType::F32, &self.device)?
                    };
                    let p = self.get(&format!("{}.lora_B.weight", t.name))?.clone();
                    let scaling = f64::from(self.spec.lora_alpha) / self.spec.max_rank as f64;
                    hooks.set_lora(t.name.clone(), Lora::new(p, lambda, q, scaling));
                }
            }
        }
        Ok(hooks)
    }

    /// Logits `[B, L]` of the head on `features: [B, d]`. In an SSF pool with selection each row's
    /// logits are the mean of its selected heads' logits (computed as the mixed head applied once,
    /// which is the same by linearity).
    pub fn head_logits(&self, features: &Tensor, selection: &Selection) -> Result<Tensor, TrainError> {
        let pooled_head = self.spec.kind == AdapterKind::SsfPool;
        if !pooled_head || self.spec.pool_size == 1 {
            let (mut w, mut b) = (self.get(HEAD_WEIGHT)?.clone(), self.get(HEAD_BIAS)?.clone());
            if pooled_head {
                w = w.squeeze(0)?;
                b = b.squeeze(0)?;
            }
            return Ok(features.matmul(&w.t()?)?.broadcast_add(&b)?);
        }
        let w = self.mixed(HEAD_WEIGHT, selection)?; // [B, L, d]
        let b = self.mixed(HEAD_BIAS, selection)?; // [B, L]
        let logits = w.matmul(&features.unsqueeze(2)?)?.squeeze(2)?;
        Ok((logits + b)?)
    }
}
