//! Delta compression: a configurable pipeline of (a) top-k sparsification by magnitude with error
//! feedback, (b) block-wise absmax quantization to int8 or int4 with stochastic rounding, and (c)
//! optional zstd. Every payload carries its scheme, the tensors' names and shapes, and a SHA-256
//! digest that [`decode`] verifies before it looks at anything else.
//!
//! Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what a round did not transmit —
//! the values top-k dropped and the quantization error of those it kept — is kept by the caller in
//! an [`ErrorFeedback`] and added to the next round's delta, so over T rounds the transmitted sum
//! plus the residual equals the sum of the true deltas.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::adapter::{PoolDelta, PoolSpec, SlotUsage};
use crate::frame::{self, FrameError};
use crate::ids::{Sha256, SpecHash};
use crate::tensor::HostTensor;

/// Default quantization block: 64 values share one absmax scale (as in FLARE's and bitsandbytes'
/// block-wise quantizers).
pub const DEFAULT_BLOCK: u32 = 64;

/// How kept values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quantization {
    /// 32-bit floats, exact.
    F32,
    /// 8-bit signed levels in [-127, 127] per block of absmax.
    Int8,
    /// 4-bit signed levels in [-7, 7] per block of absmax, two per byte.
    Int4,
}

impl Quantization {
    fn levels(self) -> f32 {
        match self {
            Quantization::F32 => 0.0,
            Quantization::Int8 => 127.0,
            Quantization::Int4 => 7.0,
        }
    }
}

/// The compression pipeline's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CodecConfig {
    /// Keep this fraction of each tensor's values, the largest by magnitude (None: keep all).
    pub top_k: Option<f32>,
    /// How kept values are stored.
    pub quantization: Quantization,
    /// Values per quantization block.
    pub block_size: u32,
    /// zstd level for the whole payload (None: no zstd).
    pub zstd_level: Option<i32>,
    /// With `top_k`: the head, AdaLoRA's λ (`lora_E`) and every tensor of at most
    /// [`SMALL_TENSOR_VALUES`] values travel whole (quantized like the rest), not sparsified.
    pub dense_small: bool,
    /// How a value becomes a quantization level.
    pub rounding: Rounding,
}

/// A tensor this small (or the head, or λ) is sent whole under `dense_small`: a LoRA head
/// (2 × 384 on MiniLM) is 768 values, an SSF pool's smallest rows are 384.
pub const SMALL_TENSOR_VALUES: usize = 1024;

/// How a value is mapped to one of the quantizer's levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Rounding {
    /// Up with probability equal to the fraction above the lower level: unbiased
    /// (E[level·scale] = value), the rounding noise independent of the value.
    #[default]
    Stochastic,
    /// To the nearest level: biased per value, the smaller error on average.
    Nearest,
}

impl Default for CodecConfig {
    /// Lossless: every value as f32, no zstd.
    fn default() -> Self {
        Self {
            top_k: None,
            quantization: Quantization::F32,
            block_size: DEFAULT_BLOCK,
            zstd_level: None,
            dense_small: false,
            rounding: Rounding::Stochastic,
        }
    }
}

/// Codec settings as people write them in a TOML config (`[download_codec]` of the server,
/// `[upload_codec]` of the client): `quantization = "fp32" | "int8" | "int4"`, `top_k`,
/// `block_size`, `zstd_level`, `dense_small`, `rounding = "stochastic" | "nearest"`,
/// `warmup_rounds` (uploads only). Every field has a default (lossless fp32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecSettings {
    /// `fp32`, `int8` or `int4`.
    #[serde(default = "default_quantization_name")]
    pub quantization: String,
    /// Fraction of values kept (None: all).
    #[serde(default)]
    pub top_k: Option<f32>,
    /// Values per quantization block.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// zstd level (None: no zstd).
    #[serde(default)]
    pub zstd_level: Option<i32>,
    /// With `top_k`: the head, λ and tensors of at most [`SMALL_TENSOR_VALUES`] values whole.
    #[serde(default)]
    pub dense_small: bool,
    /// `stochastic` (default) or `nearest`.
    #[serde(default = "default_rounding_name")]
    pub rounding: String,
    /// With `top_k`: the first rounds keep more, from dense down to `top_k` geometrically (deep
    /// gradient compression's warm-up; [`CodecSchedule`]). Uploads only.
    #[serde(default)]
    pub warmup_rounds: u64,
}

fn default_rounding_name() -> String {
    "stochastic".into()
}

fn default_quantization_name() -> String {
    "fp32".into()
}

