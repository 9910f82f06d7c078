//! AdaLoRA's importance of each LoRA triplet (Zhang et al., ICLR 2023, eq. 8–11; HF PEFT
//! `tuners/adalora` `RankAllocator`) and the orthogonality regulariser on P and Q.
//!
//! Per element of P, λ and Q: `I = |w · ∂L/∂w|`, smoothed `Ī ← β₁Ī + (1−β₁)I` and uncertainty
//! `Ū ← β₂Ū + (1−β₂)|I − Ī|` (with the Ī just updated, as PEFT), score `s = Ī · Ū`. The triplet
//! score of rank index i is `S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use fedpool_common::adapter::{AdapterKind, PoolSpec};
use fedpool_common::wire::TripletImportance;

use super::params::{AdapterTensors, TrainableParams};
use super::TrainError;

/// AdaLoRA's β₁ for the smoothed sensitivity (Zhang et al. 2023; PEFT default 0.85).
pub const ADALORA_BETA1: f32 = 0.85;
/// AdaLoRA's β₂ for the uncertainty (Zhang et al. 2023; PEFT default 0.85).
pub const ADALORA_BETA2: f32 = 0.85;
/// AdaLoRA's weight of the orthogonality regulariser (docs/design.md, "Initialisation"; PEFT `orth_reg_weight` 0.5).
pub const ORTH_REG_WEIGHT: f64 = 0.5;
/// Added under the square root of the Frobenius norm so that its gradient stays finite at 0.
const FROBENIUS_EPS: f64 = 1e-12;

/// The smoothed sensitivity and uncertainty of one tensor's elements.
#[derive(Debug, Clone)]
struct Ema {
    sensitivity: Vec<f32>,
    uncertainty: Vec<f32>,
}

/// Tracks the importance of every LoRA factor element over training steps.
#[derive(Debug, Clone)]
pub struct ImportanceTracker {
    beta1: f32,
    beta2: f32,
    /// Per target: (name, rank, d_in, d_out).
    targets: Vec<(String, usize, usize, usize)>,
    ema: BTreeMap<String, Ema>,
}

impl ImportanceTracker {
    /// A tracker for the LoRA targets of `spec` with AdaLoRA's β₁, β₂; `None` for SSF specs.
    pub fn new(spec: &PoolSpec) -> Option<Self> {
        Self::with_betas(spec, ADALORA_BETA1, ADALORA_BETA2)
    }

    /// As [`ImportanceTracker::new`] with explicit β₁, β₂.
    pub fn with_betas(spec: &PoolSpec, beta1: f32, beta2: f32) -> Option<Self> {
        if spec.kind != AdapterKind::AdaLora {
            return None;
        }
        let targets = spec.targets.iter().map(|t| (t.name.clone(), spec.max_rank, t.dim_in, t.dim_out)).collect();
        Some(Self { beta1, beta2, targets, ema: BTreeMap::new() })
    }

    /// The factor names of a target: (A = Q, E = λ, B = P).
    fn names(target: &str) -> [String; 3] {
        ["lora_A", "lora_E", "lora_B"].map(|f| format!("{target}.{f}.weight"))
    }

