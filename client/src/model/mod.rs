//! Frozen backbones with explicit adapter hooks.
//!
//! A backbone is loaded from Hugging Face files (`config.json` + `model.safetensors`) by the HF
//! tensor names (a BERT encoder, [`BertEncoder`]; a Llama decoder, [`LlamaModel`], also from a
//! GGUF file with its base kept quantized), and every weight stays a plain [`candle_core::Tensor`] (never a `Var`), so the
//! backbone is frozen by construction. Adapters are not stored in the model: each forward pass
//! takes them as an argument ([`Hooks`]), keyed by the HF module path of the op they adapt
//! (`encoder.layer.3.attention.self.query`). A hook name the model does not have is an error.
//!
//! Every op on the forward path has a backward: by default the fused kernels of `fedpool_kernels`
//! (LayerNorm, GELU, SSF, attention, each with its own backward); with [`Kernels::Composed`]
//! LayerNorm written from basic ops and `candle_nn::ops::softmax`. Never candle's own fused
//! `layer_norm` / `softmax_last_dim`: they silently drop gradients (docs/design.md, "candle pitfalls").

mod bert;
mod dropout;
mod gguf;
mod hooks;
mod llama;
mod random;
mod weights;

use std::path::PathBuf;

pub use bert::{mean_pool, BertConfig, BertEncoder, HiddenAct, Kernels, PositionEmbeddingType};
pub use dropout::{Dropout, DropoutSite};
pub use gguf::GgufFile;
pub use hooks::{Hooks, LinearTarget, Lora, Ssf, SsfPoint};
pub use llama::{gguf_name, gguf_rope_rows, mean_nll, Frozen, GgufWeights, LlamaConfig, LlamaModel, Segments};
pub use random::{write_random_gguf, write_random_llama, write_random_model};

/// The points of a backbone an adapter pool can attach to, and what PEFT calls its modules.
pub trait AdapterPoints {
    /// Every op whose output SSF can adapt, in forward order.
    fn ssf_points(&self) -> Vec<SsfPoint>;
    /// Every linear layer LoRA can adapt, in forward order.
    fn lora_targets(&self) -> Vec<LinearTarget>;
    /// Width of the hidden states (a head's input, FedIns' query).
    fn hidden_size(&self) -> usize;
    /// True for an encoder under a classification head (PEFT's `SEQ_CLS`), false for a decoder
    /// (`CAUSAL_LM`).
    fn has_classifier(&self) -> bool;
    /// The base model's prefix under PEFT's `base_model.model.` (`bert.`; empty for a decoder).
    fn peft_module_prefix(&self) -> &'static str;
}

impl AdapterPoints for BertConfig {
    fn ssf_points(&self) -> Vec<SsfPoint> {
        BertConfig::ssf_points(self)
    }
    fn lora_targets(&self) -> Vec<LinearTarget> {
        BertConfig::lora_targets(self)
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn has_classifier(&self) -> bool {
        true
    }
    fn peft_module_prefix(&self) -> &'static str {
        "bert."
    }
}

impl AdapterPoints for LlamaConfig {
    fn ssf_points(&self) -> Vec<SsfPoint> {
        LlamaConfig::ssf_points(self)
    }
    fn lora_targets(&self) -> Vec<LinearTarget> {
        LlamaConfig::lora_targets(self)
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn has_classifier(&self) -> bool {
        false
    }
    fn peft_module_prefix(&self) -> &'static str {
        ""
    }
}

/// What went wrong while loading a backbone or running it with adapter hooks.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A folder or file that must exist does not.
    #[error("{what} {} not found", path.display())]
    NotFound {
        /// What was looked for ("model folder", "config file", "weights file").
        what: &'static str,
        /// The path that was looked for.
        path: PathBuf,
    },
    /// A file exists but could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not a valid or supported configuration.
    #[error("invalid model config {}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A weights file is not a valid safetensors file.
    #[error("cannot read weights {files}: {message}")]
    Weights {
        /// The weights files.
        files: String,
        /// What went wrong.
        message: String,
    },
    /// A tensor the model needs is not in the weights files.
    #[error("tensor {name:?} is missing from {files}")]
    MissingTensor {
        /// The tensor's name as it would appear in the file.
        name: String,
        /// The weights files searched.
        files: String,
    },
    /// A tensor in the weights files has a shape other than the config implies.
    #[error("tensor {name:?} has shape {got:?}, expected {expected:?} (from {files})")]
    TensorShape {
        /// The tensor's name in the file.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
        /// The weights files.
        files: String,
    },
    /// An adapter hook names a point this model does not have.
    #[error("unknown {kind} point {name:?}: not a module of this model (see BertConfig::{list}())")]
    UnknownHook {
        /// "SSF" or "LoRA".
        kind: &'static str,
        /// The name given.
        name: String,
        /// The config method that lists the valid names.
        list: &'static str,
    },
    /// An adapter hook's tensors do not fit the point it adapts or the batch.
    #[error("adapter {name:?}: {message}")]
    HookShape {
        /// The hook point.
        name: String,
        /// What does not fit.
        message: String,
    },
    /// The model inputs (token ids, attention mask) are malformed.
    #[error("bad model input: {0}")]
    Input(String),
    /// An error from candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Reads an HF `config.json` as `T` and checks it with `check` (its message names the field).
fn read_config<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    check: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    if !path.is_file() {
        return Err(ModelError::NotFound { what: "config file", path: path.to_path_buf() });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let config: T = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { path: path.to_path_buf(), message: e.to_string() })?;
    check(&config).map_err(|message| ModelError::Config { path: path.to_path_buf(), message })?;
    Ok(config)
}