fn default_block_size() -> u32 {
    DEFAULT_BLOCK
}

impl Default for CodecSettings {
    fn default() -> Self {
        Self {
            quantization: default_quantization_name(),
            top_k: None,
            block_size: DEFAULT_BLOCK,
            zstd_level: None,
            dense_small: false,
            rounding: default_rounding_name(),
            warmup_rounds: 0,
        }
    }
}

impl CodecSettings {
    /// The checked codec configuration, for a codec without a warm-up (the server's download);
    /// `warmup_rounds` is refused here: uploads use [`CodecSettings::to_schedule`].
    pub fn to_codec(&self) -> Result<CodecConfig, CodecError> {
        if self.warmup_rounds > 0 {
            return Err(CodecError::Config(format!(
                "warmup_rounds = {} is for uploads only (the client's upload codec)",
                self.warmup_rounds
            )));
        }
        self.parse()
    }

    fn parse(&self) -> Result<CodecConfig, CodecError> {
        let quantization = match self.quantization.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Quantization::F32,
            "int8" => Quantization::Int8,
            "int4" => Quantization::Int4,
            other => {
                return Err(CodecError::Config(format!("quantization {other:?} is not fp32, int8 or int4")));
            }
        };
        let rounding = match self.rounding.to_ascii_lowercase().as_str() {
            "stochastic" => Rounding::Stochastic,
            "nearest" => Rounding::Nearest,
            other => return Err(CodecError::Config(format!("rounding {other:?} is not stochastic or nearest"))),
        };
        let c = CodecConfig {
            top_k: self.top_k,
            quantization,
            block_size: self.block_size,
            zstd_level: self.zstd_level,
            dense_small: self.dense_small,
            rounding,
        };
        c.validate()?;
        Ok(c)
    }

    /// The checked per-round schedule (the configuration with its warm-up).
    pub fn to_schedule(&self) -> Result<CodecSchedule, CodecError> {
        let codec = self.parse()?;
        if self.warmup_rounds > 0 && codec.top_k.is_none() {
            return Err(CodecError::Config(format!(
                "warmup_rounds = {} needs top_k (it ramps the kept fraction down to top_k)",
                self.warmup_rounds
            )));
        }
        Ok(CodecSchedule { codec, warmup_rounds: self.warmup_rounds })
    }
}

/// An upload codec with deep gradient compression's warm-up (Lin et al., ICLR 2018: the kept
/// fraction falls exponentially over the first epochs): in round `r ≤ W` of a warm-up of `W`
/// rounds top-k keeps `k^(r / (W + 1))` of each tensor (W = 2, k = 10%: 46%, 22%, then 10%), so
/// the first, largest updates are not held back in the residual while the model moves most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecSchedule {
    /// The configuration after the warm-up.
    pub codec: CodecConfig,
    /// Rounds of warm-up (0: none).
    pub warmup_rounds: u64,
}

impl From<CodecConfig> for CodecSchedule {
    /// No warm-up.
    fn from(codec: CodecConfig) -> Self {
        Self { codec, warmup_rounds: 0 }
    }
}

impl CodecSchedule {
    /// The configuration of round `round` (the first round is 1).
    pub fn for_round(&self, round: u64) -> CodecConfig {
        match self.codec.top_k {
            Some(k) if round >= 1 && round <= self.warmup_rounds => {
                let exponent = round as f64 / (self.warmup_rounds as f64 + 1.0);
                let kept = (f64::from(k).powf(exponent) as f32).clamp(k, 1.0);
                CodecConfig { top_k: Some(kept), ..self.codec }
            }
            _ => self.codec,
        }
    }
}

impl CodecConfig {
    /// Checks the settings are usable.
    pub fn validate(&self) -> Result<(), CodecError> {
        if let Some(k) = self.top_k {
            if !(k > 0.0 && k <= 1.0) {
                return Err(CodecError::Config(format!("top_k fraction {k} must be in (0, 1]")));
            }
        }
        if self.block_size == 0 || self.block_size > 1 << 16 {
            return Err(CodecError::Config(format!("block size {} must be in 1..=65536", self.block_size)));
        }
        if let Some(l) = self.zstd_level {
            if !(1..=22).contains(&l) {
                return Err(CodecError::Config(format!("zstd level {l} must be in 1..=22")));
            }
        }
        Ok(())
    }

