//! A BERT encoder (all-MiniLM-L6-v2 and friends) loaded from HF weights, with adapter hooks.
//!
//! Same tensor names and structure as HF `BertModel` (and candle-transformers' `bert.rs`). Two
//! sentence features: the masked mean of the last hidden state (sentence-transformers), or HF's
//! pooler `tanh(dense(h_[CLS]))` when the checkpoint has one (what `BertForSequenceClassification`
//! feeds its classifier). Training passes may carry [`Dropout`](super::Dropout) at HF's sites.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use fedpool_kernels::attention::AttentionShape;
use serde::{Deserialize, Serialize};

use super::dropout::DropoutSite;
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

/// HF `BertConfig`'s default dropout probabilities.
fn default_dropout() -> f64 {
    0.1
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
    /// Dropout on hidden states while training (HF's default 0.1 when absent).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities in HF (0.1 when absent). fedpool's fused attention
    /// has none: read, reported, not applied (README, "PEFT equivalence").
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
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
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
        }
    }

    /// Reads and checks an HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        super::read_config(path.as_ref(), Self::check)
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
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} {p} must be in [0, 1)"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
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
        // Optional when loading (sentence-transformers checkpoints may lack it); last, so the
        // random models' other values do not depend on it.
        shapes.push(("pooler.dense.weight".into(), vec![h, h]));
        shapes.push(("pooler.dense.bias".into(), vec![h]));
        shapes
    }
}

/// Which implementation of the forward path's ops a [`BertEncoder`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// `fedpool_kernels`' fused ops, each with its own backward: LayerNorm with the SSF folded in,
    /// the linear layer with its bias in the gemm, GELU with the bias, SSF, and attention by real
    /// length (padding keys and queries cost nothing). The default; on a device other than the CPU
    /// each kernel runs candle's composed ops.
    #[default]
    Fused,
    /// candle's composed ops (LayerNorm from 8 basic ops, softmax over a padding bias, …): the
    /// reference the fused kernels are tested and benchmarked against.
    Composed,
}

/// How a pass lays out its hidden states.
#[derive(Debug, Clone)]
enum Tokens {
    /// `[B, T, H]`, padding included; the composed attention masks padding keys with `mask_bias`
    /// (`[B, 1, 1, T]`: 0 on a token, `f32::MIN` on padding).
    Padded { mask_bias: Tensor },
    /// `[B, T, H]`, padding included, every row's mask a prefix of ones: the fused attention
    /// computes only each row's `lengths[b]` real tokens.
    PaddedByLength { lengths: Vec<usize> },
    /// `[N, H]`: only the real tokens, row b's at `offsets[b]..offsets[b + 1]` (N = Σ lengths).
    /// Per-token work (linear layers, norms, activations) then costs nothing on padding.
    Packed { offsets: Vec<usize> },
}

/// What one forward pass knows about its batch besides the tensors.
struct Pass<'a> {
    hooks: &'a Hooks,
    kernels: Kernels,
    tokens: Tokens,
}

impl Pass<'_> {
    fn fused(&self) -> bool {
        self.kernels == Kernels::Fused
    }

    /// `x` with the pass's dropout (if any) at `site`.
    fn dropout(&self, x: Tensor, site: DropoutSite) -> Result<Tensor> {
        match self.hooks.dropout() {
            Some(d) if !d.is_off() => d.apply(&x, site, self.packed()),
            _ => Ok(x),
        }
    }

    /// The batch-row offsets of packed tokens.
    fn packed(&self) -> Option<&[usize]> {
        match &self.tokens {
            Tokens::Packed { offsets } => Some(offsets),
            _ => None,
        }
    }
}

/// A linear layer `y = x Wᵀ + b`, adaptable by LoRA and SSF under its module path.
#[derive(Clone)]
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

    /// `x: [..., d_in]` (`[B, T, d_in]`, or `[N, d_in]` packed) → `[..., d_out]`.
    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        self.forward_with_bias(x, pass, true)
    }

    /// [`forward`](Self::forward), optionally leaving the bias out (for a caller that fuses it
    /// into the next op; only without an SSF here, which comes after the bias).
    fn forward_with_bias(&self, x: &Tensor, pass: &Pass, with_bias: bool) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let d_in = out_dims.pop().unwrap_or(0);
        let x = x.reshape(((), d_in))?;
        // The weight is frozen: its gradient is never needed (fedpool_kernels::frozen).
        let mut y = if pass.fused() {
            fedpool_kernels::frozen_linear(&x, &self.weight, with_bias.then_some(&self.bias))?
        } else {
            let y = fedpool_kernels::frozen_matmul(&x, &self.weight.t()?)?;
            if with_bias {
                y.broadcast_add(&self.bias)?
            } else {
                y
            }
        };
        if let Some(lora) = pass.hooks.lora(&self.name) {
            y = (y + lora.apply(&x)?)?;
        }
        out_dims.push(y.dim(1)?);
        let y = y.reshape(out_dims)?;
        ssf(y, &self.name, pass)
    }

    /// `gelu(x Wᵀ + b)` with the SSF (if any) between the bias and the activation.
    fn forward_gelu(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        if !pass.fused() {
            return Ok(self.forward(x, pass)?.gelu_erf()?);
        }
        if pass.hooks.ssf(&self.name).is_some() {
            return Ok(fedpool_kernels::activation::gelu_erf(&self.forward(x, pass)?)?);
        }
        let y = self.forward_with_bias(x, pass, false)?;
        Ok(fedpool_kernels::activation::bias_gelu_erf(&y, &self.bias)?)
    }
}

