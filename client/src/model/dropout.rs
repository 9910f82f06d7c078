//! Dropout while training (HF BERT's `hidden_dropout_prob`): after the embeddings' LayerNorm,
//! on the attention block's and the feed-forward block's output projections before their
//! residual adds, and on the pooled feature before the classifier.
//!
//! The mask is a function of (row key, site, token position, feature), not of a random stream:
//! `keep = hash(...) ≥ p·2³²`, kept values scaled by 1/(1−p). A row's key comes from the trainer
//! (its seed, step and the example), so the same example at the same step of the same client
//! gets the same mask whether it is trained alone or in a lockstep batch with other clients'
//! rows, packed or padded — lockstep stays equal to sequential training.

use candle_core::{Device, Tensor};

use super::Result;

/// Where in the network a mask is drawn (part of its hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropoutSite {
    /// After the embeddings' LayerNorm.
    Embeddings,
    /// The attention output projection of layer `n`, before the residual add.
    AttentionOutput(usize),
    /// The feed-forward output projection of layer `n`, before the residual add.
    FeedForwardOutput(usize),
    /// The pooled feature, before the classification head.
    Classifier,
}

impl DropoutSite {
    fn code(self) -> u64 {
        match self {
            DropoutSite::Embeddings => 1,
            DropoutSite::AttentionOutput(n) => 2 + 2 * n as u64,
            DropoutSite::FeedForwardOutput(n) => 3 + 2 * n as u64,
            DropoutSite::Classifier => u64::MAX,
        }
    }
}

/// Dropout for one training pass: the probability and one key per batch row.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing a value, in [0, 1).
    pub p: f64,
    /// One key per batch row (see the module doc); [`Dropout::row_key`] makes them.
    pub row_keys: Vec<u64>,
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Dropout {
    /// The key of one row: a client's training seed, the optimizer step and the example's id.
    pub fn row_key(seed: u64, step: usize, example: u64) -> u64 {
        mix(mix(mix(seed) ^ step as u64) ^ example)
    }

    /// True when nothing is dropped.
    pub fn is_off(&self) -> bool {
        self.p <= 0.0
    }

    /// The mask for `rows` of `width` values: row `i` is token `positions[i].1` of batch row
    /// `positions[i].0`. Entries are 0 or 1/(1−p).
    fn mask(&self, site: DropoutSite, positions: &[(usize, usize)], width: usize, device: &Device) -> Result<Tensor> {
        let threshold = (self.p * 4_294_967_296.0) as u64;
        let scale = (1.0 / (1.0 - self.p)) as f32;
        let site = mix(site.code());
        let mut data = vec![0f32; positions.len() * width];
        for (out, &(row, pos)) in data.chunks_mut(width).zip(positions) {
            let key = mix(self.row_keys.get(row).copied().unwrap_or(0) ^ site ^ mix(pos as u64));
            for (j, v) in out.iter_mut().enumerate() {
                if (mix(key ^ j as u64) >> 32) >= threshold {
                    *v = scale;
                }
            }
        }
        Ok(Tensor::from_vec(data, (positions.len(), width), device)?)
    }

    /// Applies the mask to `x`: `[N, d]` packed (row b's tokens at `offsets[b]..offsets[b+1]`),
    /// `[B, T, d]` padded, or `[B, d]` (one value row per batch row: the pooled feature).
    pub fn apply(&self, x: &Tensor, site: DropoutSite, offsets: Option<&[usize]>) -> Result<Tensor> {
        if self.is_off() {
            return Ok(x.clone());
        }
        let dims = x.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        let positions: Vec<(usize, usize)> = match (offsets, dims.len()) {
            (Some(offsets), _) => {
                offsets.windows(2).enumerate().flat_map(|(b, w)| (0..w[1] - w[0]).map(move |t| (b, t))).collect()
            }
            (None, 3) => (0..dims[0]).flat_map(|b| (0..dims[1]).map(move |t| (b, t))).collect(),
            _ => (0..dims[0]).map(|b| (b, usize::MAX)).collect(),
        };
        let mask = self.mask(site, &positions, width, x.device())?.reshape(dims)?;
        Ok(x.mul(&mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_about_p_and_rescales_the_rest() {
        let d = Dropout { p: 0.1, row_keys: vec![Dropout::row_key(7, 3, 11), Dropout::row_key(7, 3, 12)] };
        let x = Tensor::ones((2, 50, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = d.apply(&x, DropoutSite::Embeddings, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.1).abs() < 0.02, "dropped {zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let mean = y.iter().sum::<f32>() / y.len() as f32;
        assert!((mean - 1.0).abs() < 0.03, "expectation kept: {mean}");
    }

    #[test]
    fn the_mask_depends_on_the_row_not_on_the_layout_or_the_batch() {
        let keys = vec![Dropout::row_key(1, 0, 5), Dropout::row_key(1, 0, 9)];
        let both = Dropout { p: 0.5, row_keys: keys.clone() };
        let device = Device::Cpu;
        // Packed: row 0 has 3 tokens, row 1 has 2; padded to T = 3.
        let packed = Tensor::ones((5, 4), candle_core::DType::F32, &device).unwrap();
        let p =
            both.apply(&packed, DropoutSite::AttentionOutput(2), Some(&[0, 3, 5])).unwrap().to_vec2::<f32>().unwrap();
        let padded = Tensor::ones((2, 3, 4), candle_core::DType::F32, &device).unwrap();
        let q = both.apply(&padded, DropoutSite::AttentionOutput(2), None).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(&p[..3], &q[0][..], "row 0 packed = padded");
        assert_eq!(&p[3..], &q[1][..2], "row 1 packed = padded");
        // Row 1 alone in a batch gets the mask it had as row 1 of two.
        let alone = Dropout { p: 0.5, row_keys: vec![keys[1]] };
        let r = alone.apply(&padded.narrow(0, 1, 1).unwrap(), DropoutSite::AttentionOutput(2), None).unwrap();
        assert_eq!(r.to_vec3::<f32>().unwrap()[0], q[1]);
        // Another site, another step: another mask.
        let s = both.apply(&padded, DropoutSite::FeedForwardOutput(2), None).unwrap().to_vec3::<f32>().unwrap();
        assert_ne!(s, q);
        let later = Dropout { p: 0.5, row_keys: vec![Dropout::row_key(1, 1, 5), Dropout::row_key(1, 1, 9)] };
        assert_ne!(later.apply(&padded, DropoutSite::AttentionOutput(2), None).unwrap().to_vec3::<f32>().unwrap(), q);
    }
}