    /// A short name, e.g. `top10%+int8+zstd3`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(k) = self.top_k {
            parts.push(format!("top{}%", k * 100.0));
        }
        parts.push(match self.quantization {
            Quantization::F32 => "fp32".into(),
            Quantization::Int8 => "int8".into(),
            Quantization::Int4 => "int4".into(),
        });
        if self.quantization != Quantization::F32 && self.rounding == Rounding::Nearest {
            parts.push("nearest".into());
        }
        if self.dense_small && self.top_k.is_some() {
            parts.push("dense-small".into());
        }
        if let Some(l) = self.zstd_level {
            parts.push(format!("zstd{l}"));
        }
        parts.join("+")
    }
}

/// Why a delta could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The codec settings are unusable.
    #[error("codec config: {0}")]
    Config(String),
    /// The payload does not match its digest (corrupted or tampered with).
    #[error("payload digest mismatch: the delta was corrupted in transit")]
    DigestMismatch,
    /// The payload decompresses or decodes to something malformed.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The payload claims more than the decoder's limits allow.
    #[error("payload exceeds limits: {0}")]
    TooLarge(String),
    /// Framing or bincode failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// The residual of values not yet transmitted, kept by the sender between rounds.
///
/// Keys are tensor names, or `name#slot` for the rows of a slot in an SSF pool delta (slots come
/// and go between rounds; a slot's residual waits until it is sent again). A residual whose shape
/// no longer matches (a LoRA rank changed) is dropped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: BTreeMap<String, HostTensor>,
}

impl ErrorFeedback {
    /// An empty residual.
    pub fn new() -> Self {
        Self::default()
    }

    /// The residual tensors by key (for persisting them, e.g. with `checkpoint::write_tensors`).
    pub fn tensors(&self) -> &BTreeMap<String, HostTensor> {
        &self.residual
    }

    /// The residual tensors by key, taken.
    pub fn into_tensors(self) -> BTreeMap<String, HostTensor> {
        self.residual
    }

    /// A residual restored from persisted tensors.
    pub fn from_tensors(residual: BTreeMap<String, HostTensor>) -> Self {
        Self { residual }
    }

    /// The L2 norm of everything not yet transmitted.
    pub fn l2_norm(&self) -> f64 {
        self.residual.values().map(|t| t.l2_norm().powi(2)).sum::<f64>().sqrt()
    }
}

/// An encoded delta as it travels: scheme, sizes, payload and its digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodedDelta {
    /// The pipeline that produced the payload.
    pub config: CodecConfig,
    /// Bytes of the payload before zstd (bounds decompression).
    pub raw_len: u64,
    /// The (possibly zstd-compressed) bincode body. Reference-counted: a round's tasks all carry
    /// the same global pool, and cloning a task must not copy it (256 clients × a 5 MB pool).
    pub payload: Bytes,
    /// SHA-256 over the config, `raw_len` and the payload.
    pub digest: Sha256,
}

/// Limits a decoder applies before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most values the delta may expand to.
    pub max_values: u64,
    /// Most bytes the payload may decompress to.
    pub max_raw_bytes: u64,
}

/// Bytes of a decoded payload beyond its values: tensor names, shapes, slot lists, headers.
const PAYLOAD_OVERHEAD: u64 = 1 << 20;

impl DecodeLimits {
    /// The limits for any transfer of a pool of `spec` (a global pool, a delta, a truncated one):
    /// at most every value of the spec, and per value 4 bytes (fp32) plus 5 for its sparse
    /// position (a `u32` LEB128 gap), plus [`PAYLOAD_OVERHEAD`] for names and headers. The one
    /// formula the server, the daemon and the simulator decode with.
    pub fn for_spec(spec: &PoolSpec) -> Self {
        let max_values = spec.num_params() as u64;
        Self { max_values, max_raw_bytes: max_values.saturating_mul(9).saturating_add(PAYLOAD_OVERHEAD) }
    }
}

impl Default for DecodeLimits {
    /// 64 M values, 1 GiB decompressed.
    fn default() -> Self {
        Self { max_values: 64 << 20, max_raw_bytes: 1 << 30 }
    }
}

#[derive(Serialize, Deserialize)]
struct Body {
    spec_hash: SpecHash,
    slots: Option<SlotUsage>,
    tensors: Vec<EncodedTensor>,
}

#[derive(Serialize, Deserialize)]
struct EncodedTensor {
    name: String,
    shape: Vec<u64>,
    positions: Positions,
    values: Values,
}

/// Which values of a tensor are carried.
#[derive(Serialize, Deserialize)]
enum Positions {
    /// All of them, in order.
    Dense,
    /// `count` of them; `gaps` holds LEB128 varints, each the distance from the position after
    /// the previous kept one.
    Sparse { count: u64, gaps: ByteBuf },
}

