//! A Llama-family decoder (SmolLM2, Llama, Qwen-style without biases) with adapter hooks, loaded
//! from a GGUF file (its base kept quantized) or from HF `config.json` + `model.safetensors`.
//!
//! HF `LlamaForCausalLM`'s structure and module names (`model.layers.3.self_attn.q_proj`):
//! RMSNorm, rotary position embeddings (HF's rotate-half form), grouped-query attention with a
//! causal mask, SwiGLU feed-forward, a tied or separate LM head. Hooks as in
//! [`BertEncoder`](super::BertEncoder): SSF at every norm and projection output, LoRA on any of
//! `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`.
//!
//! A GGUF base stays in its stored types ([`Frozen::Quantized`]): every projection runs
//! `fedpool_kernels::quantized::quantized_linear` (gradient for the input only, the weight
//! dequantized a band at a time), the token embedding reads quantized rows. llama.cpp stores the
//! query and key projections with each head's rotary halves interleaved; the loader moves their
//! rows back to HF's order (no requantization), so LoRA factors mean the same in both formats.
//!
//! Tokens are packed: a batch is `[N, d]`, row `b`'s tokens at `offsets[b]..offsets[b + 1]`, every
//! row starting at position 0 (no padding is computed). Generation keeps a KV cache per row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use fedpool_kernels::attention::AttentionShape;
use serde::{Deserialize, Serialize};

use super::gguf::GgufFile;
use super::hooks::{Hooks, LinearTarget, SsfPoint};
use super::weights::Weights;
use super::{ModelError, Result};

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

/// The fields of HF `config.json` (`LlamaConfig`) a decoder needs; other fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states (576 for SmolLM2-135M).
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward block.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Number of key/value heads; divides `num_attention_heads` (GQA when smaller).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence, in tokens.
    pub max_position_embeddings: usize,
    /// True when the LM head is the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// A tiny random-test configuration: hidden 64, 2 layers, 4 heads over 2 KV heads, FFN 128,
    /// vocab 96 (every width a whole number of pairs of 32-value quantization blocks).
    pub fn tiny() -> Self {
        Self {
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
        }
    }

    /// Reads and checks an HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        super::read_config(path.as_ref(), Self::check)
    }

    /// The configuration in a GGUF file's `llama.*` metadata (`general.architecture = llama`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let fail = |message: String| ModelError::Config { path: file.path().to_path_buf(), message };
        match file.string("general.architecture") {
            Some("llama") => {}
            other => return Err(fail(format!("architecture {other:?} is not supported (only \"llama\")"))),
        }
        if let Some(kind) = file.string("llama.rope.scaling.type").filter(|k| *k != "none") {
            return Err(fail(format!("RoPE scaling {kind:?} is not supported")));
        }
        let vocab_size = match file.usize("llama.vocab_size") {
            Ok(n) => n,
            Err(_) => match file.value("tokenizer.ggml.tokens") {
                Some(candle_core::quantized::gguf_file::Value::Array(tokens)) => tokens.len(),
                _ => return Err(fail("neither llama.vocab_size nor tokenizer.ggml.tokens is present".into())),
            },
        };
        let heads = file.usize("llama.attention.head_count")?;
        let config = Self {
            vocab_size,
            hidden_size: file.usize("llama.embedding_length")?,
            intermediate_size: file.usize("llama.feed_forward_length")?,
            num_hidden_layers: file.usize("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: file.usize("llama.attention.head_count_kv").unwrap_or(heads),
            rms_norm_eps: file.f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: file.f64("llama.rope.freq_base").unwrap_or_else(|_| default_rope_theta()),
            max_position_embeddings: file.usize("llama.context_length")?,
            tie_word_embeddings: !file.has_tensor("output.weight"),
        };
        config.check().map_err(fail)?;
        if let Ok(rot) = file.usize("llama.rope.dimension_count") {
            if rot != config.head_dim() {
                return Err(fail(format!("partial rotary ({rot} of {} dims) is not supported", config.head_dim())));
            }
        }
        Ok(config)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_key_value_heads
    }

    /// Checks that the sizes are consistent.
    fn check(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "hidden_size {} is not an even head width times num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        Ok(())
    }

    /// The seven projections of layer `layer` with `(module path, d_in, d_out)`, in forward order.
    fn projections(&self, layer: usize) -> [(String, usize, usize); 7] {
        let (h, kv, i) = (self.hidden_size, self.kv_dim(), self.intermediate_size);
        let name = |m: &str| format!("model.layers.{layer}.{m}");
        [
            (name("self_attn.q_proj"), h, h),
            (name("self_attn.k_proj"), h, kv),
            (name("self_attn.v_proj"), h, kv),
            (name("self_attn.o_proj"), h, h),
            (name("mlp.gate_proj"), h, i),
            (name("mlp.up_proj"), h, i),
            (name("mlp.down_proj"), i, h),
        ]
    }

    /// Every op whose output SSF can adapt, in forward order, with its width: per layer
    /// `input_layernorm`, the q/k/v/o projections, `post_attention_layernorm`, gate, up and down;
    /// then `model.norm`.
    pub fn ssf_points(&self) -> Vec<SsfPoint> {
        let mut points = Vec::new();
        for layer in 0..self.num_hidden_layers {
            let [q, k, v, o, gate, up, down] = self.projections(layer);
            let norm = |m: &str| SsfPoint { name: format!("model.layers.{layer}.{m}"), dim: self.hidden_size };
            points.push(norm("input_layernorm"));
            for (name, _, dim) in [q, k, v, o] {
                points.push(SsfPoint { name, dim });
            }
            points.push(norm("post_attention_layernorm"));
            for (name, _, dim) in [gate, up, down] {
                points.push(SsfPoint { name, dim });
            }
        }
        points.push(SsfPoint { name: "model.norm".into(), dim: self.hidden_size });
        points
    }

    /// Every linear layer LoRA can adapt, in forward order, with `(d_in, d_out)`.
    pub fn lora_targets(&self) -> Vec<LinearTarget> {
        (0..self.num_hidden_layers)
            .flat_map(|layer| self.projections(layer))
            .map(|(name, d_in, d_out)| LinearTarget { name, d_in, d_out })
            .collect()
    }

    /// Every tensor the model loads, by HF name, with its shape (`lm_head.weight` only when not
    /// tied).
    pub(crate) fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for layer in 0..self.num_hidden_layers {
            shapes.push((format!("model.layers.{layer}.input_layernorm.weight"), vec![h]));
            shapes.push((format!("model.layers.{layer}.post_attention_layernorm.weight"), vec![h]));
            for (name, d_in, d_out) in self.projections(layer) {
                shapes.push((format!("{name}.weight"), vec![d_out, d_in]));
            }
        }
        shapes.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        shapes
    }
}