    /// The tensors it tracks, by name: A (Q), E (λ) and B (P) of every target, in spec order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.targets.iter().flat_map(|t| Self::names(&t.0)).collect()
    }

    /// One step's update from the current values and the gradients of the loss.
    pub fn update(&mut self, params: &TrainableParams, grads: &GradStore) -> Result<(), TrainError> {
        for name in self.tensor_names() {
            let var = params.var(&name).ok_or_else(|| TrainError::Input(format!("no LoRA tensor {name:?}")))?;
            let w = var.as_tensor();
            let values = Self::sensitivity(w, grads.get(w))?;
            self.update_element(&name, &values);
        }
        Ok(())
    }

    /// The element sensitivities `I = |w · ∂L/∂w|` of tensor `w` given its gradient (zeros where
    /// the loss does not reach `w`), row-major: what [`ImportanceTracker::update_element`] folds
    /// in. A tensor stacking several clients' copies along its first axis gives each client's
    /// sensitivities as one contiguous chunk (the lockstep trainer's use).
    pub fn sensitivity(w: &Tensor, grad: Option<&Tensor>) -> Result<Vec<f32>, TrainError> {
        let sensitivity = match grad {
            Some(g) => (w * g)?.abs()?,
            None => w.zeros_like()?,
        };
        Ok(sensitivity.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// Folds one step's element sensitivities `I` of tensor `name` into its averages.
    pub fn update_element(&mut self, name: &str, sensitivity: &[f32]) {
        let (b1, b2) = (self.beta1, self.beta2);
        let ema = self.ema.entry(name.to_string()).or_insert_with(|| Ema {
            sensitivity: vec![0.0; sensitivity.len()],
            uncertainty: vec![0.0; sensitivity.len()],
        });
        for ((s, u), &i) in ema.sensitivity.iter_mut().zip(ema.uncertainty.iter_mut()).zip(sensitivity) {
            *s = b1 * *s + (1.0 - b1) * i;
            *u = b2 * *u + (1.0 - b2) * (i - *s).abs();
        }
    }

    /// The element scores `s = Ī·Ū` of tensor `name` (zeros if never updated), row-major.
    fn scores_of(&self, name: &str, len: usize) -> Vec<f32> {
        match self.ema.get(name) {
            Some(e) => e.sensitivity.iter().zip(&e.uncertainty).map(|(s, u)| s * u).collect(),
            None => vec![0.0; len],
        }
    }

    /// The triplet scores per target, by rank index.
    pub fn scores(&self) -> Vec<TripletImportance> {
        self.targets
            .iter()
            .map(|(target, r, d_in, d_out)| {
                let [a, e, b] = Self::names(target);
                let (sa, se, sb) =
                    (self.scores_of(&a, r * d_in), self.scores_of(&e, *r), self.scores_of(&b, d_out * r));
                let scores = (0..*r)
                    .map(|i| {
                        let q_mean = sa[i * d_in..(i + 1) * d_in].iter().sum::<f32>() / *d_in as f32;
                        let p_mean = (0..*d_out).map(|j| sb[j * r + i]).sum::<f32>() / *d_out as f32;
                        se[i] + q_mean + p_mean
                    })
                    .collect();
                TripletImportance { target: target.clone(), scores }
            })
            .collect()
    }
}

/// `‖M − I‖_F` for a square `m`, with a tiny epsilon under the root.
fn distance_to_identity(m: &Tensor) -> Result<Tensor, TrainError> {
    let n = m.dim(0)?;
    let eye = Tensor::eye(n, m.dtype(), m.device())?;
    Ok(((m - eye)?.sqr()?.sum_all()? + FROBENIUS_EPS)?.sqrt()?)
}

/// AdaLoRA's orthogonality regulariser: the mean over every factor matrix (P and Q of each
/// target) of `‖PᵀP − I‖_F` and `‖QQᵀ − I‖_F`, as PEFT's AdaLoRA divides the sum by the number of
/// matrices (unweighted: the trainer multiplies by [`ORTH_REG_WEIGHT`]); a zero scalar for SSF.
/// A sum would grow with the number of targets and swamp the task loss (12 targets on MiniLM).
pub fn orthogonality(adapters: &AdapterTensors<'_>) -> Result<Tensor, TrainError> {
    let spec = adapters.spec();
    let mut total = Tensor::zeros((), DType::F32, adapters.device())?;
    if spec.kind != AdapterKind::AdaLora {
        return Ok(total);
    }
    for t in &spec.targets {
        let p = adapters.get(&format!("{}.lora_B.weight", t.name))?;
        let q = adapters.get(&format!("{}.lora_A.weight", t.name))?;
        total = (total + distance_to_identity(&p.t()?.matmul(p)?)?)?;
        total = (total + distance_to_identity(&q.matmul(&q.t()?)?)?)?;
    }
    Ok((total / (2 * spec.targets.len()) as f64)?)
}