/// The carried values.
#[derive(Serialize, Deserialize)]
enum Values {
    /// Little-endian f32.
    F32(ByteBuf),
    /// One f32 scale per block, then levels (i8, or two 4-bit levels per byte).
    Quantized { scales: ByteBuf, levels: ByteBuf },
}

/// Encodes `delta` with `config`. With `feedback`, the residual from earlier rounds is added
/// first and replaced by what this payload leaves out. `seed` drives stochastic rounding.
pub fn encode(
    delta: &PoolDelta,
    config: &CodecConfig,
    feedback: Option<&mut ErrorFeedback>,
    seed: u64,
) -> Result<EncodedDelta, CodecError> {
    config.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut feedback = feedback;
    let mut tensors = Vec::with_capacity(delta.tensors.len());
    for (name, t) in &delta.tensors {
        let keys = residual_keys(name, t, delta.slots.as_ref());
        let mut v = t.data().to_vec();
        if let Some(fb) = feedback.as_deref_mut() {
            add_residual(fb, &keys, &mut v);
        }
        let top_k = config.top_k.filter(|_| !(config.dense_small && is_small(name, t)));
        let kept: Vec<usize> = match top_k {
            Some(frac) => top_k_positions(&v, frac),
            None => Vec::new(), // dense
        };
        let dense = top_k.is_none();
        let selected: Vec<f32> = if dense { v.clone() } else { kept.iter().map(|&i| v[i]).collect() };
        let (values, sent) = quantize(&selected, config, &mut rng);
        if let Some(fb) = feedback.as_deref_mut() {
            // residual = v − what the receiver will decode
            if dense {
                v.iter_mut().zip(&sent).for_each(|(r, s)| *r -= s);
            } else {
                kept.iter().zip(&sent).for_each(|(&i, s)| v[i] -= s);
            }
            store_residual(fb, &keys, t.shape(), v);
        }
        let positions = if dense {
            Positions::Dense
        } else {
            Positions::Sparse { count: kept.len() as u64, gaps: ByteBuf::from(encode_gaps(&kept)) }
        };
        tensors.push(EncodedTensor {
            name: name.clone(),
            shape: t.shape().iter().map(|&d| d as u64).collect(),
            positions,
            values,
        });
    }
    let body = Body { spec_hash: delta.spec_hash, slots: delta.slots.clone(), tensors };
    let raw = frame::to_bytes(&body)?;
    let raw_len = raw.len() as u64;
    let payload = match config.zstd_level {
        Some(level) => zstd::bulk::compress(&raw, level).map_err(|e| CodecError::Malformed(format!("zstd: {e}")))?,
        None => raw,
    };
    EncodedDelta::seal(*config, raw_len, payload)
}

impl EncodedDelta {
    /// Seals a payload: computes the digest over `config`, `raw_len` and `payload`.
    pub fn seal(config: CodecConfig, raw_len: u64, payload: Vec<u8>) -> Result<Self, CodecError> {
        let digest = digest_of(&config, raw_len, &payload)?;
        Ok(Self { config, raw_len, payload: Bytes::from(payload), digest })
    }

    /// The exact number of bytes this takes inside a message (its bincode encoding).
    pub fn wire_len(&self) -> usize {
        // Encoding a struct of plain fields into a counter cannot fail.
        frame::encoded_len(self).unwrap_or(usize::MAX)
    }
}

fn digest_of(config: &CodecConfig, raw_len: u64, payload: &[u8]) -> Result<Sha256, CodecError> {
    let cfg = frame::to_bytes(config)?;
    Ok(Sha256::of_parts([cfg.as_slice(), &raw_len.to_le_bytes(), payload]))
}

