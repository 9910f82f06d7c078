//! Examples as token ids, seeded shuffled batching and dynamic padding.
//!
//! Texts are tokenized once, without padding; each batch is padded to its own longest sequence
//! (much less work than padding everything to `max_len` on short texts).

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use crate::tokenize::{Padding, TextTokenizer};

/// Texts encoded per call to the tokenizer.
const ENCODE_CHUNK: usize = 256;

/// One example as token ids (special tokens included, truncated, unpadded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The example's id (the query cache is keyed by it).
    pub id: u64,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Class index.
    pub label: usize,
}

/// Tokenizes `(id, text, label)` triples once. The tokenizer's own padding is stripped: a batch is
/// padded later, to its longest row.
pub fn encode_examples<'a>(
    tokenizer: &TextTokenizer,
    examples: impl IntoIterator<Item = (u64, &'a str, usize)>,
) -> Result<Vec<Encoded>, TrainError> {
    let examples: Vec<(u64, &str, usize)> = examples.into_iter().collect();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(ENCODE_CHUNK) {
        let texts: Vec<&str> = chunk.iter().map(|(_, text, _)| *text).collect();
        let batch = tokenizer.encode_batch(&texts)?;
        for (i, &(id, _, label)) in chunk.iter().enumerate() {
            let row = i * batch.len..(i + 1) * batch.len;
            let tokens = batch.ids[row.clone()]
                .iter()
                .zip(&batch.mask[row])
                .filter(|(_, m)| **m != 0)
                .map(|(t, _)| *t)
                .collect();
            out.push(Encoded { id, tokens, label });
        }
    }
    Ok(out)
}

/// Loads `path` for [`encode_examples`]: truncation at `max_len`, padding stripped anyway.
pub fn tokenizer_for_training(path: &std::path::Path, max_len: usize) -> Result<TextTokenizer, TrainError> {
    Ok(TextTokenizer::from_file(path, max_len, Padding::Longest)?)
}

/// A padded batch on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids `[B, T]` (u32), T = the longest row.
    pub ids: Tensor,
    /// Attention mask `[B, T]` (u32: 1 token, 0 padding).
    pub mask: Tensor,
    /// Labels `[B]` (u32).
    pub labels: Tensor,
    /// The examples' ids, in row order.
    pub example_ids: Vec<u64>,
    /// The labels, in row order.
    pub label_values: Vec<usize>,
}

impl Batch {
    /// Pads `rows` to their longest with `pad_id` and moves them to `device`.
    pub fn pad(rows: &[&Encoded], pad_id: u32, device: &Device) -> Result<Self, TrainError> {
        let b = rows.len();
        let t = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, row) in rows.iter().enumerate() {
            ids[i * t..i * t + row.tokens.len()].copy_from_slice(&row.tokens);
            mask[i * t..i * t + row.tokens.len()].iter_mut().for_each(|m| *m = 1);
        }
        let labels: Vec<u32> = rows.iter().map(|r| r.label as u32).collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
            labels: Tensor::from_vec(labels, b, device)?,
            example_ids: rows.iter().map(|r| r.id).collect(),
            label_values: rows.iter().map(|r| r.label).collect(),
        })
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.example_ids.len()
    }

    /// True for a batch of no rows.
    pub fn is_empty(&self) -> bool {
        self.example_ids.is_empty()
    }
}

/// An endless stream of training batches: each epoch a fresh seeded shuffle; the last, short
/// batch of an epoch is dropped so every step sees `batch_size` rows (unless the data is smaller).
#[derive(Debug)]
pub struct BatchOrder {
    order: Vec<usize>,
    pos: usize,
    batch_size: usize,
    rng: ChaCha8Rng,
}

impl BatchOrder {
    /// Batches over `n` examples, shuffled with `seed`.
    pub fn new(n: usize, batch_size: usize, seed: u64) -> Self {
        let mut s = Self {
            order: (0..n).collect(),
            pos: 0,
            batch_size: batch_size.clamp(1, n.max(1)),
            rng: ChaCha8Rng::seed_from_u64(seed),
        };
        s.order.shuffle(&mut s.rng);
        s
    }

    /// The example indices of the next batch.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.pos + self.batch_size > self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.pos = 0;
        }
        let out = self.order[self.pos..self.pos + self.batch_size].to_vec();
        self.pos += self.batch_size;
        out
    }
}

/// Indices `0..examples.len()` in chunks of `batch_size`, sorted by length so that padding is
/// minimal: for passes where the order does not matter (evaluation, the query cache).
pub fn length_sorted_chunks(examples: &[Encoded], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].tokens.len());
    order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_order_covers_each_epoch_and_is_seeded() {
        let mut a = BatchOrder::new(10, 5, 1);
        let mut seen: Vec<usize> = a.next_batch().into_iter().chain(a.next_batch()).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let (mut x, mut y) = (BatchOrder::new(10, 3, 9), BatchOrder::new(10, 3, 9));
        for _ in 0..7 {
            assert_eq!(x.next_batch(), y.next_batch());
        }
    }

    #[test]
    fn padding_is_to_the_longest_row() {
        let a = Encoded { id: 1, tokens: vec![5, 6, 7], label: 0 };
        let b = Encoded { id: 2, tokens: vec![8], label: 1 };
        let batch = Batch::pad(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7], vec![8, 0, 0]]);
        assert_eq!(batch.mask.to_vec2::<u32>().unwrap(), vec![vec![1, 1, 1], vec![1, 0, 0]]);
    }
}