/// GGUF's name of an HF tensor name (`model.layers.0.self_attn.q_proj.weight` →
/// `blk.0.attn_q.weight`), as llama.cpp's converter writes them.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let short = match module {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// llama.cpp's row order of a query/key projection with `heads` heads of width `head_dim`: GGUF
/// row `h·hd + 2i + j` is HF row `h·hd + j·hd/2 + i`. Returns, for each HF row, its GGUF row.
pub fn gguf_rope_rows(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = vec![0; heads * head_dim];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
            }
        }
    }
    order
}

/// A frozen weight matrix `[rows, d]`: f32 in memory, or in its quantized GGUF type.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// A plain f32 tensor.
    Dense(Tensor),
    /// A block-quantized tensor (Q4_0, Q4_1, Q8_0, …).
    Quantized(Arc<QTensor>),
}

impl Frozen {
    /// `x · Wᵀ` for `x: [N, d]`; in a backward pass only `x` gets a gradient.
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(w) => fedpool_kernels::frozen_linear(x, w, None)?,
            Self::Quantized(w) => fedpool_kernels::quantized::quantized_linear(x, w)?,
        })
    }

    /// Rows `ids` of the matrix (an embedding lookup), f32 `[len, d]`.
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(w) => w.index_select(ids, 0)?,
            Self::Quantized(w) => w.embedding(ids)?,
        })
    }

    /// Bytes the weight holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Quantized(w) => w.storage_size_in_bytes(),
        }
    }
}

/// How [`LlamaModel::load_gguf`] holds a GGUF file's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufWeights {
    /// In their stored types (4-bit stays 4-bit): the default.
    #[default]
    Quantized,
    /// Dequantized to f32 on load (what transformers does with `gguf_file=`): the reference.
    Dequantized,
}

/// A projection `y = x Wᵀ`, adaptable by LoRA and SSF under its module path.
#[derive(Debug, Clone)]
struct Linear {
    name: String,
    weight: Frozen,
}

/// What one forward pass knows besides the tensors.
struct Pass<'a> {
    hooks: &'a Hooks,
    /// Batch row `b`'s tokens are rows `offsets[b]..offsets[b + 1]`.
    offsets: Vec<usize>,
    /// RoPE's cos and sin at each token's position, `[N, 1, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

impl Pass<'_> {
    /// Applies the SSF hook at `name`, if any.
    fn ssf(&self, y: Tensor, name: &str) -> Result<Tensor> {
        match self.hooks.ssf(name) {
            Some(s) => Ok(fedpool_kernels::ssf::scale_shift_packed(&y, &s.scale, &s.shift, &self.offsets)?),
            None => Ok(y),
        }
    }
}

impl Linear {
    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let mut y = self.weight.linear(x)?;
        if let Some(lora) = pass.hooks.lora(&self.name) {
            y = (y + lora.apply(x)?)?;
        }
        pass.ssf(y, &self.name)
    }
}