/// Decodes and checks an encoded delta: digest first, then sizes against `limits` before any
/// allocation they imply, then every tensor's positions and value counts against its shape.
/// The result still has to be validated against the pool spec (`PoolDelta::validate`).
pub fn decode(enc: &EncodedDelta, limits: &DecodeLimits) -> Result<PoolDelta, CodecError> {
    if digest_of(&enc.config, enc.raw_len, &enc.payload)? != enc.digest {
        return Err(CodecError::DigestMismatch);
    }
    enc.config.validate()?;
    if enc.raw_len > limits.max_raw_bytes {
        return Err(CodecError::TooLarge(format!("payload of {} bytes > {}", enc.raw_len, limits.max_raw_bytes)));
    }
    let raw = match enc.config.zstd_level {
        Some(_) => {
            let out = zstd::bulk::decompress(&enc.payload, enc.raw_len as usize)
                .map_err(|e| CodecError::Malformed(format!("zstd: {e}")))?;
            if out.len() as u64 != enc.raw_len {
                return Err(CodecError::Malformed(format!(
                    "zstd gave {} bytes, header says {}",
                    out.len(),
                    enc.raw_len
                )));
            }
            std::borrow::Cow::Owned(out)
        }
        None => {
            if enc.payload.len() as u64 != enc.raw_len {
                return Err(CodecError::Malformed(format!(
                    "payload is {} bytes, header says {}",
                    enc.payload.len(),
                    enc.raw_len
                )));
            }
            std::borrow::Cow::Borrowed(&enc.payload[..])
        }
    };
    let body: Body = frame::from_bytes(&raw)?;
    let mut total: u64 = 0;
    for t in &body.tensors {
        let n = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| CodecError::TooLarge(format!("tensor {:?}: shape overflows", t.name)))?;
        total = total.saturating_add(n);
    }
    if total > limits.max_values {
        return Err(CodecError::TooLarge(format!("{total} values > {}", limits.max_values)));
    }
    let mut tensors = BTreeMap::new();
    for t in body.tensors {
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let numel: usize = shape.iter().product();
        let bad = |m: String| CodecError::Malformed(format!("tensor {:?}: {m}", t.name));
        let count = match &t.positions {
            Positions::Dense => numel,
            Positions::Sparse { count, .. } if *count as usize <= numel => *count as usize,
            Positions::Sparse { count, .. } => return Err(bad(format!("{count} kept values in {numel}"))),
        };
        let values = dequantize(&t.values, enc.config, count).map_err(bad)?;
        let data = match &t.positions {
            Positions::Dense => values,
            Positions::Sparse { gaps, .. } => {
                let mut dense = vec![0.0f32; numel];
                let positions = decode_gaps(gaps, count, numel).map_err(bad)?;
                positions.iter().zip(values).for_each(|(&i, v)| dense[i] = v);
                dense
            }
        };
        let tensor = HostTensor::new(shape, data).map_err(|e| bad(e.to_string()))?;
        if tensors.insert(t.name.clone(), tensor).is_some() {
            return Err(bad("appears twice".into()));
        }
    }
    Ok(PoolDelta { spec_hash: body.spec_hash, slots: body.slots, tensors })
}

/// Whether `dense_small` sends this tensor whole: the head, AdaLoRA's λ, or at most
/// [`SMALL_TENSOR_VALUES`] values.
fn is_small(name: &str, t: &HostTensor) -> bool {
    name == crate::adapter::HEAD_WEIGHT
        || name == crate::adapter::HEAD_BIAS
        || name.ends_with(".lora_E.weight")
        || t.numel() <= SMALL_TENSOR_VALUES
}

/// The residual keys of a tensor's segments: one per slot row in an SSF pool delta, else one.
fn residual_keys(name: &str, t: &HostTensor, slots: Option<&SlotUsage>) -> Vec<String> {
    match slots {
        Some(u) if t.shape().first() == Some(&u.slots.len()) => u.slots.iter().map(|s| format!("{name}#{s}")).collect(),
        _ => vec![name.to_string()],
    }
}

fn add_residual(fb: &ErrorFeedback, keys: &[String], v: &mut [f32]) {
    let width = v.len() / keys.len().max(1);
    for (seg, key) in v.chunks_mut(width.max(1)).zip(keys) {
        if let Some(r) = fb.residual.get(key) {
            if r.numel() == seg.len() {
                seg.iter_mut().zip(r.data()).for_each(|(x, r)| *x += r);
            }
        }
    }
}

fn store_residual(fb: &mut ErrorFeedback, keys: &[String], shape: &[usize], v: Vec<f32>) {
    if keys.len() == 1 {
        // The data has the tensor's own length by construction.
        fb.residual
            .insert(keys[0].clone(), HostTensor::new(shape.to_vec(), v).expect("residual has the tensor's shape"));
        return;
    }
    let width = v.len() / keys.len();
    for (seg, key) in v.chunks(width.max(1)).zip(keys) {
        fb.residual
            .insert(key.clone(), HostTensor::new(shape[1..].to_vec(), seg.to_vec()).expect("a row has the row shape"));
    }
}

