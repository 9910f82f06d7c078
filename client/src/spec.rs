//! The adapter pool spec for a backbone: which adapter, at which points, with which sizes.
//!
//! [`pool_spec`] turns a [`BertConfig`] and the user's [`AdapterOptions`] into the
//! [`PoolSpec`] that names and shapes every trainable tensor (see `fedpool_common::adapter`).

use std::fmt;
use std::str::FromStr;

use fedpool_common::adapter::{HeadSpec, PoolSpec, Pooling, TargetSpec, FEDINS_POOL_SIZE, FEDINS_TOP_K};

use crate::model::{AdapterPoints, BertConfig};

/// LoRA rank used when none is given (AdaLoRA's initial rank in the GLUE runs of Zhang et al. 2023
/// is of this order; 8 is also HF PEFT's default `r`).
pub const DEFAULT_LORA_RANK: usize = 8;
/// LoRA α used when none is given: α = 2r, so ΔW is scaled by α / r = 2.
pub const DEFAULT_LORA_ALPHA: f32 = 16.0;
/// Modules LoRA adapts by default in every layer: the query and value projections (Hu et al. 2021,
/// section 7.1: adapting W_q and W_v is the best use of a small budget).
pub const DEFAULT_LORA_MODULES: [&str; 2] = ["attention.self.query", "attention.self.value"];

/// Modules LoRA adapts by default in a decoder: PEFT's default for Llama models.
pub const DEFAULT_DECODER_LORA_MODULES: [&str; 2] = ["q_proj", "v_proj"];

/// Which adapter to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterChoice {
    /// A FedIns pool of SSF slots selected per instance by key (Feng et al. 2023).
    SsfPool,
    /// Plain SSF: one slot, no keys, no selection (Lian et al. 2022).
    Ssf,
    /// LoRA in PEFT's standard form, ΔW = B·A·α/r (Hu et al. 2021).
    Lora,
    /// LoRA in AdaLoRA's SVD form (Zhang et al. 2023): the form rank budgets cut by triplet.
    AdaLora,
    /// The frozen backbone with only the classification head trained (a baseline).
    LinearProbe,
}

impl AdapterChoice {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [AdapterChoice; 5] = [Self::SsfPool, Self::Ssf, Self::Lora, Self::AdaLora, Self::LinearProbe];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SsfPool => "ssf-pool",
            Self::Ssf => "ssf",
            Self::Lora => "lora",
            Self::AdaLora => "adalora",
            Self::LinearProbe => "linear-probe",
        }
    }

    /// True when only the head is trained (the spec's SSF tensors stay at the identity).
    pub fn head_only(self) -> bool {
        self == Self::LinearProbe
    }
}