/// LayerNorm over the last dimension, with a backward: `fedpool_kernels::norm` (the SSF of the
/// point folded in), or written from basic ops (candle's own fused `layer_norm` has no backward:
/// adapters below it would get no gradient).
#[derive(Clone)]
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

    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        if pass.fused() {
            use fedpool_kernels::norm;
            let (w, b, eps) = (&self.weight, &self.bias, self.eps);
            return Ok(match (pass.hooks.ssf(&self.name), pass.packed()) {
                (Some(s), Some(offsets)) => fedpool_kernels::ssf::scale_shift_packed(
                    &norm::layer_norm(x, w, b, eps)?,
                    &s.scale,
                    &s.shift,
                    offsets,
                )?,
                (Some(s), None) => norm::layer_norm_scale_shift(x, w, b, eps, &s.scale, &s.shift)?,
                (None, _) => norm::layer_norm(x, w, b, eps)?,
            });
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?;
        ssf(y, &self.name, pass)
    }
}

/// Applies the SSF hook at `name`, if any.
fn ssf(y: Tensor, name: &str, pass: &Pass) -> Result<Tensor> {
    let Some(s) = pass.hooks.ssf(name) else { return Ok(y) };
    match (pass.fused(), pass.packed()) {
        (true, Some(offsets)) => Ok(fedpool_kernels::ssf::scale_shift_packed(&y, &s.scale, &s.shift, offsets)?),
        (true, None) => Ok(fedpool_kernels::ssf::scale_shift(&y, &s.scale, &s.shift)?),
        (false, _) => s.apply(&y),
    }
}

/// Word + position + token-type-0 embeddings, then LayerNorm.
#[derive(Clone)]
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

    /// `ids: [B, T]` (u32) → `[B, T, H]`, or `[N, H]` for packed tokens.
    fn forward(&self, ids: &Tensor, pass: &Pass) -> Result<Tensor> {
        if let Some(offsets) = pass.packed() {
            // Only the real tokens: row b's ids and positions 0..len_b.
            let rows = ids.to_vec2::<u32>()?;
            let (mut words, mut positions) = (Vec::new(), Vec::new());
            for (row, w) in rows.iter().zip(offsets.windows(2)) {
                words.extend_from_slice(&row[..w[1] - w[0]]);
                positions.extend(0..(w[1] - w[0]) as u32);
            }
            let device = ids.device();
            let n = words.len();
            let words = self.word.index_select(&Tensor::from_vec(words, n, device)?, 0)?;
            let position = self.position.index_select(&Tensor::from_vec(positions, n, device)?, 0)?;
            let token_type = self.token_type.narrow(0, 0, 1)?;
            let x = words.broadcast_add(&token_type)?.add(&position)?;
            return pass.dropout(self.layer_norm.forward(&x, pass)?, DropoutSite::Embeddings);
        }
        let (b, t) = ids.dims2()?;
        let words = self.word.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, ()))?;
        let token_type = self.token_type.narrow(0, 0, 1)?;
        let position = self.position.narrow(0, 0, t)?;
        let x = words.broadcast_add(&token_type)?.broadcast_add(&position)?;
        pass.dropout(self.layer_norm.forward(&x, pass)?, DropoutSite::Embeddings)
    }
}

