//! Random models with the real tensor names, written to disk and loaded through the same path as
//! a real checkpoint: stand-ins for tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{BertConfig, ModelError, Result};
use crate::rng::SplitMix64;

/// Writes a random BERT with `config` to `dir` (created if needed) as `config.json` and
/// `model.safetensors`, with HF tensor names: a stand-in for a real checkpoint in tests, loaded
/// through the same path. Deterministic for a given `seed`.
pub fn write_random_model(dir: impl AsRef<Path>, config: &BertConfig, seed: u64) -> Result<()> {
    let dir = dir.as_ref();
    let io = |path: PathBuf| move |source| ModelError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let config_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(config)
        .map_err(|e| ModelError::Config { path: config_path.clone(), message: e.to_string() })?;
    std::fs::write(&config_path, json).map_err(io(config_path.clone()))?;

    let mut rng = SplitMix64::new(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        // Uniform with variance 1/d_in for weight matrices, so activations stay O(1).
        let (center, half_width) = if name.ends_with("LayerNorm.weight") {
            (1.0, 0.1)
        } else if name.ends_with("bias") {
            (0.0, 0.1)
        } else if name.starts_with("embeddings.") {
            (0.0, 1.0)
        } else {
            (0.0, (3.0 / shape[1] as f64).sqrt())
        };
        let values = (0..n).map(|_| (center + half_width * rng.next_symmetric()) as f32).collect::<Vec<_>>();
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    let weights_path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path)
        .map_err(|e| ModelError::Weights { files: weights_path.display().to_string(), message: e.to_string() })?;
    Ok(())
}
