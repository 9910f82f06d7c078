//! Adapter hooks: SSF scale/shift and LoRA (AdaLoRA SVD form) parameters, passed explicitly to
//! every forward pass and keyed by the HF module path of the op they adapt.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::dropout::Dropout;
use super::{ModelError, Result};

/// An op whose output SSF can scale and shift, with the width of that output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsfPoint {
    /// HF module path without model prefix, e.g. `encoder.layer.0.output.LayerNorm`.
    pub name: String,
    /// Width of the op's output (the length of γ and β).
    pub dim: usize,
}

/// A linear layer LoRA can adapt: `y = x Wᵀ + b` with `W: [d_out, d_in]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearTarget {
    /// HF module path without model prefix, e.g. `encoder.layer.0.attention.self.query`.
    pub name: String,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
}

/// SSF (Lian et al. 2022) at one point: `y = x ⊙ γ[b] + β[b]`, broadcast over tokens.
///
/// `scale` (γ) and `shift` (β) have shape `[B, d]`, one row per example of the batch (the caller
/// has already selected or mixed them per instance), or `[1, d]` for the same values on every row.
#[derive(Debug, Clone)]
pub struct Ssf {
    /// γ: `[B, d]` or `[1, d]`.
    pub scale: Tensor,
    /// β: `[B, d]` or `[1, d]`.
    pub shift: Tensor,
}

impl Ssf {
    /// SSF with the given scale (γ) and shift (β).
    pub fn new(scale: Tensor, shift: Tensor) -> Self {
        Self { scale, shift }
    }

    /// The identity: γ = 1, β = 0, shape `[1, dim]`.
    pub fn identity(dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            scale: Tensor::ones((1, dim), DType::F32, device)?,
            shift: Tensor::zeros((1, dim), DType::F32, device)?,
        })
    }

    /// Checks the shapes against the point's width and the batch size.
    fn check(&self, name: &str, dim: usize, batch: usize) -> Result<()> {
        for (what, t) in [("scale", &self.scale), ("shift", &self.shift)] {
            let ok = matches!(t.dims(), &[rows, d] if d == dim && (rows == 1 || rows == batch));
            if !ok {
                return Err(ModelError::HookShape {
                    name: name.to_string(),
                    message: format!("SSF {what} has shape {:?}, expected [{batch}, {dim}] or [1, {dim}]", t.dims()),
                });
            }
        }
        Ok(())
    }

    /// Applies the SSF to `x: [B, T, d]` in one batched op.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let scale = self.scale.unsqueeze(1)?;
        let shift = self.shift.unsqueeze(1)?;
        Ok(x.broadcast_mul(&scale)?.broadcast_add(&shift)?)
    }
}

/// LoRA in AdaLoRA's SVD form (Zhang et al. 2023) on one linear layer:
/// `y = x Wᵀ + b + scaling · ((x Qᵀ) ⊙ λ) Pᵀ`, i.e. `ΔW = scaling · P diag(λ) Q`.
///
/// The factors are shared by the whole batch (`P [d_out, r]`, `λ [r]`, `Q [r, d_in]`), or given
/// per row with a leading batch axis (`[B, d_out, r]`, `[B, r]`, `[B, r, d_in]`): the simulator
/// runs many virtual clients' adapters in one batch that way.
#[derive(Debug, Clone)]
pub struct Lora {
    /// Left singular factors P: `[d_out, r]` (or `[B, d_out, r]`).
    pub p: Tensor,
    /// Singular values λ: `[r]` (or `[B, r]`).
    pub lambda: Tensor,
    /// Right singular factors Q: `[r, d_in]` (or `[B, r, d_in]`).
    pub q: Tensor,
    /// The scalar in front of the update, usually `alpha / r`.
    pub scaling: f64,
}

impl Lora {
    /// LoRA with factors `p: [d_out, r]`, `lambda: [r]`, `q: [r, d_in]` and `scaling` (α/r).
    pub fn new(p: Tensor, lambda: Tensor, q: Tensor, scaling: f64) -> Self {
        Self { p, lambda, q, scaling }
    }

    /// The rank r (the length of λ's last axis).
    pub fn rank(&self) -> usize {
        self.lambda.dims().last().copied().unwrap_or(0)
    }

    /// True when the factors are given per row (a leading batch axis).
    pub fn per_row(&self) -> bool {
        self.q.rank() == 3
    }

    /// The weight update `scaling · P diag(λ) Q`, shape `[d_out, d_in]`, for merging into W.
    pub fn delta(&self) -> Result<Tensor> {
        let p_lambda = self.p.broadcast_mul(&self.lambda.unsqueeze(0)?)?;
        Ok((p_lambda.matmul(&self.q)? * self.scaling)?)
    }

