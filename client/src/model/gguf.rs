//! GGUF files (llama.cpp's format): the metadata, quantized tensors, and the tokenizer stored in
//! the metadata, read through candle's `quantized::gguf_file`.
//!
//! The tokenizer of a `gpt2`-type GGUF is rebuilt as a `tokenizers` byte-level BPE from
//! `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with the control tokens (token type 3,
//! `<|im_start|>` …) as special tokens matched whole. Digits are split one by one before the
//! byte-level split, as SmolLM's and StarCoder's tokenizers do (`pre = smollm`); other
//! pre-tokenizers are refused by name rather than tokenized differently.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::{ModelError, Result};

/// llama.cpp's token type of a control token (`<|im_start|>`, `<|endoftext|>`, …).
const CONTROL_TOKEN: i32 = 3;
/// llama.cpp's token type of a user-defined token (also matched whole).
const USER_DEFINED_TOKEN: i32 = 4;

/// The pre-tokenizers whose rules [`GgufFile::tokenizer`] implements (llama.cpp's names).
const KNOWN_PRE_TOKENIZERS: [&str; 3] = ["smollm", "starcoder", "refact"];

/// An open GGUF file: its metadata and tensor directory (the tensor data is read on demand).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory of `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(ModelError::NotFound { what: "GGUF file", path });
        }
        let file = File::open(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let content = Content::read(&mut BufReader::new(file))
            .map_err(|e| ModelError::Weights { files: path.display().to_string(), message: e.to_string() })?;
        Ok(Self { path, content })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, if present.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// The error for a missing or mistyped metadata key.
    fn metadata_error(&self, key: &str, message: &str) -> ModelError {
        ModelError::Config { path: self.path.clone(), message: format!("metadata {key:?}: {message}") }
    }

    /// A required unsigned integer (any integer type in the file).
    pub fn usize(&self, key: &str) -> Result<usize> {
        let value = self.value(key).ok_or_else(|| self.metadata_error(key, "missing"))?;
        let n = match value {
            Value::U8(v) => u64::from(*v),
            Value::U16(v) => u64::from(*v),
            Value::U32(v) => u64::from(*v),
            Value::U64(v) => *v,
            Value::I32(v) if *v >= 0 => *v as u64,
            Value::I64(v) if *v >= 0 => *v as u64,
            other => return Err(self.metadata_error(key, &format!("expected an unsigned integer, got {other:?}"))),
        };
        usize::try_from(n).map_err(|_| self.metadata_error(key, "too large"))
    }

    /// A required float (f32 or f64 in the file).
    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.value(key) {
            Some(Value::F32(v)) => Ok(f64::from(*v)),
            Some(Value::F64(v)) => Ok(*v),
            Some(other) => Err(self.metadata_error(key, &format!("expected a float, got {other:?}"))),
            None => Err(self.metadata_error(key, "missing")),
        }
    }

    /// A string value, if present.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.value(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// True when the file holds a tensor `name` (GGUF's names: `blk.0.attn_q.weight`).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Tensor `name`, read from the file onto `device` in its stored type (quantized or not).
    /// Its shape is PyTorch's order (`[d_out, d_in]` for a linear layer), which `expected` must
    /// match.
    pub fn tensor(
        &self,
        reader: &mut BufReader<File>,
        name: &str,
        expected: &[usize],
        device: &Device,
    ) -> Result<QTensor> {
        let files = || self.path.display().to_string();
        if !self.has_tensor(name) {
            return Err(ModelError::MissingTensor { name: name.to_string(), files: files() });
        }
        let tensor = self
            .content
            .tensor(reader, name, device)
            .map_err(|e| ModelError::Weights { files: files(), message: format!("tensor {name:?}: {e}") })?;
        if tensor.shape().dims() != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                got: tensor.shape().dims().to_vec(),
                files: files(),
            });
        }
        Ok(tensor)
    }

    /// A reader of the file's tensor data, for [`tensor`](Self::tensor).
    pub fn reader(&self) -> Result<BufReader<File>> {
        let file = File::open(&self.path).map_err(|source| ModelError::Io { path: self.path.clone(), source })?;
        Ok(BufReader::new(file))
    }

    /// The tokenizer stored in the metadata (`tokenizer.ggml.*`): byte-level BPE for
    /// `tokenizer.ggml.model = gpt2`, control tokens special. No BOS is added: the fixture's and
    /// transformers' behaviour for SmolLM2 (`add_bos_token = false`).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let fail = |message: String| ModelError::Config { path: self.path.clone(), message };
        match self.string("tokenizer.ggml.model") {
            Some("gpt2") => {}
            other => {
                return Err(fail(format!("tokenizer model {other:?} is not supported (only \"gpt2\", byte-level BPE)")))
            }
        }
        let pre = self.string("tokenizer.ggml.pre").unwrap_or("default");
        if !KNOWN_PRE_TOKENIZERS.contains(&pre) {
            return Err(fail(format!(
                "pre-tokenizer {pre:?} is not supported (known: {})",
                KNOWN_PRE_TOKENIZERS.join(", ")
            )));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types = match self.value("tokenizer.ggml.token_type") {
            Some(Value::Array(values)) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| fail(format!("merge {m:?} is not two tokens separated by a space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| fail(format!("cannot build the BPE tokenizer: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, &t)| t == CONTROL_TOKEN || t == USER_DEFINED_TOKEN)
            .map(|(token, _)| AddedToken::from(token.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(special).map_err(|e| fail(format!("cannot add the control tokens: {e}")))?;
        Ok(tokenizer)
    }

    /// A string-array metadata value.
    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        match self.value(key) {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    other => Err(self.metadata_error(key, &format!("expected strings, got {other:?}"))),
                })
                .collect(),
            Some(other) => Err(self.metadata_error(key, &format!("expected an array, got {other:?}"))),
            None => Err(self.metadata_error(key, "missing")),
        }
    }
}
