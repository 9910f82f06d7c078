//! The fused kernels change nothing but speed: on a random tiny model, [`Kernels::Fused`] gives
//! the same pooled embeddings, the same hidden states at every real token and the same adapter
//! gradients as [`Kernels::Composed`] (candle's composed ops), for every hook layout the trainer
//! and the simulator use: none, shared SSF, per-row SSF (packed tokens), shared LoRA (packed), and
//! per-row LoRA (padded rows attended by length). A non-prefix mask takes the padding-bias path.

use crate::support;

use candle_core::{Device, Tensor, Var};
use fedpool_client::model::{BertEncoder, Hooks, Kernels, Lora, Ssf};
use support::{max_abs_diff, random_tensor, tiny_inputs};

/// Relative tolerance between the two implementations (f32, different summation orders).
const TOLERANCE: f32 = 2e-5;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    None,
    SharedSsf,
    PerRowSsf,
    SharedLora,
    PerRowLora,
}

/// Hooks of `layout` for a batch of `batch` rows, as `Var`s (so that gradients can be compared).
fn hooks(model: &BertEncoder, layout: Layout, batch: usize) -> (Hooks, Vec<(String, Var)>) {
    let cfg = model.config();
    let mut hooks = Hooks::new();
    let mut vars = Vec::new();
    let mut var = |name: String, t: Tensor| {
        let v = Var::from_tensor(&t).unwrap();
        vars.push((name, v.clone()));
        v.as_tensor().clone()
    };
    let rows = if layout == Layout::PerRowSsf { batch } else { 1 };
    if matches!(layout, Layout::SharedSsf | Layout::PerRowSsf) {
        for (i, point) in cfg.ssf_points().into_iter().enumerate() {
            let seed = 10 + 2 * i as u64;
            let scale = var(format!("{} γ", point.name), random_tensor(&[rows, point.dim], seed, 1.0, 0.3));
            let shift = var(format!("{} β", point.name), random_tensor(&[rows, point.dim], seed + 1, 0.0, 0.3));
            hooks.set_ssf(point.name, Ssf::new(scale, shift));
        }
    }
    if matches!(layout, Layout::SharedLora | Layout::PerRowLora) {
        let lead: Vec<usize> = if layout == Layout::PerRowLora { vec![batch] } else { vec![] };
        let dims = |rest: &[usize]| [lead.as_slice(), rest].concat();
        for (i, target) in cfg.lora_targets().into_iter().enumerate() {
            let seed = 500 + 3 * i as u64;
            let p = var(format!("{} P", target.name), random_tensor(&dims(&[target.d_out, 4]), seed, 0.0, 0.5));
            let l = var(format!("{} λ", target.name), random_tensor(&dims(&[4]), seed + 1, 0.0, 0.5));
            let q = var(format!("{} Q", target.name), random_tensor(&dims(&[4, target.d_in]), seed + 2, 0.0, 0.5));
            hooks.set_lora(target.name, Lora::new(p, l, q, 2.0));
        }
    }
    (hooks, vars)
}

fn relative(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / largest_abs(b).max(1e-6)
}

fn compare(model: &BertEncoder, ids: &Tensor, mask: &Tensor, layout: Layout) {
    let batch = ids.dim(0).unwrap();
    let (hooks, vars) = hooks(model, layout, batch);
    let fused = model.clone().with_kernels(Kernels::Fused);
    let composed = model.clone().with_kernels(Kernels::Composed);
    let pooled = |m: &BertEncoder| m.pooled(ids, mask, &hooks).unwrap();
    let (pf, pc) = (pooled(&fused), pooled(&composed));
    let d = relative(&pf, &pc);
    assert!(d < TOLERANCE, "{layout:?}: pooled embeddings differ by {d:e} (relative)");

    // Hidden states at real tokens (padding positions are 0 on the fused path, never computed).
    let real = mask.to_dtype(candle_core::DType::F32).unwrap().unsqueeze(2).unwrap();
    let hidden = |m: &BertEncoder| m.forward(ids, mask, &hooks).unwrap().broadcast_mul(&real).unwrap();
    let d = relative(&hidden(&fused), &hidden(&composed));
    assert!(d < TOLERANCE, "{layout:?}: hidden states differ by {d:e} (relative)");

    // Gradients of every hook tensor through a nonlinear loss of the pooled output, each held to
    // its own size or, when small, to a thousandth of the run's largest. The key shifts' are 0 in
    // exact arithmetic (a shift of every key by one vector leaves the softmax unchanged).
    let upstream = random_tensor(pf.dims(), 99, 0.0, 1.0);
    let loss = |p: &Tensor| (p.tanh().unwrap() * &upstream).unwrap().sum_all().unwrap();
    let (gf, gc) = (loss(&pf).backward().unwrap(), loss(&pc).backward().unwrap());
    let pairs: Vec<(&String, &Tensor, &Tensor)> = vars
        .iter()
        .map(|(name, v)| {
            let a = gf.get(v.as_tensor()).unwrap_or_else(|| panic!("{layout:?}: no fused gradient for {name}"));
            (name, a, gc.get(v.as_tensor()).unwrap())
        })
        .collect();
    let largest = pairs.iter().map(|(_, _, b)| largest_abs(b)).fold(0.0f32, f32::max);
    for (name, a, b) in pairs {
        if name.ends_with("attention.self.key β") {
            // Zero in exact arithmetic: both are rounding noise.
            let noise = largest_abs(a).max(largest_abs(b)) / largest;
            assert!(noise < 1e-5, "{layout:?}: the key shift {name} got a gradient of {noise:e} (relative)");
            continue;
        }
        let d = max_abs_diff(a, b) / largest_abs(b).max(1e-3 * largest).max(1e-12);
        assert!(d < TOLERANCE, "{layout:?}: gradient of {name} differs by {d:e} (relative)");
    }
}

fn largest_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn fused_kernels_give_the_composed_outputs_and_gradients_for_every_hook_layout() {
    let (_dir, model) = support::tiny_model(7);
    let (ids, mask) = tiny_inputs();
    for layout in [Layout::None, Layout::SharedSsf, Layout::PerRowSsf, Layout::SharedLora, Layout::PerRowLora] {
        compare(&model, &ids, &mask, layout);
    }
}

#[test]
fn a_mask_with_holes_takes_the_padding_bias_path_with_the_same_result() {
    let (_dir, model) = support::tiny_model(8);
    let (ids, _) = tiny_inputs();
    // Row 0 has a masked token in the middle: not a prefix mask, so no packing.
    let mut mask = vec![1u32; 21];
    for i in [3, 11, 12, 13, 20] {
        mask[i] = 0;
    }
    let mask = Tensor::from_vec(mask, (3, 7), &Device::Cpu).unwrap();
    compare(&model, &ids, &mask, Layout::PerRowSsf);
}

#[test]
fn fused_is_the_default_and_padding_positions_are_zero() {
    let (_dir, model) = support::tiny_model(9);
    assert_eq!(model.kernels(), Kernels::Fused);
    let (ids, mask) = tiny_inputs();
    let hidden = model.forward(&ids, &mask, &Hooks::new()).unwrap();
    // Row 1's last three tokens are padding.
    let padding = hidden.get(1).unwrap().narrow(0, 4, 3).unwrap();
    assert_eq!(padding.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}
