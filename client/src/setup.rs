//! A client's local setup, in one place: the frozen backbone (model and fingerprint), its
//! tokenizer and padding id, examples encoded for training, and the pool spec of the model.
//! `fedpool-client train` and `eval`, the daemon ([`crate::session::local`]) and the simulator's
//! population all start here, so that the three read text and name a backbone identically.

use std::path::{Path, PathBuf};

use fedpool_common::adapter::PoolSpec;
use fedpool_common::BackboneFingerprint;

use crate::data::{assets_dir, Example};
use crate::device::{self, DeviceChoice, DeviceError};
use crate::model::{BertEncoder, ModelError};
use crate::spec::{pool_spec, AdapterChoice, AdapterOptions, OptionsError};
use crate::tokenize::TextTokenizer;
use crate::train::{encode_examples, tokenizer_for_training, Encoded, TrainError};

/// Why a client's setup failed; each names the folder or the step.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The model folder does not exist.
    #[error("model folder {} not found (scripts/fetch-assets.sh puts MiniLM in $FEDPOOL_ASSETS/minilm)", .0.display())]
    ModelNotFound(PathBuf),
    /// The device cannot be used.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The model's weights or config could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The backbone's files could not be read for its fingerprint.
    #[error("fingerprinting the backbone in {}: {source}", dir.display())]
    Fingerprint {
        /// The model folder.
        dir: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer could not be loaded, or a text not encoded.
    #[error(transparent)]
    Tokenize(#[from] TrainError),
    /// The adapter options do not fit the model.
    #[error(transparent)]
    Spec(#[from] OptionsError),
}

/// The frozen backbone and what reads text for it.
pub struct Backbone {
    /// The model folder it was loaded from.
    pub dir: PathBuf,
    /// The encoder, on its device.
    pub model: BertEncoder,
    /// SHA-256 of `config.json` and `model.safetensors` (what a client enrolls with and a
    /// checkpoint names).
    pub fingerprint: BackboneFingerprint,
    /// The tokenizer, truncating to the training's `max_len` and padding to the longest row.
    pub tokenizer: TextTokenizer,
    /// The tokenizer's padding id.
    pub pad_id: u32,
    /// The device, in words (for the log).
    pub device: String,
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone").field("dir", &self.dir).field("device", &self.device).finish_non_exhaustive()
    }
}

impl Backbone {
    /// Loads the model in `dir` on `device`, fingerprints it, and opens its `tokenizer.json` for
    /// rows of at most `max_len` tokens.
    pub fn load(dir: &Path, device: DeviceChoice, max_len: usize) -> Result<Self, SetupError> {
        if !dir.is_dir() {
            return Err(SetupError::ModelNotFound(dir.to_path_buf()));
        }
        let (opened, said) = device::open(device)?;
        let model = BertEncoder::load(dir, &opened)?;
        let fingerprint = fingerprint(dir)?;
        let tokenizer = tokenizer_for_training(&dir.join("tokenizer.json"), max_len)?;
        let pad_id = tokenizer.inner().get_padding().map_or(0, |p| p.pad_id);
        Ok(Self { dir: dir.to_path_buf(), model, fingerprint, tokenizer, pad_id, device: said })
    }

    /// Encodes examples for training or evaluation (ids, token ids, labels), in their order.
    pub fn encode(&self, examples: &[Example]) -> Result<Vec<Encoded>, SetupError> {
        Ok(encode_examples(&self.tokenizer, examples.iter().map(|e| (e.id, e.text.as_str(), e.label)))?)
    }

    /// The pool layout of `options` on this model, with a head of `num_labels` classes.
    pub fn pool_spec(&self, options: &AdapterOptions, num_labels: usize) -> Result<PoolSpec, SetupError> {
        Ok(pool_spec(self.model.config(), options, num_labels)?)
    }
}

/// The backbone fingerprint of the model folder `dir`.
pub fn fingerprint(dir: &Path) -> Result<BackboneFingerprint, SetupError> {
    BackboneFingerprint::of_model_dir(dir).map_err(|source| SetupError::Fingerprint { dir: dir.to_path_buf(), source })
}

/// The default model folder: `$FEDPOOL_ASSETS/minilm`, else `./assets/minilm` (via
/// [`assets_dir`]).
pub fn default_model_dir() -> PathBuf {
    assets_dir().join("minilm")
}

/// The default decoder: `$FEDPOOL_ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, else under
/// `./assets` (via [`assets_dir`]).
pub fn default_decoder_path() -> PathBuf {
    assets_dir().join("smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The learning rate of an adapter kind when none is given (`fedpool-client train`, the daemon's
/// `[train]`, the simulator's `[train]`): the one place defaults are set, from the sweep in
/// `docs/issue14/defaults.md` (federated rounds of about one local epoch: standard LoRA at 5e-3
/// ended 2.9 points above 5e-4 on VADER and 16 above it on TREC, level with 1e-2 there; SSF's
/// 5e-3 ended level with 2e-3 and got there sooner).
pub fn default_lr(adapter: AdapterChoice) -> f64 {
    match adapter {
        AdapterChoice::SsfPool | AdapterChoice::Ssf | AdapterChoice::Lora => 5e-3,
        AdapterChoice::AdaLora => 2e-3,
        AdapterChoice::LinearProbe => 1e-2,
    }
}