/// RMSNorm with its SSF point.
#[derive(Debug, Clone)]
struct RmsNorm {
    name: String,
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let y = fedpool_kernels::norm::rms_norm(x, &self.weight, self.eps)?;
        pass.ssf(y, &self.name)
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A batch being run one segment (embedding, layer, final norm) at a time: what each segment
/// needs besides its input ([`LlamaModel::begin`]).
pub struct Segments<'h> {
    pass: Pass<'h>,
}

impl Segments<'_> {
    /// Batch row `b`'s tokens are rows `offsets[b]..offsets[b + 1]` of the packed states.
    pub fn offsets(&self) -> &[usize] {
        &self.pass.offsets
    }
}

/// One row's cached keys and values per layer (`[T, kv_dim]` each, keys after RoPE).
#[derive(Debug, Clone, Default)]
struct RowCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

/// A frozen Llama decoder. Every weight is a plain or quantized tensor; adapters come in through
/// [`Hooks`]. Cloning shares the weights (reference-counted).
#[derive(Clone)]
pub struct LlamaModel {
    config: LlamaConfig,
    embed: Frozen,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `None` when tied to the embedding.
    lm_head: Option<Frozen>,
    /// RoPE tables `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    ssf_dims: BTreeMap<String, usize>,
    lora_dims: BTreeMap<String, (usize, usize)>,
    device: Device,
}

