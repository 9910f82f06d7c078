//! A BERT encoder (all-MiniLM-L6-v2 and friends) loaded from HF weights, with adapter hooks.
//!
//! Same tensor names and structure as HF `BertModel` (and candle-transformers' `bert.rs`), minus
//! the pooler: sentence embeddings are the masked mean of the last hidden state, as in
//! sentence-transformers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::hooks::{Hooks, LinearTarget, SsfPoint};
use super::weights::Weights;
use super::{ModelError, Result};

/// The activation of the feed-forward block. Only exact (erf) GELU is supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// GELU with erf, as HF's `"gelu"`.
    Gelu,
}

/// How token positions are encoded. Only learned absolute positions are supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEmbeddingType {
    /// A learned embedding per position, added to the token embedding.
    #[default]
    Absolute,
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

/// The fields of HF `config.json` that a BERT encoder needs; other fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states (384 for MiniLM-L6).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Feed-forward activation; must be `"gelu"`.
    pub hidden_act: HiddenAct,
    /// Longest input, in tokens.
    pub max_position_embeddings: usize,
    /// Number of token types (segments); we always use type 0.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Must be `"absolute"` when present.
    #[serde(default)]
    pub position_embedding_type: PositionEmbeddingType,
}

impl BertConfig {
    /// A tiny random-test configuration: hidden 32, 2 layers, 2 heads, intermediate 64, vocab 128.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 128,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 64,
            hidden_act: HiddenAct::Gelu,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: PositionEmbeddingType::Absolute,
        }
    }

    /// Reads and checks an HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(ModelError::NotFound { what: "config file", path: path.to_path_buf() });
        }
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { path: path.to_path_buf(), message: e.to_string() })?;
        config.check().map_err(|message| ModelError::Config { path: path.to_path_buf(), message })?;
        Ok(config)
    }

    /// Checks that the sizes are consistent.
    fn check(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    /// Every op whose output SSF can adapt, in forward order, with its width: `embeddings.LayerNorm`
    /// then, per layer, query, key, value, attention output dense and LayerNorm, intermediate
    /// dense, output dense and LayerNorm.
    pub fn ssf_points(&self) -> Vec<SsfPoint> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut points = vec![SsfPoint { name: "embeddings.LayerNorm".into(), dim: h }];
        for layer in 0..self.num_hidden_layers {
            for (module, dim) in [
                ("attention.self.query", h),
                ("attention.self.key", h),
                ("attention.self.value", h),
                ("attention.output.dense", h),
                ("attention.output.LayerNorm", h),
                ("intermediate.dense", i),
                ("output.dense", h),
                ("output.LayerNorm", h),
            ] {
                points.push(SsfPoint { name: format!("encoder.layer.{layer}.{module}"), dim });
            }
        }
        points
    }

    /// Every linear layer LoRA can adapt, in forward order, with `(d_in, d_out)`.
    pub fn lora_targets(&self) -> Vec<LinearTarget> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut targets = Vec::new();
        for layer in 0..self.num_hidden_layers {
            for (module, d_in, d_out) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", h, i),
                ("output.dense", i, h),
            ] {
                targets.push(LinearTarget { name: format!("encoder.layer.{layer}.{module}"), d_in, d_out });
            }
        }
        targets
    }

    /// Every backbone tensor the encoder loads, by HF name (no prefix), with its shape.
    pub(crate) fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut shapes = vec![
            ("embeddings.word_embeddings.weight".into(), vec![self.vocab_size, h]),
            ("embeddings.position_embeddings.weight".into(), vec![self.max_position_embeddings, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![self.type_vocab_size, h]),
        ];
        for target in self.lora_targets() {
            let name = &target.name;
            shapes.push((format!("{name}.weight"), vec![target.d_out, target.d_in]));
            shapes.push((format!("{name}.bias"), vec![target.d_out]));
        }
        for point in self.ssf_points() {
            if point.name.ends_with("LayerNorm") {
                shapes.push((format!("{}.weight", point.name), vec![point.dim]));
                shapes.push((format!("{}.bias", point.name), vec![point.dim]));
            }
        }
        shapes
    }
}

/// A linear layer `y = x Wᵀ + b`, adaptable by LoRA and SSF under its module path.
struct Linear {
    name: String,
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(w: &Weights, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self {
            name: w.path().to_string(),
            weight: w.get(&[d_out, d_in], "weight")?,
            bias: w.get(&[d_out], "bias")?,
        })
    }

    /// `x: [B, T, d_in]` → `[B, T, d_out]`.
    fn forward(&self, x: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let x = x.reshape((b * t, d_in))?;
        // The weight is frozen: its gradient is never needed (fedpool_kernels::frozen).
        let mut y = fedpool_kernels::frozen_matmul(&x, &self.weight.t()?)?.broadcast_add(&self.bias)?;
        if let Some(lora) = hooks.lora(&self.name) {
            y = (y + lora.apply(&x)?)?;
        }
        let y = y.reshape((b, t, ()))?;
        ssf(y, &self.name, hooks)
    }
}

