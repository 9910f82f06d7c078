//! Adapter hooks on a random tiny model: identity hooks change nothing, every adapter parameter
//! is trained (gets a gradient), LoRA merges exactly, per-row SSF is per row, bad hooks are errors.

use crate::support;

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use fedpool_client::model::{BertConfig, BertEncoder, Hooks, Lora, ModelError, Ssf};
use support::{max_abs_diff, random_tensor, tiny_inputs, tiny_model, values};

const LORA_RANK: usize = 4;
/// α / r with α = 8.
const LORA_SCALING: f64 = 8.0 / LORA_RANK as f64;

fn random_lora(d_in: usize, d_out: usize, seed: u64) -> Lora {
    Lora::new(
        random_tensor(&[d_out, LORA_RANK], seed, 0.0, 0.5),
        random_tensor(&[LORA_RANK], seed + 1, 0.0, 0.5),
        random_tensor(&[LORA_RANK, d_in], seed + 2, 0.0, 0.5),
        LORA_SCALING,
    )
}

#[test]
fn identity_adapters_equal_frozen_backbone() {
    let (_dir, model) = tiny_model(7);
    let (ids, mask) = tiny_inputs();
    let cfg = model.config().clone();

    let mut hooks = Hooks::new();
    for point in cfg.ssf_points() {
        hooks.set_ssf(point.name, Ssf::identity(point.dim, &Device::Cpu).unwrap());
    }
    for (i, target) in cfg.lora_targets().into_iter().enumerate() {
        let mut lora = random_lora(target.d_in, target.d_out, 100 + 3 * i as u64);
        lora.lambda = Tensor::zeros(LORA_RANK, candle_core::DType::F32, &Device::Cpu).unwrap();
        hooks.set_lora(target.name, lora);
    }

    let frozen = model.forward(&ids, &mask, &Hooks::new()).unwrap();
    let adapted = model.forward(&ids, &mask, &hooks).unwrap();
    assert_eq!(values(&adapted), values(&frozen));
    let frozen = model.pooled(&ids, &mask, &Hooks::new()).unwrap();
    let adapted = model.pooled(&ids, &mask, &hooks).unwrap();
    assert_eq!(values(&adapted), values(&frozen));
}

#[test]
fn every_adapter_parameter_gets_a_gradient() {
    let (_dir, model) = tiny_model(7);
    let (ids, mask) = tiny_inputs();
    let cfg = model.config().clone();
    let batch = ids.dim(0).unwrap();

    let var = |t: Tensor| Var::from_tensor(&t).unwrap();
    let mut vars: Vec<(String, Var)> = Vec::new();
    let mut hooks = Hooks::new();
    for (i, point) in cfg.ssf_points().into_iter().enumerate() {
        let seed = 1000 + 2 * i as u64;
        let scale = var(random_tensor(&[batch, point.dim], seed, 1.0, 0.2));
        let shift = var(random_tensor(&[batch, point.dim], seed + 1, 0.0, 0.2));
        hooks.set_ssf(point.name.clone(), Ssf::new(scale.as_tensor().clone(), shift.as_tensor().clone()));
        vars.push((format!("{} scale", point.name), scale));
        vars.push((format!("{} shift", point.name), shift));
    }
    let mut lambdas = Vec::new();
    for (i, target) in cfg.lora_targets().into_iter().enumerate() {
        if !(target.name.ends_with(".query") || target.name.ends_with(".value")) {
            continue;
        }
        let lora = random_lora(target.d_in, target.d_out, 5000 + 3 * i as u64);
        let (p, lambda, q) = (var(lora.p), var(lora.lambda), var(lora.q));
        hooks.set_lora(
            target.name.clone(),
            Lora::new(p.as_tensor().clone(), lambda.as_tensor().clone(), q.as_tensor().clone(), LORA_SCALING),
        );
        lambdas.push((target.name.clone(), lambda.clone()));
        vars.push((format!("{} P", target.name), p));
        vars.push((format!("{} λ", target.name), lambda));
        vars.push((format!("{} Q", target.name), q));
    }
    assert_eq!(vars.len(), 2 * (1 + 8 * 2) + 3 * 2 * 2);

    let pooled = model.pooled(&ids, &mask, &hooks).unwrap();
    let projection = random_tensor(&[cfg.hidden_size, 4], 9, 0.0, 1.0);
    let loss = pooled.matmul(&projection).unwrap().sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();

    let norm = |name: &str, v: &Var| -> f32 {
        let g =
            grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (a fused op without backward?)"));
        values(g).iter().map(|x| x * x).sum::<f32>().sqrt()
    };
    let norms: HashMap<&str, f32> = vars.iter().map(|(name, v)| (name.as_str(), norm(name, v))).collect();
    for (name, n) in &norms {
        // Shifting every key by the same β adds q·β to every score of a query row, which softmax
        // ignores: the key shift's gradient is exactly 0 in exact arithmetic (round-off here).
        if name.ends_with("attention.self.key shift") {
            let key_scale = norms[name.replace(" shift", " scale").as_str()];
            assert!(*n < 1e-3 * key_scale, "{name}: {n} vs key scale {key_scale}");
        } else {
            assert!(*n > 0.0, "{name}: zero gradient");
        }
    }
    for (name, lambda) in &lambdas {
        let g = values(grads.get(lambda.as_tensor()).unwrap());
        assert!(g.iter().all(|x| *x != 0.0), "{name} λ: a zero element {g:?}");
    }
}

