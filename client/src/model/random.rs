//! Random models with the real tensor names, written to disk and loaded through the same path as
//! a real checkpoint: stand-ins for tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::llama::{gguf_name, gguf_rope_rows};
use super::{BertConfig, LlamaConfig, ModelError, Result};
use crate::rng::SplitMix64;

/// Writes a random BERT with `config` to `dir` (created if needed) as `config.json` and
/// `model.safetensors`, with HF tensor names: a stand-in for a real checkpoint in tests, loaded
/// through the same path. Deterministic for a given `seed`.
pub fn write_random_model(dir: impl AsRef<Path>, config: &BertConfig, seed: u64) -> Result<()> {
    let dir = dir.as_ref();
    write_config(dir, config)?;

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

/// Creates `dir` and writes `config` to `dir/config.json`.
fn write_config(dir: &Path, config: &impl serde::Serialize) -> Result<()> {
    let io = |path: PathBuf| move |source| ModelError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let config_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(config)
        .map_err(|e| ModelError::Config { path: config_path.clone(), message: e.to_string() })?;
    std::fs::write(&config_path, json).map_err(io(config_path.clone()))
}

/// Writes a random Llama with `config` to `dir` (created if needed) as HF `config.json` and
/// `model.safetensors` (f32, HF names). Deterministic for a given `seed`; the same values as
/// [`write_random_gguf`] with the same seed.
pub fn write_random_llama(dir: impl AsRef<Path>, config: &LlamaConfig, seed: u64) -> Result<()> {
    let dir = dir.as_ref();
    write_config(dir, config)?;
    let tensors: HashMap<String, Tensor> = random_llama_tensors(config, seed)?.into_iter().collect();
    let weights_path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path)
        .map_err(|e| ModelError::Weights { files: weights_path.display().to_string(), message: e.to_string() })?;
    Ok(())
}

/// Writes the random Llama of [`write_random_llama`] as a llama.cpp GGUF file: GGUF names, the
/// query and key rows in llama.cpp's rotary order, matrices in `dtype` (norms f32), and a tiny
/// byte-level BPE tokenizer with ChatML control tokens in the metadata (the vocabulary is
/// `config.vocab_size`, at least 128).
pub fn write_random_gguf(path: impl AsRef<Path>, config: &LlamaConfig, dtype: GgmlDType, seed: u64) -> Result<()> {
    use candle_core::quantized::gguf_file::Value;
    let path = path.as_ref();
    let fail = |message: String| ModelError::Weights { files: path.display().to_string(), message };
    let (heads, kv_heads, hd) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim());
    let mut tensors = Vec::new();
    for (name, tensor) in random_llama_tensors(config, seed)? {
        let gguf = gguf_name(&name).ok_or_else(|| fail(format!("no GGUF name for {name}")))?;
        // llama.cpp's rotary row order: GGUF row gguf_rope_rows[i] holds HF row i.
        let rope_heads = [("q_proj", heads), ("k_proj", kv_heads)].into_iter().find(|(m, _)| name.contains(m));
        let tensor = match rope_heads {
            Some((_, h)) => {
                let order = gguf_rope_rows(h, hd);
                let mut inverse = vec![0u32; order.len()];
                for (hf_row, &g) in order.iter().enumerate() {
                    inverse[g] = hf_row as u32;
                }
                let n = inverse.len();
                tensor.index_select(&Tensor::from_vec(inverse, n, &Device::Cpu)?, 0)?
            }
            None => tensor,
        };
        let stored = if tensor.rank() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((gguf, QTensor::quantize(&tensor, stored)?));
    }
    let TinyVocabulary { tokens, types, merges } = tiny_vocabulary(config.vocab_size).map_err(fail)?;
    let u32v = |v: usize| Value::U32(v as u32);
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u32v(config.num_hidden_layers)),
        ("llama.context_length", u32v(config.max_position_embeddings)),
        ("llama.embedding_length", u32v(config.hidden_size)),
        ("llama.feed_forward_length", u32v(config.intermediate_size)),
        ("llama.attention.head_count", u32v(heads)),
        ("llama.attention.head_count_kv", u32v(kv_heads)),
        ("llama.rope.freq_base", Value::F32(config.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(config.rms_norm_eps as f32)),
        ("llama.vocab_size", u32v(config.vocab_size)),
        ("llama.rope.dimension_count", u32v(hd)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges", strings(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.padding_token_id", Value::U32(2)),
        ("tokenizer.chat_template", Value::String(TINY_CHAT_TEMPLATE.into())),
    ];
    let mut file = std::fs::File::create(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut file, &metadata, &tensors)?;
    Ok(())
}

/// SmolLM2's ChatML template, shortened (the loader reads only its markers and system prompt).
const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are a test.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A byte-level BPE vocabulary of `size` tokens: three ChatML control tokens, the printable
/// ASCII bytes, space and newline (byte-level `Ġ`, `Ċ`), a few merges, unused fillers.
fn tiny_vocabulary(size: usize) -> std::result::Result<TinyVocabulary, String> {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    let mut types = vec![3; 3];
    tokens.extend((33u8..=126).map(|b| (b as char).to_string()));
    tokens.extend(["\u{120}".to_string(), "\u{10a}".to_string()]);
    let pairs =
        [("\u{120}", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("\u{120}", "a"), ("r", "e")];
    let mut merges = Vec::new();
    for (a, b) in pairs {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    types.resize(tokens.len(), 1);
    if tokens.len() > size {
        return Err(format!(
            "the tiny tokenizer needs a vocabulary of at least {}, the config has {size}",
            tokens.len()
        ));
    }
    while tokens.len() < size {
        tokens.push(format!("<unused{}>", tokens.len()));
        types.push(5);
    }
    Ok(TinyVocabulary { tokens, types, merges })
}

/// A tokenizer's vocabulary as GGUF stores it.
struct TinyVocabulary {
    tokens: Vec<String>,
    /// llama.cpp's token types (1 normal, 3 control, 5 unused).
    types: Vec<i32>,
    /// `"a b"` merges, in rank order.
    merges: Vec<String>,
}

/// The random Llama's tensors by HF name (deterministic for `seed`).
fn random_llama_tensors(config: &LlamaConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = SplitMix64::new(seed);
    let mut tensors = Vec::new();
    for (name, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let (center, half_width) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
            (0.0, 1.0)
        } else {
            (0.0, (3.0 / shape[1] as f64).sqrt())
        };
        let values = (0..n).map(|_| (center + half_width * rng.next_symmetric()) as f32).collect::<Vec<_>>();
        tensors.push((name, Tensor::from_vec(values, shape, &Device::Cpu)?));
    }
    Ok(tensors)
}
