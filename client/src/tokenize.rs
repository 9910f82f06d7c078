//! Text to token ids: a thin wrapper over an HF `tokenizer.json` (the `tokenizers` crate) with
//! truncation and padding set explicitly, whatever the file says.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{PaddingStrategy, Tokenizer, TruncationParams};

/// What went wrong while loading a tokenizer or encoding text; names the tokenizer file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The tokenizer file does not exist.
    #[error("tokenizer file {} not found", path.display())]
    NotFound {
        /// The path looked for.
        path: PathBuf,
    },
    /// The tokenizer file could not be read or set up.
    #[error("cannot load tokenizer {}: {message}", path.display())]
    Load {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Encoding a batch failed.
    #[error("tokenizer {}: cannot encode text: {message}", path.display())]
    Encode {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Building tensors from the ids failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// To the longest sequence of the batch (a batch of one is not padded).
    Longest,
    /// Every sequence to exactly the maximum length.
    ToMaxLength,
}

/// A batch of token ids and attention masks, row-major `[batch, len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Token ids, `batch * len` values.
    pub ids: Vec<u32>,
    /// 1 for a token, 0 for padding, `batch * len` values.
    pub mask: Vec<u32>,
    /// Number of sequences.
    pub batch: usize,
    /// Length of every (padded) sequence.
    pub len: usize,
}

impl TokenBatch {
    /// The ids of row `i` (padding included).
    pub fn row_ids(&self, i: usize) -> &[u32] {
        &self.ids[i * self.len..(i + 1) * self.len]
    }

    /// The ids and the mask as `[batch, len]` u32 tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor), TokenizeError> {
        let shape = (self.batch, self.len);
        Ok((Tensor::from_slice(&self.ids, shape, device)?, Tensor::from_slice(&self.mask, shape, device)?))
    }
}

/// A tokenizer with fixed truncation and padding.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    max_len: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; sequences are truncated to `max_len` tokens (special tokens
    /// included) and padded as `padding` says. The file's own truncation and padding are replaced;
    /// its pad token is kept.
    pub fn from_file(path: impl AsRef<Path>, max_len: usize, padding: Padding) -> Result<Self, TokenizeError> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(TokenizeError::NotFound { path });
        }
        let load_error = |message: String| TokenizeError::Load { path: path.clone(), message };
        let mut inner = Tokenizer::from_file(&path).map_err(|e| load_error(e.to_string()))?;
        let truncation = TruncationParams { max_length: max_len, ..Default::default() };
        inner.with_truncation(Some(truncation)).map_err(|e| load_error(e.to_string()))?;
        let mut pad = inner.get_padding().cloned().unwrap_or_default();
        pad.strategy = match padding {
            Padding::Longest => PaddingStrategy::BatchLongest,
            Padding::ToMaxLength => PaddingStrategy::Fixed(max_len),
        };
        inner.with_padding(Some(pad));
        Ok(Self { inner, path, max_len })
    }

    /// The truncation length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Encodes `texts` with special tokens (`[CLS] … [SEP]` for BERT), truncated and padded.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch, TokenizeError> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| TokenizeError::Encode { path: self.path.clone(), message: e.to_string() })?;
        let len = encodings.first().map_or(0, |e| e.len());
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(encodings.len() * len),
            mask: Vec::with_capacity(encodings.len() * len),
            batch: encodings.len(),
            len,
        };
        for encoding in &encodings {
            if encoding.len() != len {
                return Err(TokenizeError::Encode {
                    path: self.path.clone(),
                    message: format!("ragged batch: lengths {} and {len}", encoding.len()),
                });
            }
            batch.ids.extend_from_slice(encoding.get_ids());
            batch.mask.extend_from_slice(encoding.get_attention_mask());
        }
        Ok(batch)
    }
}
