//! The selection queries: the frozen backbone's mean-pooled feature of each example, with no
//! adapters, computed once and kept by example id (the backbone never changes, so neither do they).
//! The linear probe reads the same features.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::batches::{Batch, Encoded};
use super::TrainError;
use crate::model::{BertEncoder, Hooks};

/// Pooled features by example id, all of one width.
#[derive(Debug, Clone, Default)]
pub struct QueryCache {
    dim: usize,
    rows: HashMap<u64, Vec<f32>>,
}

impl QueryCache {
    /// An empty cache of features of width `dim`.
    pub fn new(dim: usize) -> Self {
        Self { dim, rows: HashMap::new() }
    }

    /// The feature width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of examples cached.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The cached example ids, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.rows.keys().copied()
    }

    /// The query of example `id`, if cached.
    pub fn get(&self, id: u64) -> Option<&[f32]> {
        self.rows.get(&id).map(Vec::as_slice)
    }

    /// Caches the query of every example not cached yet, in length-sorted batches of `batch_size`
    /// (little padding), with no adapters and no gradient. Returns how many were computed.
    pub fn fill<'e>(
        &mut self,
        model: &BertEncoder,
        examples: impl IntoIterator<Item = &'e Encoded>,
        batch_size: usize,
        pad_id: u32,
    ) -> Result<usize, TrainError> {
        let mut missing: Vec<&Encoded> = examples.into_iter().filter(|e| !self.rows.contains_key(&e.id)).collect();
        missing.sort_by_key(|e| e.id);
        missing.dedup_by_key(|e| e.id);
        missing.sort_by_key(|e| e.tokens.len());
        let hooks = Hooks::new();
        for rows in missing.chunks(batch_size.max(1)) {
            let batch = Batch::pad(rows, pad_id, model.device())?;
            let pooled = model.pooled(&batch.ids, &batch.mask, &hooks)?.to_vec2::<f32>()?;
            for (id, feature) in batch.example_ids.iter().zip(pooled) {
                self.rows.insert(*id, feature);
            }
        }
        Ok(missing.len())
    }

    /// The queries of `ids` as a `[B, dim]` tensor on `device`.
    ///
    /// # Errors
    /// [`TrainError::MissingQuery`] if an id is not cached.
    pub fn batch(&self, ids: &[u64], device: &Device) -> Result<Tensor, TrainError> {
        let mut data = Vec::with_capacity(ids.len() * self.dim);
        for id in ids {
            data.extend_from_slice(self.get(*id).ok_or(TrainError::MissingQuery(*id))?);
        }
        Ok(Tensor::from_vec(data, (ids.len(), self.dim), device)?)
    }

    /// Inserts a feature (for tests and for caches read from disk).
    ///
    /// # Errors
    /// [`TrainError::Input`] if its width is not [`QueryCache::dim`].
    pub fn insert(&mut self, id: u64, feature: Vec<f32>) -> Result<(), TrainError> {
        if feature.len() != self.dim {
            return Err(TrainError::Input(format!(
                "query of example {id} has width {}, expected {}",
                feature.len(),
                self.dim
            )));
        }
        self.rows.insert(id, feature);
        Ok(())
    }
}