    /// Checks the factor shapes against the target's widths.
    fn check(&self, name: &str, d_in: usize, d_out: usize, batch: usize) -> Result<()> {
        let r = self.rank();
        let (p, l, q) = (self.p.dims(), self.lambda.dims(), self.q.dims());
        let shared = p == [d_out, r] && l == [r] && q == [r, d_in];
        let per_row = p == [batch, d_out, r] && l == [batch, r] && q == [batch, r, d_in];
        if !(shared || per_row) {
            return Err(ModelError::HookShape {
                name: name.to_string(),
                message: format!(
                    "LoRA factors P {p:?}, λ {l:?}, Q {q:?} do not fit the layer: expected \
                     P [{d_out}, r], λ [r], Q [r, {d_in}] (or per row, with a leading axis {batch})"
                ),
            });
        }
        Ok(())
    }

    /// The update term for `x: [N, d_in]` (N = B·T, rows in batch order): `scaling · ((x Qᵀ) ⊙ λ)
    /// Pᵀ`, shape `[N, d_out]`; with per-row factors each row's tokens use that row's factors.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.per_row() {
            let (n, d_in) = x.dims2()?;
            let b = self.q.dim(0)?;
            let x = x.reshape((b, n / b.max(1), d_in))?;
            let low = x.matmul(&self.q.transpose(1, 2)?)?.broadcast_mul(&self.lambda.unsqueeze(1)?)?;
            let out = low.matmul(&self.p.transpose(1, 2)?)?;
            return Ok((out.reshape((n, ()))? * self.scaling)?);
        }
        let low = x.matmul(&self.q.t()?)?.broadcast_mul(&self.lambda)?;
        Ok((low.matmul(&self.p.t()?)? * self.scaling)?)
    }
}

/// The adapter parameters for one forward pass, by point name, and the pass's dropout (training
/// only). Empty hooks run the frozen backbone. The model rejects a name it does not have, so a
/// typo is never silently ignored.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    ssf: BTreeMap<String, Ssf>,
    lora: BTreeMap<String, Lora>,
    dropout: Option<Dropout>,
}

impl Hooks {
    /// No adapters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the SSF at `point` (an [`SsfPoint`] name), replacing any earlier one.
    pub fn set_ssf(&mut self, point: impl Into<String>, ssf: Ssf) -> &mut Self {
        self.ssf.insert(point.into(), ssf);
        self
    }

    /// Sets the LoRA on `target` (a [`LinearTarget`] name), replacing any earlier one.
    pub fn set_lora(&mut self, target: impl Into<String>, lora: Lora) -> &mut Self {
        self.lora.insert(target.into(), lora);
        self
    }

    /// Sets the pass's dropout (one key per batch row).
    pub fn set_dropout(&mut self, dropout: Dropout) -> &mut Self {
        self.dropout = Some(dropout);
        self
    }

    /// The pass's dropout, if any.
    pub fn dropout(&self) -> Option<&Dropout> {
        self.dropout.as_ref()
    }

    /// The SSF at `point`, if any.
    pub fn ssf(&self, point: &str) -> Option<&Ssf> {
        self.ssf.get(point)
    }

    /// The LoRA on `target`, if any.
    pub fn lora(&self, target: &str) -> Option<&Lora> {
        self.lora.get(target)
    }

    /// All SSF hooks, by point name.
    pub fn ssf_hooks(&self) -> impl Iterator<Item = (&str, &Ssf)> {
        self.ssf.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// All LoRA hooks, by target name.
    pub fn lora_hooks(&self) -> impl Iterator<Item = (&str, &Lora)> {
        self.lora.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// True when there are no hooks at all.
    pub fn is_empty(&self) -> bool {
        self.ssf.is_empty() && self.lora.is_empty()
    }

    /// Checks every hook against the model's points (`ssf_dims`: name → d; `lora_dims`: name →
    /// (d_in, d_out)) and the batch size.
    pub(crate) fn check(
        &self,
        ssf_dims: &BTreeMap<String, usize>,
        lora_dims: &BTreeMap<String, (usize, usize)>,
        batch: usize,
    ) -> Result<()> {
        if let Some(d) = &self.dropout {
            if !(0.0..1.0).contains(&d.p) || (!d.is_off() && d.row_keys.len() != batch) {
                return Err(ModelError::Input(format!(
                    "dropout p = {} with {} row keys for a batch of {batch}: expected p in [0, 1) and a key per row",
                    d.p,
                    d.row_keys.len()
                )));
            }
        }
        for (name, ssf) in &self.ssf {
            let dim = ssf_dims.get(name).ok_or_else(|| ModelError::UnknownHook {
                kind: "SSF",
                name: name.clone(),
                list: "ssf_points",
            })?;
            ssf.check(name, *dim, batch)?;
        }
        for (name, lora) in &self.lora {
            let (d_in, d_out) = lora_dims.get(name).ok_or_else(|| ModelError::UnknownHook {
                kind: "LoRA",
                name: name.clone(),
                list: "lora_targets",
            })?;
            lora.check(name, *d_in, *d_out, batch)?;
        }
        Ok(())
    }
}