#[test]
fn lora_merged_equals_unmerged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BertConfig::tiny();
    fedpool_client::model::write_random_model(dir.path(), &cfg, 11).unwrap();
    let model = BertEncoder::load(dir.path(), &Device::Cpu).unwrap();
    let (ids, mask) = tiny_inputs();

    let file = dir.path().join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let mut hooks = Hooks::new();
    for (i, target) in cfg.lora_targets().into_iter().enumerate() {
        let lora = random_lora(target.d_in, target.d_out, 300 + 3 * i as u64);
        let name = format!("{}.weight", target.name);
        let merged = (&weights[&name] + lora.delta().unwrap()).unwrap();
        weights.insert(name, merged);
        hooks.set_lora(target.name, lora);
    }
    let merged_dir = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("config.json"), merged_dir.path().join("config.json")).unwrap();
    candle_core::safetensors::save(&weights, merged_dir.path().join("model.safetensors")).unwrap();
    let merged = BertEncoder::load(merged_dir.path(), &Device::Cpu).unwrap();

    let unmerged_out = model.forward(&ids, &mask, &hooks).unwrap();
    let merged_out = merged.forward(&ids, &mask, &Hooks::new()).unwrap();
    let frozen_out = model.forward(&ids, &mask, &Hooks::new()).unwrap();
    assert!(max_abs_diff(&unmerged_out, &frozen_out) > 1e-2, "the LoRA changes the output");
    let d = max_abs_diff(&unmerged_out, &merged_out);
    assert!(d < 1e-5, "merged vs unmerged: max |diff| {d}");
}

#[test]
fn per_row_ssf_equals_each_row_alone() {
    let (_dir, model) = tiny_model(3);
    let (ids, mask) = tiny_inputs();
    let cfg = model.config().clone();
    let batch = ids.dim(0).unwrap();
    let point = &cfg.ssf_points()[5];
    let scale = random_tensor(&[batch, point.dim], 21, 1.0, 0.5);
    let shift = random_tensor(&[batch, point.dim], 22, 0.0, 0.5);
    let mut hooks = Hooks::new();
    hooks.set_ssf(point.name.clone(), Ssf::new(scale.clone(), shift.clone()));
    let together = model.pooled(&ids, &mask, &hooks).unwrap();

    for row in 0..batch {
        let one = |t: &Tensor| t.narrow(0, row, 1).unwrap();
        let mut hooks = Hooks::new();
        hooks.set_ssf(point.name.clone(), Ssf::new(one(&scale), one(&shift)));
        let alone = model.pooled(&one(&ids), &one(&mask), &hooks).unwrap();
        let d = max_abs_diff(&one(&together), &alone);
        assert!(d < 1e-5, "row {row}: {d}");
    }
}

#[test]
fn misnamed_hook_is_an_error() {
    let (_dir, model) = tiny_model(3);
    let (ids, mask) = tiny_inputs();
    let mut hooks = Hooks::new();
    let typo = "encoder.layer.0.attention.self.querry";
    hooks.set_ssf(typo, Ssf::identity(32, &Device::Cpu).unwrap());
    let err = model.forward(&ids, &mask, &hooks).unwrap_err();
    assert!(matches!(err, ModelError::UnknownHook { .. }), "{err}");
    assert!(err.to_string().contains(typo), "{err}");

    // LayerNorm is an SSF point but not a linear layer: no LoRA there.
    let mut hooks = Hooks::new();
    let lora = random_lora(32, 32, 1);
    hooks.set_lora("encoder.layer.0.output.LayerNorm", lora);
    let err = model.forward(&ids, &mask, &hooks).unwrap_err();
    assert!(matches!(err, ModelError::UnknownHook { .. }), "{err}");
}

#[test]
fn hook_with_wrong_shape_is_an_error() {
    let (_dir, model) = tiny_model(3);
    let (ids, mask) = tiny_inputs();
    let point = "encoder.layer.1.intermediate.dense";

    let mut hooks = Hooks::new();
    hooks.set_ssf(point, Ssf::identity(32, &Device::Cpu).unwrap());
    let err = model.forward(&ids, &mask, &hooks).unwrap_err().to_string();
    assert!(err.contains(point) && err.contains("[1, 32]") && err.contains("64"), "{err}");

    let mut hooks = Hooks::new();
    let two_rows = random_tensor(&[2, 64], 1, 1.0, 0.1);
    hooks.set_ssf(point, Ssf::new(two_rows.clone(), two_rows));
    let err = model.forward(&ids, &mask, &hooks).unwrap_err().to_string();
    assert!(err.contains("[2, 64]") && err.contains("[3, 64]"), "{err}");

    let mut hooks = Hooks::new();
    hooks.set_lora(point, random_lora(64, 32, 1));
    let err = model.forward(&ids, &mask, &hooks).unwrap_err().to_string();
    assert!(err.contains(point) && err.contains("LoRA"), "{err}");
}