impl LlamaModel {
    /// Loads a model file or folder: a `.gguf` file (weights kept quantized), or an HF folder
    /// with `config.json` and `model.safetensors`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            return Self::load_gguf(path, GgufWeights::Quantized, device);
        }
        if !path.is_dir() {
            return Err(ModelError::NotFound {
                what: "model (a .gguf file or an HF folder)",
                path: path.to_path_buf(),
            });
        }
        Self::load_safetensors(path.join("config.json"), &[path.join("model.safetensors")], device)
    }

    /// Loads a GGUF file; `weights` says whether the projections stay quantized.
    pub fn load_gguf(path: impl AsRef<Path>, weights: GgufWeights, device: &Device) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&file)?;
        let mut reader = file.reader()?;
        let (hd, heads, kv_heads) = (config.head_dim(), config.num_attention_heads, config.num_key_value_heads);
        let mut get = |hf: &str, shape: &[usize]| -> Result<QTensor> {
            let name = gguf_name(hf).ok_or_else(|| ModelError::MissingTensor {
                name: hf.to_string(),
                files: file.path().display().to_string(),
            })?;
            let tensor = file.tensor(&mut reader, &name, shape, device)?;
            let rope_heads = if hf.ends_with("q_proj.weight") {
                Some(heads)
            } else if hf.ends_with("k_proj.weight") {
                Some(kv_heads)
            } else {
                None
            };
            match rope_heads {
                Some(h) => Ok(fedpool_kernels::quantized::permute_rows(&tensor, &gguf_rope_rows(h, hd))?),
                None => Ok(tensor),
            }
        };
        let mut tensors = BTreeMap::new();
        for (name, shape) in config.tensor_shapes() {
            tensors.insert(name.clone(), get(&name, &shape)?);
        }
        let frozen = |t: QTensor| -> Result<Frozen> {
            let dense = matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            if dense || weights == GgufWeights::Dequantized {
                Ok(Frozen::Dense(t.dequantize(device)?))
            } else {
                Ok(Frozen::Quantized(Arc::new(t)))
            }
        };
        let vector = |t: QTensor| -> Result<Tensor> { Ok(t.dequantize(device)?) };
        Self::assemble(config, tensors, frozen, vector, device)
    }

    /// Loads an HF config file and safetensors files (f32, f16 or bf16; read as f32).
    pub fn load_safetensors(config: impl AsRef<Path>, weights: &[PathBuf], device: &Device) -> Result<Self> {
        let config = LlamaConfig::from_file(config)?;
        let w = Weights::open(weights, device, "model.embed_tokens.weight", "")?;
        let mut tensors = BTreeMap::new();
        for (name, shape) in config.tensor_shapes() {
            tensors.insert(name.clone(), w.get(&shape, &name)?);
        }
        Self::assemble(config, tensors, |t| Ok(Frozen::Dense(t)), Ok, device)
    }

    /// Builds the model from its tensors by HF name.
    fn assemble<T>(
        config: LlamaConfig,
        mut tensors: BTreeMap<String, T>,
        mut matrix: impl FnMut(T) -> Result<Frozen>,
        mut vector: impl FnMut(T) -> Result<Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor { name: name.into(), files: "the model".into() })
        };
        let eps = config.rms_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let prefix = format!("model.layers.{layer}");
            let mut norm = |m: &str| -> Result<RmsNorm> {
                let name = format!("{prefix}.{m}");
                Ok(RmsNorm { weight: vector(take(&format!("{name}.weight"))?)?, name, eps })
            };
            let (input_norm, post_norm) = (norm("input_layernorm")?, norm("post_attention_layernorm")?);
            let mut linear = |m: &str| -> Result<Linear> {
                let name = format!("{prefix}.{m}");
                Ok(Linear { weight: matrix(take(&format!("{name}.weight"))?)?, name })
            };
            layers.push(Layer {
                input_norm,
                q: linear("self_attn.q_proj")?,
                k: linear("self_attn.k_proj")?,
                v: linear("self_attn.v_proj")?,
                o: linear("self_attn.o_proj")?,
                post_norm,
                gate: linear("mlp.gate_proj")?,
                up: linear("mlp.up_proj")?,
                down: linear("mlp.down_proj")?,
            });
        }
        let norm = RmsNorm { name: "model.norm".into(), weight: vector(take("model.norm.weight")?)?, eps };
        let embed = matrix(take("model.embed_tokens.weight")?)?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(matrix(take("lm_head.weight")?)?) };
        let (cos, sin) = rope_tables(&config, device)?;
        let ssf_dims = config.ssf_points().into_iter().map(|p| (p.name, p.dim)).collect();
        let lora_dims = config.lora_targets().into_iter().map(|t| (t.name, (t.d_in, t.d_out))).collect();
        Ok(Self { config, embed, layers, norm, lm_head, cos, sin, ssf_dims, lora_dims, device: device.clone() })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes the frozen weights hold in memory.
    pub fn weight_bytes(&self) -> usize {
        let vector = |t: &Tensor| t.elem_count() * 4;
        let mut total = self.embed.bytes() + vector(&self.norm.weight);
        total += self.lm_head.as_ref().map_or(0, Frozen::bytes);
        for l in &self.layers {
            total += vector(&l.input_norm.weight) + vector(&l.post_norm.weight);
            total += [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().map(|p| p.weight.bytes()).sum::<usize>();
        }
        total
    }

    /// The LM head's weight (the embedding when tied).
    fn head(&self) -> &Frozen {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final hidden states (after `model.norm`) of every token of `rows` (token ids, each row
    /// at least one token), packed `[N, hidden]`, with the rows' offsets.
    pub fn hidden(&self, rows: &[Vec<u32>], hooks: &Hooks) -> Result<(Tensor, Vec<usize>)> {
        let (x, offsets, _) = self.run(rows, hooks, false)?;
        Ok((x, offsets))
    }

    /// Logits `[M, vocab]` of the LM head on hidden states `[M, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head().linear(hidden)
    }

    /// Prepares `rows` for a pass run one segment at a time (gradient checkpointing): the token
    /// embeddings `[N, hidden]` (never tracked: the embedding is frozen) and the pass, for
    /// [`layer_forward`](Self::layer_forward) and [`final_norm`](Self::final_norm).
    pub fn begin<'h>(&self, rows: &[Vec<u32>], hooks: &'h Hooks) -> Result<(Tensor, Segments<'h>)> {
        let (ids, offsets, positions) = self.check_rows(rows)?;
        hooks.check(&self.ssf_dims, &self.lora_dims, rows.len())?;
        if hooks.lora_hooks().any(|(_, l)| l.per_row()) {
            return Err(ModelError::Input("per-row LoRA factors are not supported by the decoder yet".into()));
        }
        let pass = self.pass(hooks, offsets, &positions)?;
        Ok((self.embed.rows(&ids)?, Segments { pass }))
    }

    /// Layer `index` of a segmented pass: its output for input `x`.
    pub fn layer_forward(&self, index: usize, x: &Tensor, segments: &Segments) -> Result<Tensor> {
        let layer = self.layers.get(index).ok_or_else(|| ModelError::Input(format!("no layer {index}")))?;
        Ok(self.layer(layer, x, &segments.pass)?.0)
    }

    /// The final norm of a segmented pass: the last hidden states.
    pub fn final_norm(&self, x: &Tensor, segments: &Segments) -> Result<Tensor> {
        self.norm.forward(x, &segments.pass)
    }

    /// True when `hooks` adapt anything in layer `index` (below the lowest such layer a backward
    /// pass has nothing to reach).
    pub fn layer_adapted(&self, index: usize, hooks: &Hooks) -> bool {
        let prefix = format!("model.layers.{index}.");
        hooks.ssf_hooks().any(|(n, _)| n.starts_with(&prefix))
            || hooks.lora_hooks().any(|(n, _)| n.starts_with(&prefix))
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs the decoder over packed rows; with `cache`, also each row's keys and values per layer.
    fn run(&self, rows: &[Vec<u32>], hooks: &Hooks, cache: bool) -> Result<(Tensor, Vec<usize>, Vec<RowCache>)> {
        let (ids, offsets, positions) = self.check_rows(rows)?;
        hooks.check(&self.ssf_dims, &self.lora_dims, rows.len())?;
        if hooks.lora_hooks().any(|(_, l)| l.per_row()) {
            return Err(ModelError::Input("per-row LoRA factors are not supported by the decoder yet".into()));
        }
        let pass = self.pass(hooks, offsets, &positions)?;
        let mut x = self.embed.rows(&ids)?;
        let mut caches = vec![RowCache::default(); if cache { rows.len() } else { 0 }];
        for layer in &self.layers {
            let (next, k, v) = self.layer(layer, &x, &pass)?;
            x = next;
            for (b, c) in caches.iter_mut().enumerate() {
                let (start, len) = (pass.offsets[b], pass.offsets[b + 1] - pass.offsets[b]);
                c.keys.push(k.narrow(0, start, len)?);
                c.values.push(v.narrow(0, start, len)?);
            }
        }
        let x = self.norm.forward(&x, &pass)?;
        Ok((x, pass.offsets, caches))
    }

    /// A pass over tokens at `positions` with the given row offsets.
    fn pass<'h>(&self, hooks: &'h Hooks, offsets: Vec<usize>, positions: &[u32]) -> Result<Pass<'h>> {
        let index = Tensor::from_slice(positions, positions.len(), &self.device)?;
        let cos = self.cos.index_select(&index, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(&index, 0)?.unsqueeze(1)?;
        Ok(Pass { hooks, offsets, cos, sin })
    }

    /// One layer over packed tokens: the output, and the keys (after RoPE) and values.
    fn layer(&self, l: &Layer, x: &Tensor, pass: &Pass) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.config;
        let h = l.input_norm.forward(x, pass)?;
        let q = rope(&l.q.forward(&h, pass)?, cfg.num_attention_heads, pass)?;
        let k = rope(&l.k.forward(&h, pass)?, cfg.num_key_value_heads, pass)?;
        let v = l.v.forward(&h, pass)?.contiguous()?;
        let ctx = fedpool_kernels::attention::attention_packed(&q, &k, &v, &pass.offsets, &self.attention_shape())?;
        let x = (x + l.o.forward(&ctx, pass)?)?;
        let h = l.post_norm.forward(&x, pass)?;
        let inner = fedpool_kernels::activation::silu_mul(&l.gate.forward(&h, pass)?, &l.up.forward(&h, pass)?)?;
        let x = (&x + l.down.forward(&inner, pass)?)?;
        Ok((x, k, v))
    }

    fn attention_shape(&self) -> AttentionShape {
        let cfg = &self.config;
        AttentionShape {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            causal: true,
            scale: 1.0 / (cfg.head_dim() as f32).sqrt(),
        }
    }

    /// Checks the rows (non-empty, ids in the vocabulary, within the context); returns the packed
    /// ids, the offsets and each token's position.
    fn check_rows(&self, rows: &[Vec<u32>]) -> Result<(Tensor, Vec<usize>, Vec<u32>)> {
        if rows.is_empty() {
            return Err(ModelError::Input("no sequences".into()));
        }
        let mut offsets = vec![0];
        let (mut ids, mut positions) = (Vec::new(), Vec::new());
        for (b, row) in rows.iter().enumerate() {
            if row.is_empty() || row.len() > self.config.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "sequence {b} has {} tokens; the model takes 1 to {}",
                    row.len(),
                    self.config.max_position_embeddings
                )));
            }
            if let Some(&bad) = row.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(ModelError::Input(format!(
                    "sequence {b}: token id {bad} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            ids.extend_from_slice(row);
            positions.extend(0..row.len() as u32);
            offsets.push(ids.len());
        }
        let n = ids.len();
        Ok((Tensor::from_vec(ids, n, &self.device)?, offsets, positions))
    }

    /// Greedy decoding with a KV cache: up to `max_new` tokens after each prompt, a row stopping
    /// after it emits any of `stop` (which is kept, as transformers' `generate` does) or reaches
    /// the context length.
    pub fn generate(&self, prompts: &[Vec<u32>], hooks: &Hooks, max_new: usize, stop: &[u32]) -> Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); prompts.len()];
        if max_new == 0 {
            return Ok(out);
        }
        let (x, offsets, mut caches) = self.run(prompts, hooks, true)?;
        let last: Vec<u32> = offsets[1..].iter().map(|&o| o as u32 - 1).collect();
        let last = x.index_select(&Tensor::from_vec(last, prompts.len(), &self.device)?, 0)?;
        let mut next = argmax_rows(&self.logits(&last)?)?;
        let mut live: Vec<usize> = (0..prompts.len()).collect();
        let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        loop {
            for (&b, &t) in live.iter().zip(&next) {
                out[b].push(t);
            }
            let keep: Vec<bool> = live
                .iter()
                .zip(&next)
                .map(|(&b, t)| {
                    !stop.contains(t) && out[b].len() < max_new && lengths[b] < self.config.max_position_embeddings
                })
                .collect();
            let (rows, tokens): (Vec<usize>, Vec<u32>) =
                live.iter().zip(&next).zip(&keep).filter(|(_, &k)| k).map(|((&b, &t), _)| (b, t)).unzip();
            if rows.is_empty() {
                return Ok(out);
            }
            let hidden = self.decode_step(&rows, &tokens, &mut caches, &lengths, hooks)?;
            for &b in &rows {
                lengths[b] += 1;
            }
            next = argmax_rows(&self.logits(&hidden)?)?;
            live = rows;
        }
    }

    /// One token for each of `rows` (`tokens[i]` at position `lengths[rows[i]]`), attending over
    /// the row's cache, which grows by it. Returns the final hidden states `[rows, hidden]`.
    fn decode_step(
        &self,
        rows: &[usize],
        tokens: &[u32],
        caches: &mut [RowCache],
        lengths: &[usize],
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let n = rows.len();
        // Hooks with one row per batch row take this step's rows only.
        let hooks = hooks_for_rows(hooks, rows, caches.len())?;
        let positions: Vec<u32> = rows.iter().map(|&b| lengths[b] as u32).collect();
        let pass = self.pass(&hooks, (0..=n).collect(), &positions)?;
        let mut x = self.embed.rows(&Tensor::from_slice(tokens, n, &self.device)?)?;
        let (hd, groups) = (cfg.head_dim(), cfg.num_attention_heads / cfg.num_key_value_heads);
        let scale = 1.0 / (hd as f64).sqrt();
        for (index, l) in self.layers.iter().enumerate() {
            let h = l.input_norm.forward(&x, &pass)?;
            let q = rope(&l.q.forward(&h, &pass)?, cfg.num_attention_heads, &pass)?;
            let k = rope(&l.k.forward(&h, &pass)?, cfg.num_key_value_heads, &pass)?;
            let v = l.v.forward(&h, &pass)?;
            let mut contexts = Vec::with_capacity(n);
            for (i, &b) in rows.iter().enumerate() {
                let cache = &mut caches[b];
                cache.keys[index] = Tensor::cat(&[&cache.keys[index], &k.narrow(0, i, 1)?], 0)?;
                cache.values[index] = Tensor::cat(&[&cache.values[index], &v.narrow(0, i, 1)?], 0)?;
                let t = cache.keys[index].dim(0)?;
                let heads = |m: &Tensor| -> Result<Tensor> {
                    Ok(m.reshape((t, cfg.num_key_value_heads, hd))?.transpose(0, 1)?.contiguous()?)
                };
                let (keys, values) = (heads(&cache.keys[index])?, heads(&cache.values[index])?);
                let query = q.narrow(0, i, 1)?.reshape((cfg.num_key_value_heads, groups, hd))?;
                let scores = (query.matmul(&keys.t()?)? * scale)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                contexts.push(probs.matmul(&values)?.reshape((1, cfg.hidden_size))?);
            }
            let ctx = Tensor::cat(&contexts, 0)?;
            x = (x + l.o.forward(&ctx, &pass)?)?;
            let h = l.post_norm.forward(&x, &pass)?;
            let inner = fedpool_kernels::activation::silu_mul(&l.gate.forward(&h, &pass)?, &l.up.forward(&h, &pass)?)?;
            x = (&x + l.down.forward(&inner, &pass)?)?;
        }
        self.norm.forward(&x, &pass)
    }
}

