//! The adapted forward pass of one batch: slot selection, the backbone with hooks, the head, and
//! the per-example loss `(1−λ)·CE + λ·(1 − Σ_k cos(q, K_s))` (FedIns; the surrogate term only in
//! SSF pools with selection).

use candle_core::{Tensor, D};

use super::batches::Batch;
use super::params::AdapterTensors;
use super::TrainError;
use crate::model::{BertEncoder, DropoutSite, Hooks};
use crate::select::{cosine_similarity, matched_cosine, top_k, Selection};
use fedpool_common::{PoolSpec, Pooling};

/// The result of one forward pass.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Logits `[B, L]`.
    pub logits: Tensor,
    /// Cross-entropy per example `[B]`.
    pub cross_entropy: Tensor,
    /// Σ_k cos(q, K_s) per example `[B]` (SSF pools with selection only).
    pub matched_cosine: Option<Tensor>,
    /// The loss per example `[B]`.
    pub loss_per_example: Tensor,
    /// The slots each row used (slot 0 for every row in a one-slot pool).
    pub selection: Selection,
}

impl Forward {
    /// The mean loss over the batch (a scalar).
    pub fn loss(&self) -> Result<Tensor, TrainError> {
        Ok(self.loss_per_example.mean_all()?)
    }

    /// The argmax class per row.
    pub fn predictions(&self) -> Result<Vec<usize>, TrainError> {
        Ok(self.logits.argmax(D::Minus1)?.to_vec1::<u32>()?.into_iter().map(|p| p as usize).collect())
    }
}

/// The feature the head of `spec` reads for `batch` (its pooling: the masked mean or HF's pooler),
/// with the classifier's dropout when `hooks` carry dropout (a training pass).
pub fn head_features(model: &BertEncoder, spec: &PoolSpec, batch: &Batch, hooks: &Hooks) -> Result<Tensor, TrainError> {
    let features = match spec.head.map(|h| h.pooling).unwrap_or_default() {
        Pooling::Mean => model.pooled(&batch.ids, &batch.mask, hooks)?,
        Pooling::ClsPooler => model.pooled_cls(&batch.ids, &batch.mask, hooks)?,
    };
    Ok(match hooks.dropout() {
        Some(d) => d.apply(&features, DropoutSite::Classifier, None)?,
        None => features,
    })
}

/// Runs `batch` through the backbone with `adapters`.
///
/// `queries: [B, d]` are the rows' cached frozen features ([`super::QueryCache`]): required for
/// SSF pools with selection (they choose the slots) and for the linear probe (they are its
/// features, so the backbone does not run at all). `lambda_match` is FedIns' λ.
pub fn forward(
    model: &BertEncoder,
    adapters: &AdapterTensors<'_>,
    batch: &Batch,
    queries: Option<&Tensor>,
    lambda_match: f64,
) -> Result<Forward, TrainError> {
    forward_masked(model, adapters, batch, queries, lambda_match, None)
}

/// [`forward`] where each row may select only some of the pool's slots: `slot_bias: [B, P]` is
/// added to the query–key similarities before the top-k (0 for an allowed slot, a large negative
/// number for a forbidden one). The simulator stacks the pools of many virtual clients into one
/// and lets each row choose only among its own client's slots.
pub fn forward_masked(
    model: &BertEncoder,
    adapters: &AdapterTensors<'_>,
    batch: &Batch,
    queries: Option<&Tensor>,
    lambda_match: f64,
    slot_bias: Option<&Tensor>,
) -> Result<Forward, TrainError> {
    let spec = adapters.spec();
    let need_query = || TrainError::Input("this adapter needs the cached queries of the batch".into());
    let (selection, matched) = if spec.has_keys() {
        let queries = queries.ok_or_else(need_query)?;
        let mut similarity = cosine_similarity(queries, adapters.keys()?)?;
        if let Some(bias) = slot_bias {
            similarity = (similarity + bias)?;
        }
        let selection = top_k(&similarity, spec.top_k)?;
        let matched = matched_cosine(&similarity, &selection)?;
        (selection, Some(matched))
    } else {
        (Selection::single(batch.len()), None)
    };
    let features = if adapters.head_only() {
        let features = queries.ok_or_else(need_query)?;
        match adapters.dropout() {
            Some(d) => d.apply(features, DropoutSite::Classifier, None)?,
            None => features.clone(),
        }
    } else {
        head_features(model, spec, batch, &adapters.hooks(&selection)?)?
    };
    let logits = adapters.head_logits(&features, &selection)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let cross_entropy = log_probs.gather(&batch.labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let loss_per_example = match &matched {
        Some(m) => ((&cross_entropy * (1.0 - lambda_match))? + (m.affine(-1.0, 1.0)? * lambda_match)?)?,
        None => cross_entropy.clone(),
    };
    Ok(Forward { logits, cross_entropy, matched_cosine: matched, loss_per_example, selection })
}