/// LayerNorm over the last dimension, written from basic ops so that it has a backward (candle's
/// fused `layer_norm` has none: adapters below it would get no gradient).
struct LayerNorm {
    name: String,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { name: w.path().to_string(), weight: w.get(&[dim], "weight")?, bias: w.get(&[dim], "bias")?, eps })
    }

    fn forward(&self, x: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?;
        ssf(y, &self.name, hooks)
    }
}

/// Applies the SSF hook at `name`, if any.
fn ssf(y: Tensor, name: &str, hooks: &Hooks) -> Result<Tensor> {
    match hooks.ssf(name) {
        Some(ssf) => ssf.apply(&y),
        None => Ok(y),
    }
}

/// Word + position + token-type-0 embeddings, then LayerNorm.
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    layer_norm: LayerNorm,
}

impl Embeddings {
    fn load(w: &Weights, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: w.pp("word_embeddings").get(&[cfg.vocab_size, h], "weight")?,
            position: w.pp("position_embeddings").get(&[cfg.max_position_embeddings, h], "weight")?,
            token_type: w.pp("token_type_embeddings").get(&[cfg.type_vocab_size, h], "weight")?,
            layer_norm: LayerNorm::load(&w.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        })
    }

    /// `ids: [B, T]` (u32) → `[B, T, H]`.
    fn forward(&self, ids: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let words = self.word.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, ()))?;
        let token_type = self.token_type.narrow(0, 0, 1)?;
        let position = self.position.narrow(0, 0, t)?;
        let x = words.broadcast_add(&token_type)?.broadcast_add(&position)?;
        self.layer_norm.forward(&x, hooks)
    }
}

/// Multi-head self-attention (the `attention.self` module).
struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn load(w: &Weights, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query: Linear::load(&w.pp("query"), h, h)?,
            key: Linear::load(&w.pp("key"), h, h)?,
            value: Linear::load(&w.pp("value"), h, h)?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `x: [B, T, H]`, `mask_bias: [B, 1, 1, T]` → context `[B, T, H]`.
    fn forward(&self, x: &Tensor, mask_bias: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.query.forward(x, hooks)?)?;
        let k = heads(self.key.forward(x, hooks)?)?;
        let v = heads(self.value.forward(x, hooks)?)?;
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let scores = scores.broadcast_add(mask_bias)?;
        // Not softmax_last_dim: that fused kernel has no backward.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?)
    }
}

/// One encoder layer: attention block and feed-forward block, each with residual + LayerNorm.
struct Layer {
    attention: SelfAttention,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Layer {
    fn load(w: &Weights, cfg: &BertConfig) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let attention = w.pp("attention");
        Ok(Self {
            attention: SelfAttention::load(&attention.pp("self"), cfg)?,
            attention_output: Linear::load(&attention.pp("output").pp("dense"), h, h)?,
            attention_norm: LayerNorm::load(&attention.pp("output").pp("LayerNorm"), h, eps)?,
            intermediate: Linear::load(&w.pp("intermediate").pp("dense"), h, i)?,
            output: Linear::load(&w.pp("output").pp("dense"), i, h)?,
            output_norm: LayerNorm::load(&w.pp("output").pp("LayerNorm"), h, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, mask_bias: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let context = self.attention.forward(x, mask_bias, hooks)?;
        let attended = self.attention_output.forward(&context, hooks)?;
        let x = self.attention_norm.forward(&(attended + x)?, hooks)?;
        let inner = self.intermediate.forward(&x, hooks)?.gelu_erf()?;
        let out = self.output.forward(&inner, hooks)?;
        self.output_norm.forward(&(out + x)?, hooks)
    }

    #[cfg(test)]
    fn module_names(&self) -> [&str; 8] {
        [
            &self.attention.query.name,
            &self.attention.key.name,
            &self.attention.value.name,
            &self.attention_output.name,
            &self.attention_norm.name,
            &self.intermediate.name,
            &self.output.name,
            &self.output_norm.name,
        ]
    }
}

/// A frozen BERT encoder. Every weight is a plain tensor; adapters come in through [`Hooks`].
pub struct BertEncoder {
    config: BertConfig,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    ssf_dims: BTreeMap<String, usize>,
    lora_dims: BTreeMap<String, (usize, usize)>,
    device: Device,
}

impl BertEncoder {
    /// Loads `dir/config.json` and `dir/model.safetensors` (an HF model folder).
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ModelError::NotFound { what: "model folder", path: dir.to_path_buf() });
        }
        Self::load_files(dir.join("config.json"), &[dir.join("model.safetensors")], device)
    }