/// `hooks` restricted to batch rows `rows` of `batch`: SSF rows selected where given per row.
fn hooks_for_rows(hooks: &Hooks, rows: &[usize], batch: usize) -> Result<Hooks> {
    let mut out = hooks.clone();
    let index = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &Device::Cpu)?;
    for (name, ssf) in hooks.ssf_hooks() {
        if ssf.scale.dim(0)? == batch && batch > 1 {
            let index = index.to_device(ssf.scale.device())?;
            let pick = |t: &Tensor| t.index_select(&index, 0);
            out.set_ssf(name, super::Ssf::new(pick(&ssf.scale)?, pick(&ssf.shift)?));
        }
    }
    Ok(out)
}

/// Each row's arg-max of `logits: [M, vocab]`.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// RoPE's tables: `cos`, `sin` of `position · θ^(−2i/hd)`, `[max_positions, hd / 2]`.
fn rope_tables(config: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = config.head_dim();
    let inv_freq: Vec<f32> =
        (0..hd / 2).map(|i| (1.0 / config.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
    let positions = config.max_position_embeddings;
    let mut angles = Vec::with_capacity(positions * hd / 2);
    for p in 0..positions {
        angles.extend(inv_freq.iter().map(|f| p as f32 * f));
    }
    let angles = Tensor::from_vec(angles, (positions, hd / 2), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// HF's rotate-half RoPE on `x: [N, heads·hd]` at the pass's positions: per head, the first half
/// `x1` and second half `x2` become `x1·cos − x2·sin` and `x2·cos + x1·sin`.
fn rope(x: &Tensor, heads: usize, pass: &Pass) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let hd = width / heads;
    let x = x.reshape((n, heads, hd))?;
    let (x1, x2) = (x.narrow(2, 0, hd / 2)?, x.narrow(2, hd / 2, hd / 2)?);
    let first = (x1.broadcast_mul(&pass.cos)? - x2.broadcast_mul(&pass.sin)?)?;
    let second = (x2.broadcast_mul(&pass.cos)? + x1.broadcast_mul(&pass.sin)?)?;
    Ok(Tensor::cat(&[first, second], 2)?.reshape((n, width))?)
}

/// The mean causal-LM loss of each row on itself (transformers' `labels = input_ids`): mean over
/// positions 1.. of `−log p(token | prefix)`, for rows of at least two tokens.
pub fn mean_nll(model: &LlamaModel, rows: &[Vec<u32>], hooks: &Hooks) -> Result<Vec<f32>> {
    let (x, offsets) = model.hidden(rows, hooks)?;
    let mut out = Vec::with_capacity(rows.len());
    for (b, row) in rows.iter().enumerate() {
        if row.len() < 2 {
            return Err(ModelError::Input(format!("sequence {b} has fewer than two tokens: no loss")));
        }
        let states = x.narrow(0, offsets[b], row.len() - 1)?;
        let targets = Tensor::from_slice(&row[1..], row.len() - 1, model.device())?;
        let loss = candle_nn::loss::cross_entropy(&model.logits(&states)?, &targets)?;
        out.push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::model::{write_random_gguf, write_random_llama, Lora};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// The tiny model as HF files and as GGUF files of two types, all from the same values.
    struct Tiny {
        _dir: tempfile::TempDir,
        hf: LlamaModel,
        gguf_f32: LlamaModel,
        gguf_q8: LlamaModel,
        gguf_path: PathBuf,
    }

    fn tiny() -> Tiny {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LlamaConfig { vocab_size: 128, ..LlamaConfig::tiny() };
        write_random_llama(dir.path().join("hf"), &cfg, 7).unwrap();
        write_random_gguf(dir.path().join("f32.gguf"), &cfg, GgmlDType::F32, 7).unwrap();
        let gguf_path = dir.path().join("q8.gguf");
        write_random_gguf(&gguf_path, &cfg, GgmlDType::Q8_0, 7).unwrap();
        let dev = Device::Cpu;
        Tiny {
            hf: LlamaModel::load(dir.path().join("hf"), &dev).unwrap(),
            gguf_f32: LlamaModel::load(dir.path().join("f32.gguf"), &dev).unwrap(),
            gguf_q8: LlamaModel::load(&gguf_path, &dev).unwrap(),
            gguf_path,
            _dir: dir,
        }
    }

    fn rows() -> Vec<Vec<u32>> {
        vec![vec![5, 17, 33, 2, 90, 64, 11], vec![40, 3, 8]]
    }

    #[test]
    fn gguf_and_hf_files_are_the_same_model() {
        let t = tiny();
        // GGUF stores ε as an f32.
        let eps = t.gguf_f32.config().rms_norm_eps;
        assert!((eps - 1e-5).abs() < 1e-12);
        assert_eq!(&LlamaConfig { rms_norm_eps: 1e-5, ..t.gguf_f32.config().clone() }, t.hf.config());
        let hooks = Hooks::new();
        let (a, offsets) = t.hf.hidden(&rows(), &hooks).unwrap();
        let (b, _) = t.gguf_f32.hidden(&rows(), &hooks).unwrap();
        assert_eq!(offsets, vec![0, 7, 10]);
        // GGUF's interleaved query/key rows were put back in HF's order: the same function.
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
        let (c, _) = t.gguf_q8.hidden(&rows(), &hooks).unwrap();
        let relative = max_diff(&a, &c) / max_abs(&a);
        assert!(relative > 0.0 && relative < 0.05, "Q8_0 vs f32: {relative}");
        assert!(matches!(t.gguf_q8.embed, Frozen::Quantized(_)));
        assert!(t.gguf_q8.weight_bytes() * 3 < t.hf.weight_bytes(), "Q8_0 holds about a quarter of f32's bytes");
        let dequantized = LlamaModel::load_gguf(&t.gguf_path, GgufWeights::Dequantized, &Device::Cpu).unwrap();
        assert!(matches!(dequantized.embed, Frozen::Dense(_)));
    }

    #[test]
    fn bf16_safetensors_load_as_f32() {
        let t = tiny();
        let dir = tempfile::tempdir().unwrap();
        let cfg = t.hf.config().clone();
        // The f32 files' tensors, stored in bf16.
        let f32_file =
            candle_core::safetensors::load(t._dir.path().join("hf/model.safetensors"), &Device::Cpu).unwrap();
        let tensors: std::collections::HashMap<String, Tensor> =
            f32_file.into_iter().map(|(name, w)| (name, w.to_dtype(DType::BF16).unwrap())).collect();
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
        std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        let bf16 = LlamaModel::load(dir.path(), &Device::Cpu).unwrap();
        let (a, _) = t.hf.hidden(&rows(), &Hooks::new()).unwrap();
        let (b, _) = bf16.hidden(&rows(), &Hooks::new()).unwrap();
        // bf16 keeps 8 bits of mantissa: the same model to about 1%.
        let relative = max_diff(&a, &b) / max_abs(&a);
        assert!(relative < 0.05, "{relative}");
        assert!(matches!(bf16.embed, Frozen::Dense(ref w) if w.dtype() == DType::F32));
    }

    #[test]
    fn attention_is_causal_and_rows_are_independent() {
        let t = tiny();
        let hooks = Hooks::new();
        let long = vec![5u32, 17, 33, 2, 90];
        let (full, _) = t.gguf_q8.hidden(&[long.clone(), vec![9, 9]], &hooks).unwrap();
        let (prefix, _) = t.gguf_q8.hidden(&[long[..3].to_vec()], &hooks).unwrap();
        // A token's state depends on its prefix only (and not on the other row of the batch).
        assert!(max_diff(&full.narrow(0, 0, 3).unwrap(), &prefix) < 1e-5);
    }

    #[test]
    fn generation_with_the_cache_is_greedy_decoding_by_full_passes() {
        let t = tiny();
        let hooks = Hooks::new();
        let prompts = vec![vec![5u32, 17, 33], vec![40, 3, 8, 9, 1, 77]];
        let generated = t.gguf_q8.generate(&prompts, &hooks, 6, &[]).unwrap();
        for (prompt, out) in prompts.iter().zip(&generated) {
            assert_eq!(out.len(), 6);
            let mut seq = prompt.clone();
            for &token in out {
                let (x, _) = t.gguf_q8.hidden(std::slice::from_ref(&seq), &hooks).unwrap();
                let logits = t.gguf_q8.logits(&x.narrow(0, seq.len() - 1, 1).unwrap()).unwrap();
                assert_eq!(argmax_rows(&logits).unwrap()[0], token, "after {seq:?}");
                seq.push(token);
            }
        }
        // A stop token ends a row (and is kept).
        let stop = generated[0][1];
        let stopped = t.gguf_q8.generate(&prompts[..1], &hooks, 6, &[stop]).unwrap();
        assert_eq!(stopped[0].last(), Some(&stop));
        assert!(stopped[0].len() <= 2);
    }

    #[test]
    fn lora_on_a_quantized_base_gets_gradients_and_zero_b_is_the_base() {
        let t = tiny();
        let m = &t.gguf_q8;
        let (h, kv, r) = (m.config().hidden_size, m.config().kv_dim(), 4);
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.1, (r, h), &Device::Cpu).unwrap()).unwrap();
        let b = Var::zeros((kv, r), DType::F32, &Device::Cpu).unwrap();
        let mut hooks = Hooks::new();
        let ones = Tensor::ones(r, DType::F32, &Device::Cpu).unwrap();
        hooks.set_lora(
            "model.layers.1.self_attn.v_proj",
            Lora::new(b.as_tensor().clone(), ones, a.as_tensor().clone(), 2.0),
        );
        let (with, _) = m.hidden(&rows(), &hooks).unwrap();
        let (base, _) = m.hidden(&rows(), &Hooks::new()).unwrap();
        assert!(max_diff(&with, &base) < 1e-6);
        let grads = m.logits(&with).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gb = grads.get(b.as_tensor()).expect("B gets a gradient through the quantized layers");
        assert!(max_abs(gb) > 0.0);
        let mut bad = Hooks::new();
        let ssf = crate::model::Ssf::identity(h, &Device::Cpu).unwrap();
        bad.set_ssf("model.layers.9.input_layernorm", ssf);
        let err = m.hidden(&rows(), &bad).unwrap_err().to_string();
        assert!(err.contains("model.layers.9.input_layernorm"), "{err}");
    }

    #[test]
    fn bad_sequences_are_named() {
        let t = tiny();
        let hooks = Hooks::new();
        let err = t.hf.hidden(&[vec![1, 2], vec![]], &hooks).unwrap_err().to_string();
        assert!(err.contains("sequence 1") && err.contains("0 tokens"), "{err}");
        let err = t.hf.hidden(&[vec![1, 500]], &hooks).unwrap_err().to_string();
        assert!(err.contains("token id 500"), "{err}");
        assert!(t.hf.hidden(&[], &hooks).is_err());
    }

    #[test]
    fn the_gguf_tokenizer_matches_control_tokens_whole() {
        let t = tiny();
        let file = GgufFile::open(&t.gguf_path).unwrap();
        let tok = file.tokenizer().unwrap();
        let ids = tok.encode("<|im_start|>user\nthe 42<|im_end|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids[0], 1);
        assert_eq!(*ids.last().unwrap(), 2);
        // "the": the merge "h e"; " 42": digits split one by one, the space its own token.
        let text = tok.decode(&ids, false).unwrap();
        assert_eq!(text, "<|im_start|>user\nthe 42<|im_end|>");
        let he = tok.token_to_id("he").unwrap();
        assert!(ids.contains(&he), "{ids:?}");
        assert!(ids.contains(&tok.token_to_id("4").unwrap()) && ids.contains(&tok.token_to_id("2").unwrap()));
    }
}
