//! Helpers shared by the integration tests: a random tiny model on disk, deterministic random
//! tensors and inputs.

use candle_core::{Device, Tensor};
use fedpool_client::model::{write_random_model, BertConfig, BertEncoder};
use tempfile::TempDir;

/// A random tiny BERT written to a temp folder and loaded back (keep the folder alive).
pub fn tiny_model(seed: u64) -> (TempDir, BertEncoder) {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &BertConfig::tiny(), seed).unwrap();
    let model = BertEncoder::load(dir.path(), &Device::Cpu).unwrap();
    (dir, model)
}

/// Deterministic uniform values in `center ± half_width` (SplitMix64).
pub fn uniform(n: usize, seed: u64, center: f32, half_width: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
            center + half_width * (2.0 * unit - 1.0)
        })
        .collect()
}

/// A `[dims]` tensor of [`uniform`] values.
pub fn random_tensor(dims: &[usize], seed: u64, center: f32, half_width: f32) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(uniform(n, seed, center, half_width), dims, &Device::Cpu).unwrap()
}

/// A batch of 3 sequences of 7 token ids for the tiny model; row 1 has 3 padding tokens, row 2
/// has 1.
pub fn tiny_inputs() -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..21u32).map(|i| (i * 37 + 11) % 128).collect();
    let mut mask = vec![1u32; 21];
    for i in [11, 12, 13, 20] {
        mask[i] = 0;
    }
    let ids = Tensor::from_vec(ids, (3, 7), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (3, 7), &Device::Cpu).unwrap();
    (ids, mask)
}

/// Max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// All values of a tensor, flattened.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