/// Multi-head self-attention (the `attention.self` module).
#[derive(Clone)]
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

    /// `x: [B, T, H]` (or packed `[N, H]`) → context of the same shape.
    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (q, k, v) = (self.query.forward(x, pass)?, self.key.forward(x, pass)?, self.value.forward(x, pass)?);
        let shape = AttentionShape {
            num_heads: self.num_heads,
            num_kv_heads: self.num_heads,
            head_dim: self.head_dim,
            causal: false,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        let mask_bias = match &pass.tokens {
            Tokens::Packed { offsets } => {
                return Ok(fedpool_kernels::attention::attention_packed(&q, &k, &v, offsets, &shape)?)
            }
            Tokens::PaddedByLength { lengths } => {
                return Ok(fedpool_kernels::attention::attention(&q, &k, &v, lengths, &shape)?)
            }
            Tokens::Padded { mask_bias } => mask_bias,
        };
        let (b, t, h) = x.dims3()?;
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let scores = scores.broadcast_add(mask_bias)?;
        // Not softmax_last_dim: that fused kernel has no backward.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?)
    }
}

/// One encoder layer: attention block and feed-forward block, each with residual + LayerNorm.
#[derive(Clone)]
struct Layer {
    index: usize,
    attention: SelfAttention,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Layer {
    fn load(w: &Weights, cfg: &BertConfig, index: usize) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let attention = w.pp("attention");
        Ok(Self {
            index,
            attention: SelfAttention::load(&attention.pp("self"), cfg)?,
            attention_output: Linear::load(&attention.pp("output").pp("dense"), h, h)?,
            attention_norm: LayerNorm::load(&attention.pp("output").pp("LayerNorm"), h, eps)?,
            intermediate: Linear::load(&w.pp("intermediate").pp("dense"), h, i)?,
            output: Linear::load(&w.pp("output").pp("dense"), i, h)?,
            output_norm: LayerNorm::load(&w.pp("output").pp("LayerNorm"), h, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let context = self.attention.forward(x, pass)?;
        let attended = self.attention_output.forward(&context, pass)?;
        let attended = pass.dropout(attended, DropoutSite::AttentionOutput(self.index))?;
        let x = self.attention_norm.forward(&(attended + x)?, pass)?;
        let inner = self.intermediate.forward_gelu(&x, pass)?;
        let out = pass.dropout(self.output.forward(&inner, pass)?, DropoutSite::FeedForwardOutput(self.index))?;
        self.output_norm.forward(&(out + x)?, pass)
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
/// Cloning shares the weights (reference-counted).
#[derive(Clone)]
pub struct BertEncoder {
    config: BertConfig,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// HF's pooler (`pooler.dense`), when the checkpoint has one.
    pooler: Option<Linear>,
    ssf_dims: BTreeMap<String, usize>,
    lora_dims: BTreeMap<String, (usize, usize)>,
    device: Device,
    kernels: Kernels,
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
            .map(|i| Layer::load(&w.pp("encoder").pp("layer").pp(i), &config, i))
            .collect::<Result<Vec<_>>>()?;
        let pooler_weights = w.pp("pooler").pp("dense");
        let pooler = if pooler_weights.contains("weight") {
            Some(Linear::load(&pooler_weights, config.hidden_size, config.hidden_size)?)
        } else {
            None
        };
        let ssf_dims = config.ssf_points().into_iter().map(|p| (p.name, p.dim)).collect();
        let lora_dims = config.lora_targets().into_iter().map(|t| (t.name, (t.d_in, t.d_out))).collect();
        Ok(Self {
            config,
            embeddings,
            layers,
            pooler,
            ssf_dims,
            lora_dims,
            device: device.clone(),
            kernels: Kernels::default(),
        })
    }

    /// The same model running `kernels` (the default is [`Kernels::Fused`]).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The implementation the forward pass runs.
    pub fn kernels(&self) -> Kernels {
        self.kernels
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
    ///
    /// With [`Kernels::Fused`] the hidden states at padding positions are 0 (padding is never
    /// computed); every real token's state is the same as with [`Kernels::Composed`].
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let (x, pass) = self.encode(ids, mask, hooks)?;
        let Some(offsets) = pass.packed() else { return Ok(x) };
        let (b, t) = ids.dims2()?;
        // Back to [B, T, H]: each padded position reads its packed row, padding reads a zero row.
        let n = x.dim(0)?;
        let mut index = vec![n as u32; b * t];
        for (row, w) in offsets.windows(2).enumerate() {
            for (i, slot) in index[row * t..row * t + w[1] - w[0]].iter_mut().enumerate() {
                *slot = (w[0] + i) as u32;
            }
        }
        let with_zero = Tensor::cat(&[&x, &x.narrow(0, 0, 1)?.zeros_like()?], 0)?;
        Ok(with_zero.index_select(&Tensor::from_vec(index, b * t, x.device())?, 0)?.reshape((b, t, ()))?)
    }

    /// The sentence embedding `[B, H]`: the masked mean of [`forward`](Self::forward)'s output.
    pub fn pooled(&self, ids: &Tensor, mask: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let (x, pass) = self.encode(ids, mask, hooks)?;
        let Some(offsets) = pass.packed() else { return mean_pool(&x, mask) };
        // The mean of each row's packed tokens, as one [B, N] · [N, H] product.
        let n = x.dim(0)?;
        let b = offsets.len() - 1;
        let mut averaging = vec![0f32; b * n];
        for (row, w) in offsets.windows(2).enumerate() {
            let share = 1.0 / (w[1] - w[0]) as f32;
            averaging[row * n + w[0]..row * n + w[1]].iter_mut().for_each(|a| *a = share);
        }
        Ok(Tensor::from_vec(averaging, (b, n), x.device())?.matmul(&x)?)
    }

    /// True when the checkpoint has HF's pooler ([`pooled_cls`](Self::pooled_cls) works).
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// HF `BertPooler`'s sentence feature `[B, H]`: `tanh(h_[CLS] Wᵀ + b)` with the frozen
    /// `pooler.dense` (the first token of every row; what `BertForSequenceClassification` feeds
    /// its dropout and classifier). An error naming the tensor when the checkpoint has no pooler.
    pub fn pooled_cls(&self, ids: &Tensor, mask: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let pooler = self.pooler.as_ref().ok_or_else(|| ModelError::Input(
            "pooling = \"cls-pooler\" needs the checkpoint's pooler.dense.weight, which this model lacks: use \"mean\"".into(),
        ))?;
        let (x, pass) = self.encode(ids, mask, hooks)?;
        let cls = match pass.packed() {
            Some(offsets) => {
                let first: Vec<u32> = offsets[..offsets.len() - 1].iter().map(|&o| o as u32).collect();
                let n = first.len();
                x.index_select(&Tensor::from_vec(first, n, x.device())?, 0)?
            }
            None => x.narrow(1, 0, 1)?.squeeze(1)?,
        };
        // The pooler is frozen and never adapted: a plain linear layer, then tanh.
        let dense = match self.kernels {
            Kernels::Fused => fedpool_kernels::frozen_linear(&cls, &pooler.weight, Some(&pooler.bias))?,
            Kernels::Composed => {
                fedpool_kernels::frozen_matmul(&cls, &pooler.weight.t()?)?.broadcast_add(&pooler.bias)?
            }
        };
        Ok(dense.tanh()?)
    }

    /// Runs the encoder: the last hidden state in the pass's layout ([`Tokens`]), and the pass.
    fn encode<'h>(&self, ids: &Tensor, mask: &Tensor, hooks: &'h Hooks) -> Result<(Tensor, Pass<'h>)> {
        let (b, t) = self.check_input(ids, mask)?;
        hooks.check(&self.ssf_dims, &self.lora_dims, b)?;
        let lengths = if self.kernels == Kernels::Fused { prefix_lengths(mask)? } else { None };
        let tokens = match lengths {
            Some(lengths) => {
                // Per-row LoRA factors (the simulator's lockstep) are applied per padded row.
                if hooks.lora_hooks().any(|(_, l)| l.per_row()) {
                    Tokens::PaddedByLength { lengths }
                } else {
                    let offsets = std::iter::once(0).chain(lengths.iter().scan(0, |acc, l| {
                        *acc += l;
                        Some(*acc)
                    }));
                    Tokens::Packed { offsets: offsets.collect() }
                }
            }
            _ => {
                // (1 - m)·f32::MIN, as HF: a padding key's score gets the most negative f32, so
                // its softmax weight is exactly 0.
                let bias = mask.to_dtype(DType::F32)?.affine(f32::MAX as f64, f32::MIN as f64)?;
                Tokens::Padded { mask_bias: bias.reshape((b, 1, 1, t))? }
            }
        };
        let pass = Pass { hooks, kernels: self.kernels, tokens };
        let mut x = self.embeddings.forward(ids, &pass)?;
        for layer in &self.layers {
            x = layer.forward(&x, &pass)?;
        }
        Ok((x, pass))
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

/// Each row's number of tokens when every row of `mask: [B, T]` is ones then zeros with at least
/// one token (what [`crate::train::Batch::pad`] builds); `None` for any other mask, which then goes
/// through the padding-bias attention.
fn prefix_lengths(mask: &Tensor) -> Result<Option<Vec<usize>>> {
    let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mut lengths = Vec::with_capacity(rows.len());
    for row in rows {
        let len = row.iter().take_while(|&&m| m != 0).count();
        if len == 0 || row[len..].iter().any(|&m| m != 0) {
            return Ok(None);
        }
        lengths.push(len);
    }
    Ok(Some(lengths))
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
