//! HF PEFT adapters in and out: a PEFT `LoRA` or `AdaLoRA` adapter of a BERT sequence classifier
//! (`adapter_config.json` + `adapter_model.safetensors`, as `save_pretrained` writes them) is a
//! fedpool pool of kind `lora` or `adalora` with the HF head (`pooling = cls-pooler`), and back;
//! one of a Llama causal LM (`task_type = CAUSAL_LM`) is a pool without a head.
//!
//! Names: PEFT's `base_model.model.bert.<module>.lora_A.weight` (a decoder's
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`; AdaLoRA: `.lora_A`, `.lora_E`,
//! `.lora_B` without `.weight`, and a `ranknum` that is the rank) are fedpool's `<module>.lora_A.weight`;
//! the saved classifier `base_model.model.classifier.{weight,bias}` is fedpool's head. Scales agree:
//! PEFT LoRA's α/r, AdaLoRA's α/(ranknum + 1e-5) against fedpool's α/r (a 1e-6 relative
//! difference). Only the LoRA form and sizes are read from the configuration; options fedpool does
//! not have (bias training, DoRA, rank patterns, fan-in-fan-out) are refused by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fedpool_common::adapter::{
    AdapterKind, AdapterPool, HeadSpec, PoolSpec, Pooling, TargetSpec, HEAD_BIAS, HEAD_WEIGHT,
};
use fedpool_common::tensor::HostTensor;
use serde_json::{json, Value};

use crate::model::AdapterPoints;

/// The prefix PEFT puts before a BERT sequence classifier's module paths.
const PREFIX: &str = "base_model.model.";

/// A PEFT adapter that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `adapter_config.json` is not what fedpool can load.
    #[error("{}: {message}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tensors do not form the adapter the configuration describes.
    #[error("{}: {message}", path.display())]
    Tensors {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The pool cannot be written as a PEFT adapter.
    #[error("cannot export as a PEFT adapter: {0}")]
    Export(String),
    /// A tensor could not be converted.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn config_error(path: &Path, message: impl Into<String>) -> PeftError {
    PeftError::Config { path: path.to_path_buf(), message: message.into() }
}

/// Reads the PEFT adapter in `dir` for a backbone with the adapter points `config` (a
/// [`BertConfig`](crate::model::BertConfig) for `SEQ_CLS`, a
/// [`LlamaConfig`](crate::model::LlamaConfig) for `CAUSAL_LM`): the pool spec (LoRA form, rank,
/// α, the targets the file holds, the HF head of a classifier) and the pool.
pub fn import(dir: &Path, config: &dyn AdapterPoints) -> Result<(PoolSpec, AdapterPool), PeftError> {
    let config_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|source| PeftError::Io { path: config_path.clone(), source })?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| config_error(&config_path, e.to_string()))?;
    let field = |name: &str| cfg.get(name).filter(|v| !v.is_null());
    let kind = match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => AdapterKind::Lora,
        Some("ADALORA") => AdapterKind::AdaLora,
        other => return Err(config_error(&config_path, format!("peft_type {other:?}: expected LORA or ADALORA"))),
    };
    let classifier = match field("task_type").and_then(Value::as_str) {
        Some("SEQ_CLS") => true,
        Some("CAUSAL_LM") => false,
        other => {
            return Err(config_error(
                &config_path,
                format!("task_type {other:?}: expected SEQ_CLS (a sequence classifier) or CAUSAL_LM (a decoder)"),
            ))
        }
    };
    if classifier != config.has_classifier() {
        let want = if config.has_classifier() { "SEQ_CLS" } else { "CAUSAL_LM" };
        return Err(config_error(&config_path, format!("this backbone takes task_type {want} adapters")));
    }
    let refuse = [
        ("bias", field("bias").is_some_and(|b| b != "none")),
        ("use_dora", field("use_dora").is_some_and(|d| d == true)),
        ("fan_in_fan_out", field("fan_in_fan_out").is_some_and(|f| f == true)),
        ("rank_pattern", field("rank_pattern").is_some_and(|p| p.as_object().is_some_and(|o| !o.is_empty()))),
        ("alpha_pattern", field("alpha_pattern").is_some_and(|p| p.as_object().is_some_and(|o| !o.is_empty()))),
    ];
    if let Some((name, _)) = refuse.iter().find(|(_, bad)| *bad) {
        return Err(config_error(&config_path, format!("{name} is set: fedpool's LoRA does not have it")));
    }
    let rank_field = if kind == AdapterKind::AdaLora { "init_r" } else { "r" };
    let rank = field(rank_field)
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| config_error(&config_path, format!("{rank_field} must be a positive integer")))?
        as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| *a > 0.0)
        .ok_or_else(|| config_error(&config_path, "lora_alpha must be positive"))? as f32;

    let weights_path = dir.join("adapter_model.safetensors");
    let bad = |message: String| PeftError::Tensors { path: weights_path.clone(), message };
    let tensors =
        candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut by_name: BTreeMap<String, HostTensor> = BTreeMap::new();
    for (name, tensor) in &tensors {
        let Some(ours) = fedpool_name(name, config.peft_module_prefix()) else {
            if name.ends_with("ranknum") {
                continue;
            }
            return Err(bad(format!("unexpected tensor {name:?}")));
        };
        let host = HostTensor::from_candle(tensor).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
        by_name.insert(ours, host);
    }
    let targets: Vec<TargetSpec> = config
        .lora_targets()
        .into_iter()
        .filter(|t| by_name.contains_key(&format!("{}.lora_A.weight", t.name)))
        .map(|t| TargetSpec { name: t.name, dim_in: t.d_in, dim_out: t.d_out })
        .collect();
    if targets.is_empty() {
        return Err(bad("no LoRA factor of this model's linear layers".into()));
    }
    let head = if classifier {
        let head_weight =
            by_name.get(HEAD_WEIGHT).ok_or_else(|| bad("no saved classifier (modules_to_save)".into()))?;
        let num_labels = head_weight.shape().first().copied().unwrap_or(0);
        Some(HeadSpec { pooling: Pooling::ClsPooler, ..HeadSpec::new(config.hidden_size(), num_labels) })
    } else {
        None
    };
    let spec = match kind {
        AdapterKind::AdaLora => PoolSpec::adalora(targets, rank, alpha, head),
        _ => PoolSpec::lora(targets, rank, alpha, head),
    };
    let pool = AdapterPool { spec_hash: spec.hash(), tensors: by_name };
    pool.validate(&spec).map_err(|e| bad(e.to_string()))?;
    Ok((spec, pool))
}

/// fedpool's name of a PEFT tensor (None: not an adapter or head tensor); `module_prefix` is the
/// base model's own prefix under PEFT's (`bert.`; empty for a decoder).
fn fedpool_name(peft: &str, module_prefix: &str) -> Option<String> {
    let rest = peft.strip_prefix(PREFIX)?;
    if let Some(head) = rest.strip_prefix("classifier.") {
        let head = head.strip_prefix("modules_to_save.default.").unwrap_or(head);
        return match head {
            "weight" => Some(HEAD_WEIGHT.into()),
            "bias" => Some(HEAD_BIAS.into()),
            _ => None,
        };
    }
    let module = rest.strip_prefix(module_prefix).unwrap_or(rest);
    for factor in ["lora_A", "lora_B", "lora_E"] {
        for suffix in [format!(".{factor}.weight"), format!(".{factor}.default.weight"), format!(".{factor}")] {
            if let Some(path) = module.strip_suffix(suffix.as_str()) {
                return Some(format!("{path}.{factor}.weight"));
            }
        }
    }
    None
}

/// Writes `pool` (of `spec`: LoRA or AdaLoRA with the HF head) as a PEFT adapter in `dir`
/// (created): `adapter_config.json` and `adapter_model.safetensors`, loadable with
/// `PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), dir)`.
pub fn export(dir: &Path, spec: &PoolSpec, pool: &AdapterPool, base_model: &str) -> Result<(), PeftError> {
    // A pool without a head adapts a decoder (`model.layers.N...`): a CAUSAL_LM adapter.
    let causal = spec.head.is_none();
    if causal && !spec.targets.iter().all(|t| t.name.starts_with("model.layers.")) {
        return Err(PeftError::Export("the pool has no classification head and is not a decoder's".into()));
    }
    let module_prefix = if causal { "" } else { "bert." };
    if spec.head.is_some_and(|h| h.pooling != Pooling::ClsPooler) {
        return Err(PeftError::Export(
            "BertForSequenceClassification reads the pooler on [CLS]: only pooling = \"cls-pooler\" pools export"
                .into(),
        ));
    }
    let peft_type = match spec.kind {
        AdapterKind::Lora => "LORA",
        AdapterKind::AdaLora => "ADALORA",
        AdapterKind::SsfPool => return Err(PeftError::Export("PEFT has no SSF pool".into())),
    };
    pool.validate(spec).map_err(|e| PeftError::Export(e.to_string()))?;
    let mut modules: Vec<String> =
        spec.targets.iter().filter_map(|t| t.name.rsplit('.').next().map(str::to_string)).collect();
    modules.sort();
    modules.dedup();
    let mut config = json!({
        "peft_type": peft_type,
        "task_type": if causal { "CAUSAL_LM" } else { "SEQ_CLS" },
        "base_model_name_or_path": base_model,
        "r": spec.max_rank,
        // PEFT writes a whole α as an integer.
        "lora_alpha": if spec.lora_alpha.fract() == 0.0 { json!(spec.lora_alpha as i64) } else { json!(spec.lora_alpha) },
        "lora_dropout": 0.0,
        "target_modules": modules,
        "modules_to_save": if causal { Value::Null } else { json!(["classifier", "score"]) },
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    if spec.kind == AdapterKind::AdaLora {
        // PEFT's AdaLoraConfig refuses to load without a schedule length; no schedule runs here.
        config["init_r"] = json!(spec.max_rank);
        config["target_r"] = json!(spec.max_rank);
        config["total_step"] = json!(1);
    }
    let mut tensors: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
    for (name, t) in &pool.tensors {
        let peft = if name == HEAD_WEIGHT || name == HEAD_BIAS {
            format!("{PREFIX}{name}")
        } else if spec.kind == AdapterKind::AdaLora {
            format!("{PREFIX}{module_prefix}{}", name.trim_end_matches(".weight"))
        } else {
            format!("{PREFIX}{module_prefix}{name}")
        };
        tensors.insert(peft, t.to_candle(&Device::Cpu).map_err(|e| PeftError::Export(format!("{name}: {e}")))?);
    }
    if spec.kind == AdapterKind::AdaLora {
        for t in &spec.targets {
            let ranknum = Tensor::new(&[spec.max_rank as f32], &Device::Cpu)?;
            tensors.insert(format!("{PREFIX}{module_prefix}{}.ranknum", t.name), ranknum);
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io { path: dir.to_path_buf(), source })?;
    let config_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| PeftError::Export(e.to_string()))?;
    fedpool_common::checkpoint::atomic_write(&config_path, text.as_bytes())
        .map_err(|source| PeftError::Io { path: config_path, source })?;
    let weights_path = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path)
        .map_err(|e| PeftError::Export(format!("{}: {e}", weights_path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_map_to_fedpool_names() {
        let q = "encoder.layer.0.attention.self.query";
        let name = |peft: &str| fedpool_name(peft, "bert.");
        assert_eq!(name(&format!("{PREFIX}bert.{q}.lora_A.weight")), Some(format!("{q}.lora_A.weight")));
        assert_eq!(name(&format!("{PREFIX}bert.{q}.lora_E")), Some(format!("{q}.lora_E.weight")));
        assert_eq!(name(&format!("{PREFIX}classifier.weight")), Some(HEAD_WEIGHT.into()));
        assert_eq!(name(&format!("{PREFIX}classifier.modules_to_save.default.bias")), Some(HEAD_BIAS.into()));
        assert_eq!(name(&format!("{PREFIX}bert.{q}.ranknum")), None);
        assert_eq!(name("model.layers.0.q_proj.lora_A.weight"), None);
        let v = "model.layers.3.self_attn.v_proj";
        assert_eq!(fedpool_name(&format!("{PREFIX}{v}.lora_B.weight"), ""), Some(format!("{v}.lora_B.weight")));
    }
}