/// Positions of the `ceil(frac · n)` (at least 1) largest magnitudes, in increasing order.
fn top_k_positions(v: &[f32], frac: f32) -> Vec<usize> {
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    // `frac` is an f32 (0.1 is 0.100000001...): treat products within float error of an integer
    // as that integer, so 10% of 100 is 10, not 11.
    let exact = f64::from(frac) * n as f64;
    let k = if (exact - exact.round()).abs() < 1e-6 * exact.max(1.0) { exact.round() } else { exact.ceil() };
    let k = (k as usize).clamp(1, n);
    if k == n {
        return (0..n).collect();
    }
    let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    // The k-th largest magnitude is the threshold.
    let (_, &mut threshold, _) = mags.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
    let above = v.iter().filter(|x| x.abs().total_cmp(&threshold).is_gt()).count();
    let mut ties_left = k - above;
    let mut out = Vec::with_capacity(k);
    for (i, x) in v.iter().enumerate() {
        match x.abs().total_cmp(&threshold) {
            std::cmp::Ordering::Greater => out.push(i),
            std::cmp::Ordering::Equal if ties_left > 0 => {
                ties_left -= 1;
                out.push(i);
            }
            _ => {}
        }
    }
    out
}

fn encode_gaps(positions: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(positions.len() + positions.len() / 4);
    let mut next = 0usize;
    for &p in positions {
        let mut gap = (p - next) as u64;
        loop {
            let byte = (gap & 0x7f) as u8;
            gap >>= 7;
            if gap == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        next = p + 1;
    }
    out
}

fn decode_gaps(bytes: &[u8], count: usize, numel: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(count);
    let mut next = 0u64;
    let mut it = bytes.iter();
    for _ in 0..count {
        let mut gap = 0u64;
        let mut shift = 0;
        loop {
            let &b = it.next().ok_or("positions end early")?;
            if shift > 56 {
                return Err("position varint too long".into());
            }
            gap |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let p = next.checked_add(gap).ok_or("position overflows")?;
        if p >= numel as u64 {
            return Err(format!("position {p} outside {numel} values"));
        }
        out.push(p as usize);
        next = p + 1;
    }
    if it.next().is_some() {
        return Err("trailing bytes after positions".into());
    }
    Ok(out)
}

/// Quantizes `v`; returns the stored form and the values a decoder will read back.
fn quantize(v: &[f32], config: &CodecConfig, rng: &mut ChaCha8Rng) -> (Values, Vec<f32>) {
    let levels = config.quantization.levels();
    if config.quantization == Quantization::F32 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        return (Values::F32(ByteBuf::from(bytes)), v.to_vec());
    }
    let block = config.block_size as usize;
    let mut scales = Vec::with_capacity(v.len().div_ceil(block) * 4);
    let mut q: Vec<i8> = Vec::with_capacity(v.len());
    let mut sent = Vec::with_capacity(v.len());
    for chunk in v.chunks(block) {
        let absmax = chunk.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = absmax / levels;
        scales.extend_from_slice(&scale.to_le_bytes());
        for &x in chunk {
            let level = match (scale > 0.0, config.rounding) {
                (false, _) => 0.0,
                (true, Rounding::Stochastic) => stochastic_round(x / scale, rng).clamp(-levels, levels),
                (true, Rounding::Nearest) => (x / scale).round().clamp(-levels, levels),
            };
            q.push(level as i8);
            sent.push(level * scale);
        }
    }
    let levels_bytes: Vec<u8> = match config.quantization {
        Quantization::Int4 => q.chunks(2).map(|p| nibble(p[0]) | nibble(p.get(1).copied().unwrap_or(0)) << 4).collect(),
        _ => q.iter().map(|&l| l as u8).collect(),
    };
    (Values::Quantized { scales: ByteBuf::from(scales), levels: ByteBuf::from(levels_bytes) }, sent)
}

/// A 4-bit level in [-7, 7] stored as 1..=15.
fn nibble(level: i8) -> u8 {
    (level + 8) as u8 & 0x0f
}

/// Rounds `y` down or up with probability equal to its distance from the other: E[result] = y.
fn stochastic_round(y: f32, rng: &mut ChaCha8Rng) -> f32 {
    let floor = y.floor();
    if rng.random::<f32>() < y - floor {
        floor + 1.0
    } else {
        floor
    }
}

fn dequantize(values: &Values, config: CodecConfig, count: usize) -> Result<Vec<f32>, String> {
    match (values, config.quantization) {
        (Values::F32(bytes), Quantization::F32) => {
            if bytes.len() != count * 4 {
                return Err(format!("{} value bytes for {count} f32 values", bytes.len()));
            }
            Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        (Values::Quantized { scales, levels }, q @ (Quantization::Int8 | Quantization::Int4)) => {
            let block = config.block_size as usize;
            let blocks = count.div_ceil(block);
            if scales.len() != blocks * 4 {
                return Err(format!("{} scale bytes for {blocks} blocks", scales.len()));
            }
            let want = if q == Quantization::Int4 { count.div_ceil(2) } else { count };
            if levels.len() != want {
                return Err(format!("{} level bytes for {count} values", levels.len()));
            }
            let level = |i: usize| -> f32 {
                if q == Quantization::Int4 {
                    let byte = levels[i / 2];
                    let n = if i.is_multiple_of(2) { byte & 0x0f } else { byte >> 4 };
                    f32::from(n) - 8.0
                } else {
                    f32::from(levels[i] as i8)
                }
            };
            let scale =
                |b: usize| f32::from_le_bytes([scales[4 * b], scales[4 * b + 1], scales[4 * b + 2], scales[4 * b + 3]]);
            Ok((0..count).map(|i| level(i) * scale(i / block)).collect())
        }
        _ => Err("value encoding does not match the codec config".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Sha256;

    fn delta(values: Vec<f32>) -> PoolDelta {
        let mut tensors = BTreeMap::new();
        let n = values.len();
        tensors.insert("t".to_string(), HostTensor::new(vec![n], values).unwrap());
        PoolDelta { spec_hash: SpecHash(Sha256::of(b"spec")), slots: None, tensors }
    }

    fn named(tensors: &[(&str, Vec<f32>)]) -> PoolDelta {
        let tensors = tensors
            .iter()
            .map(|(name, v)| (name.to_string(), HostTensor::new(vec![v.len()], v.clone()).unwrap()))
            .collect();
        PoolDelta { spec_hash: SpecHash(Sha256::of(b"spec")), slots: None, tensors }
    }

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
    }

    #[test]
    fn dense_small_sends_the_head_lambda_and_small_tensors_whole_and_sparsifies_the_rest() {
        let big = ramp(4096);
        let d = named(&[
            (crate::adapter::HEAD_WEIGHT, ramp(4096)),
            (crate::adapter::HEAD_BIAS, vec![0.3, -0.2]),
            ("layer.0.attention.query.lora_E.weight", ramp(8)),
            ("small", ramp(SMALL_TENSOR_VALUES)),
            ("big", big.clone()),
        ]);
        let sparse = CodecConfig { top_k: Some(0.1), ..CodecConfig::default() };
        let nonzero = |d: &PoolDelta, name: &str| d.tensors[name].data().iter().filter(|v| **v != 0.0).count();
        let off = decode(&encode(&d, &sparse, None, 0).unwrap(), &DecodeLimits::default()).unwrap();
        assert_eq!(nonzero(&off, crate::adapter::HEAD_WEIGHT), 410, "without dense_small the head is top-k'd");
        let on = CodecConfig { dense_small: true, ..sparse };
        let back = decode(&encode(&d, &on, None, 0).unwrap(), &DecodeLimits::default()).unwrap();
        for name in
            [crate::adapter::HEAD_WEIGHT, crate::adapter::HEAD_BIAS, "layer.0.attention.query.lora_E.weight", "small"]
        {
            assert_eq!(back.tensors[name], d.tensors[name], "{name} travels whole and exact (fp32)");
        }
        assert_eq!(nonzero(&back, "big"), 410, "a big tensor keeps its top 10%");
        assert_eq!(on.describe(), "top10%+fp32+dense-small");
    }

    #[test]
    fn nearest_rounding_is_the_closest_level_and_stochastic_is_unbiased() {
        let v: Vec<f32> = (0..64).map(|i| if i == 0 { 1.0 } else { 0.3 / 127.0 }).collect();
        let d = delta(v.clone());
        let nearest =
            CodecConfig { quantization: Quantization::Int8, rounding: Rounding::Nearest, ..Default::default() };
        let back = decode(&encode(&d, &nearest, None, 0).unwrap(), &DecodeLimits::default()).unwrap();
        // Scale = 1/127: 0.3 of a level rounds to 0, always.
        assert!(back.tensors["t"].data()[1..].iter().all(|x| *x == 0.0));
        let stochastic = CodecConfig { rounding: Rounding::Stochastic, ..nearest };
        let mean: f64 = (0..200u64)
            .map(|seed| {
                let back = decode(&encode(&d, &stochastic, None, seed).unwrap(), &DecodeLimits::default()).unwrap();
                back.tensors["t"].data()[1..].iter().map(|x| f64::from(*x)).sum::<f64>() / 63.0
            })
            .sum::<f64>()
            / 200.0;
        let want = 0.3 / 127.0;
        assert!((mean - want).abs() < 0.05 * want, "stochastic mean {mean} vs the value {want}");
        let bad = CodecSettings { rounding: "up".into(), ..CodecSettings::default() };
        assert!(bad.to_codec().unwrap_err().to_string().contains("rounding \"up\""));
    }

    #[test]
    fn the_warm_up_keeps_more_in_its_first_rounds_falling_geometrically_to_top_k() {
        let settings = CodecSettings { top_k: Some(0.1), warmup_rounds: 2, ..CodecSettings::default() };
        let schedule = settings.to_schedule().unwrap();
        let k = |r| schedule.for_round(r).top_k.unwrap();
        assert!((k(1) - 0.1f32.powf(1.0 / 3.0)).abs() < 1e-6, "round 1 keeps {}", k(1));
        assert!((k(2) - 0.1f32.powf(2.0 / 3.0)).abs() < 1e-6, "round 2 keeps {}", k(2));
        assert_eq!(k(3), 0.1);
        assert_eq!(k(30), 0.1);
        assert_eq!(CodecSchedule::from(schedule.codec).for_round(1), schedule.codec, "no warm-up: the codec itself");
        let err = settings.to_codec().unwrap_err().to_string();
        assert!(err.contains("uploads only"), "a download codec refuses the warm-up: {err}");
        let dense = CodecSettings { warmup_rounds: 2, ..CodecSettings::default() };
        assert!(dense.to_schedule().unwrap_err().to_string().contains("needs top_k"));
    }

    #[test]
    fn gaps_round_trip() {
        let pos = vec![0, 1, 5, 200, 201, 100_000];
        assert_eq!(decode_gaps(&encode_gaps(&pos), pos.len(), 100_001).unwrap(), pos);
        assert!(decode_gaps(&encode_gaps(&pos), pos.len(), 100_000).is_err());
    }

    #[test]
    fn top_k_keeps_the_largest_magnitudes_and_breaks_ties_by_position() {
        assert_eq!(top_k_positions(&[0.1, -5.0, 3.0, 0.0, -0.2], 0.4), vec![1, 2]);
        assert_eq!(top_k_positions(&[1.0, 1.0, 1.0, 1.0], 0.5), vec![0, 1]);
        assert_eq!(top_k_positions(&[1.0, 2.0], 0.01), vec![1], "at least one value is kept");
    }

    #[test]
    fn lossless_round_trip_is_exact() {
        let d = delta((0..1000).map(|i| (i as f32).sin()).collect());
        let enc = encode(&d, &CodecConfig::default(), None, 0).unwrap();
        assert_eq!(decode(&enc, &DecodeLimits::default()).unwrap(), d);
        let z = CodecConfig { zstd_level: Some(3), ..Default::default() };
        assert_eq!(decode(&encode(&d, &z, None, 0).unwrap(), &DecodeLimits::default()).unwrap(), d);
    }

    #[test]
    fn top10_int8_is_a_small_fraction_of_fp32() {
        let d = delta((0..100_000).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect());
        let cfg = CodecConfig { top_k: Some(0.1), quantization: Quantization::Int8, ..Default::default() };
        let enc = encode(&d, &cfg, None, 1).unwrap();
        let ratio = enc.wire_len() as f64 / (100_000.0 * 4.0);
        assert!(ratio < 0.06, "top-10% + int8 is {:.1}% of fp32", ratio * 100.0);
    }

    #[test]
    fn limits_are_checked_before_allocating() {
        let d = delta(vec![1.0; 1000]);
        let enc = encode(&d, &CodecConfig::default(), None, 0).unwrap();
        let small = DecodeLimits { max_values: 999, ..Default::default() };
        assert!(matches!(decode(&enc, &small), Err(CodecError::TooLarge(_))));
        let tiny_raw = DecodeLimits { max_raw_bytes: 100, ..Default::default() };
        assert!(matches!(decode(&enc, &tiny_raw), Err(CodecError::TooLarge(_))));
    }

    #[test]
    fn slot_rows_keep_separate_residuals() {
        let mut d = delta(vec![0.0; 4]);
        d.tensors.insert("t".into(), HostTensor::new(vec![2, 2], vec![1.0, 0.1, 2.0, 0.2]).unwrap());
        d.slots = Some(SlotUsage { slots: vec![3, 7], counts: vec![1, 1] });
        let cfg = CodecConfig { top_k: Some(0.5), ..Default::default() };
        let mut fb = ErrorFeedback::new();
        encode(&d, &cfg, Some(&mut fb), 0).unwrap();
        assert_eq!(fb.tensors()["t#3"].data(), &[0.0, 0.1]);
        assert_eq!(fb.tensors()["t#7"].data(), &[0.0, 0.2]);
    }
}