    /// Loads a config file and one or more safetensors files. Tensor names are HF's, with or
    /// without a `bert.` prefix (detected from `embeddings.word_embeddings.weight`).
    pub fn load_files(config: impl AsRef<Path>, weights: &[PathBuf], device: &Device) -> Result<Self> {
        let config = BertConfig::from_file(config)?;
        let w = Weights::open(weights, device, "embeddings.word_embeddings.weight", "bert")?;
        let embeddings = Embeddings::load(&w.pp("embeddings"), &config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(&w.pp("encoder").pp("layer").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        let ssf_dims = config.ssf_points().into_iter().map(|p| (p.name, p.dim)).collect();
        let lora_dims = config.lora_targets().into_iter().map(|t| (t.name, (t.d_in, t.d_out))).collect();
        Ok(Self { config, embeddings, layers, ssf_dims, lora_dims, device: device.clone() })
    }

    /// The model's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The last hidden state `[B, T, H]` for token ids `ids: [B, T]` (u32) and attention mask
    /// `mask: [B, T]` (1 for a token, 0 for padding; any dtype), with the given adapters.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let (b, t) = self.check_input(ids, mask)?;
        hooks.check(&self.ssf_dims, &self.lora_dims, b)?;
        // (1 - m)·f32::MIN, as HF: a padding key's score gets the most negative f32, so its
        // softmax weight is exactly 0.
        let mask_bias = mask.to_dtype(DType::F32)?.affine(f32::MAX as f64, f32::MIN as f64)?.reshape((b, 1, 1, t))?;
        let mut x = self.embeddings.forward(ids, hooks)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask_bias, hooks)?;
        }
        Ok(x)
    }

    /// The sentence embedding `[B, H]`: the masked mean of [`forward`](Self::forward)'s output.
    pub fn pooled(&self, ids: &Tensor, mask: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        mean_pool(&self.forward(ids, mask, hooks)?, mask)
    }

    /// Checks the shapes, dtype and range of the inputs; returns `(B, T)`.
    fn check_input(&self, ids: &Tensor, mask: &Tensor) -> Result<(usize, usize)> {
        let input = |msg: String| ModelError::Input(msg);
        let (b, t) = ids.dims2().map_err(|_| input(format!("token ids must be [B, T], got {:?}", ids.dims())))?;
        if mask.dims() != ids.dims() {
            return Err(input(format!("attention mask has shape {:?}, token ids {:?}", mask.dims(), ids.dims())));
        }
        if ids.dtype() != DType::U32 {
            return Err(input(format!("token ids must be u32, got {:?}", ids.dtype())));
        }
        if t > self.config.max_position_embeddings {
            return Err(input(format!("{t} tokens, the model takes at most {}", self.config.max_position_embeddings)));
        }
        if b * t > 0 {
            let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
            if max_id >= self.config.vocab_size {
                return Err(input(format!(
                    "token id {max_id} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        Ok((b, t))
    }

    /// The hook names of the modules as loaded, in forward order (for consistency tests).
    #[cfg(test)]
    fn module_names(&self) -> Vec<&str> {
        let mut names = vec![self.embeddings.layer_norm.name.as_str()];
        for layer in &self.layers {
            names.extend(layer.module_names());
        }
        names
    }
}

/// Sentence-transformers mean pooling: `Σ_t h[b,t]·m[b,t] / max(Σ_t m[b,t], 1e-9)`, for
/// `hidden: [B, T, H]` and `mask: [B, T]` (any dtype) → `[B, H]`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let count = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(summed.broadcast_div(&count)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::write_random_model;

    #[test]
    fn hook_names_are_the_loaded_module_paths() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BertConfig::tiny();
        write_random_model(dir.path(), &cfg, 1).unwrap();
        let model = BertEncoder::load(dir.path(), &Device::Cpu).unwrap();
        let points: Vec<String> = cfg.ssf_points().into_iter().map(|p| p.name).collect();
        assert_eq!(model.module_names(), points);
        for target in cfg.lora_targets() {
            assert!(points.contains(&target.name), "{}", target.name);
        }
    }

    #[test]
    fn minilm_config_parses_and_other_activations_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let minilm = r#"{"hidden_act": "gelu", "hidden_size": 384, "intermediate_size": 1536,
            "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 6,
            "type_vocab_size": 2, "vocab_size": 30522, "position_embedding_type": "absolute",
            "model_type": "bert"}"#;
        std::fs::write(&path, minilm).unwrap();
        let cfg = BertConfig::from_file(&path).unwrap();
        assert_eq!(cfg.ssf_points().len(), 1 + 6 * 8);
        assert_eq!(cfg.lora_targets().len(), 6 * 6);
        assert_eq!(cfg.layer_norm_eps, 1e-12);

        std::fs::write(&path, minilm.replace("\"gelu\"", "\"relu\"")).unwrap();
        let err = BertConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("relu") && err.contains("config.json"), "{err}");
    }
}