impl fmt::Display for AdapterChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An adapter name that is not one of [`AdapterChoice::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown adapter {0:?}: expected one of ssf-pool, ssf, lora, adalora, linear-probe")]
pub struct UnknownAdapter(pub String);

impl FromStr for AdapterChoice {
    type Err = UnknownAdapter;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| UnknownAdapter(s.to_string()))
    }
}

/// The user's adapter options; [`Default`] gives the papers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterOptions {
    /// Which adapter.
    pub choice: AdapterChoice,
    /// Slots per SSF pool (SSF pool only).
    pub pool_size: usize,
    /// Slots mixed per instance (SSF pool only).
    pub top_k: usize,
    /// LoRA's rank r (the constant `max_rank`, as in PEFT AdaLoRA).
    pub rank: usize,
    /// LoRA's α (ΔW is scaled by α / r).
    pub alpha: f32,
    /// LoRA's modules within each layer, e.g. `attention.self.query`.
    pub lora_modules: Vec<String>,
    /// The feature the classification head reads.
    pub pooling: Pooling,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        Self {
            choice: AdapterChoice::SsfPool,
            pool_size: FEDINS_POOL_SIZE,
            top_k: FEDINS_TOP_K,
            rank: DEFAULT_LORA_RANK,
            alpha: DEFAULT_LORA_ALPHA,
            lora_modules: DEFAULT_LORA_MODULES.iter().map(|m| m.to_string()).collect(),
            pooling: Pooling::Mean,
        }
    }
}

/// Adapter options that do not fit the backbone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("adapter options: {0}")]
pub struct OptionsError(pub String);

/// The pool spec for `config` with `options` and a head of `num_labels` classes.
///
/// SSF adapts every point of [`BertConfig::ssf_points`] (the linear probe uses the same spec with
/// the SSF left at the identity); LoRA adapts every layer's `lora_modules`. The keys of an SSF pool
/// have the width of the pooled feature (the hidden size).
pub fn pool_spec(config: &BertConfig, options: &AdapterOptions, num_labels: usize) -> Result<PoolSpec, OptionsError> {
    let head = Some(HeadSpec { pooling: options.pooling, ..HeadSpec::new(config.hidden_size, num_labels) });
    spec_with_head(config, options, head)
}

/// The pool spec of a decoder's causal-LM adapters (no head): SSF at every point, LoRA on every
/// layer's `lora_modules` (`q_proj`, `self_attn.v_proj`, …; the encoder's default modules, which
/// a decoder does not have, stand for the decoder's, [`DEFAULT_DECODER_LORA_MODULES`]). The
/// linear probe has nothing to train.
pub fn decoder_pool_spec(config: &dyn AdapterPoints, options: &AdapterOptions) -> Result<PoolSpec, OptionsError> {
    if options.choice == AdapterChoice::LinearProbe {
        return Err(OptionsError("a causal LM has no head: the linear probe trains nothing".into()));
    }
    if options.lora_modules == DEFAULT_LORA_MODULES.map(String::from) {
        let options =
            AdapterOptions { lora_modules: DEFAULT_DECODER_LORA_MODULES.map(String::from).to_vec(), ..options.clone() };
        return spec_with_head(config, &options, None);
    }
    spec_with_head(config, options, None)
}

/// The pool spec over `config`'s points with `options` and `head`.
fn spec_with_head(
    config: &dyn AdapterPoints,
    options: &AdapterOptions,
    head: Option<HeadSpec>,
) -> Result<PoolSpec, OptionsError> {
    let ssf_targets = || {
        config.ssf_points().into_iter().map(|p| TargetSpec { name: p.name, dim_in: p.dim, dim_out: p.dim }).collect()
    };
    let spec = match options.choice {
        AdapterChoice::SsfPool => {
            PoolSpec::ssf_pool(ssf_targets(), config.hidden_size(), options.pool_size, options.top_k, head)
        }
        AdapterChoice::Ssf | AdapterChoice::LinearProbe => PoolSpec::ssf(ssf_targets(), head),
        AdapterChoice::Lora | AdapterChoice::AdaLora => {
            let all = config.lora_targets();
            for module in &options.lora_modules {
                if !all.iter().any(|t| t.name.ends_with(&format!(".{module}"))) {
                    // The first layer's modules, without the layer path (`encoder.layer.0.`).
                    let known: Vec<String> =
                        all.iter().filter_map(|t| t.name.split_once(".0.").map(|(_, m)| m.to_string())).collect();
                    return Err(OptionsError(format!(
                        "unknown LoRA module {module:?}; this model has {}",
                        known.join(", ")
                    )));
                }
            }
            let targets = all
                .into_iter()
                .filter(|t| options.lora_modules.iter().any(|m| t.name.ends_with(&format!(".{m}"))))
                .map(|t| TargetSpec { name: t.name, dim_in: t.d_in, dim_out: t.d_out })
                .collect();
            if options.choice == AdapterChoice::Lora {
                PoolSpec::lora(targets, options.rank, options.alpha, head)
            } else {
                PoolSpec::adalora(targets, options.rank, options.alpha, head)
            }
        }
    };
    spec.validate().map_err(|e| OptionsError(e.0))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_follow_the_backbone() {
        let cfg = BertConfig::tiny();
        let opts = AdapterOptions::default();
        let pool = pool_spec(&cfg, &opts, 3).unwrap();
        assert_eq!(pool.targets.len(), cfg.ssf_points().len());
        assert_eq!((pool.pool_size, pool.top_k, pool.key_dim), (25, 3, cfg.hidden_size));

        let lora = pool_spec(&cfg, &AdapterOptions { choice: AdapterChoice::Lora, ..opts.clone() }, 3).unwrap();
        assert_eq!(lora.targets.len(), 2 * cfg.num_hidden_layers);
        assert!(lora.targets.iter().all(|t| t.name.ends_with(".query") || t.name.ends_with(".value")));

        let bad = AdapterOptions { choice: AdapterChoice::Lora, lora_modules: vec!["attention.qkv".into()], ..opts };
        let err = pool_spec(&cfg, &bad, 3).unwrap_err().to_string();
        assert!(err.contains("attention.qkv") && err.contains("attention.self.query"), "{err}");
    }

    #[test]
    fn decoder_specs_have_no_head_and_name_their_modules() {
        let cfg = crate::model::LlamaConfig::tiny();
        let opts = AdapterOptions {
            choice: AdapterChoice::Lora,
            lora_modules: DEFAULT_DECODER_LORA_MODULES.map(String::from).to_vec(),
            ..AdapterOptions::default()
        };
        let lora = decoder_pool_spec(&cfg, &opts).unwrap();
        assert!(lora.head.is_none());
        assert_eq!(lora.targets.len(), 2 * cfg.num_hidden_layers);
        assert_eq!(lora.targets[1].name, "model.layers.0.self_attn.v_proj");
        let pool =
            decoder_pool_spec(&cfg, &AdapterOptions { pool_size: 4, top_k: 2, ..AdapterOptions::default() }).unwrap();
        assert_eq!((pool.targets.len(), pool.key_dim), (cfg.ssf_points().len(), cfg.hidden_size));
        let bad = AdapterOptions { lora_modules: vec!["query".into()], ..opts.clone() };
        let err = decoder_pool_spec(&cfg, &bad).unwrap_err().to_string();
        assert!(
            err.contains("\"query\"") && err.contains("self_attn.q_proj") && err.contains("mlp.down_proj"),
            "{err}"
        );
        let defaults = AdapterOptions { choice: AdapterChoice::Lora, ..AdapterOptions::default() };
        assert_eq!(
            decoder_pool_spec(&cfg, &defaults).unwrap(),
            lora,
            "the encoder's default modules mean q_proj, v_proj"
        );
        let probe = AdapterOptions { choice: AdapterChoice::LinearProbe, ..opts };
        assert!(decoder_pool_spec(&cfg, &probe).is_err());
    }

    #[test]
    fn adapter_names_round_trip() {
        for c in AdapterChoice::ALL {
            assert_eq!(c.name().parse::<AdapterChoice>().unwrap(), c);
        }
        assert!("adapter".parse::<AdapterChoice>().is_err());
    }
}
