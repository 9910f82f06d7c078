//! AdaLoRA importance follows its EMA formulas; the orthogonality regulariser vanishes on
//! orthonormal factors.

use crate::train_support;

use candle_core::Device;
use fedpool_client::model::BertConfig;
use fedpool_client::spec::{pool_spec, AdapterChoice, AdapterOptions};
use fedpool_client::train::{
    orthogonality, train, AdapterTensors, ImportanceTracker, QueryCache, Silent, TrainConfig, TrainData, ADALORA_BETA1,
    ADALORA_BETA2,
};
use fedpool_common::adapter::{AdapterPool, PoolSpec, TargetSpec};
use fedpool_common::tensor::HostTensor;
use train_support::{load, separable, tiny_model_dir};

/// One target, rank 2, d_in 3, d_out 2.
fn small_spec() -> PoolSpec {
    PoolSpec::adalora(vec![TargetSpec { name: "t".into(), dim_in: 3, dim_out: 2 }], 2, 4.0, None)
}

#[test]
fn one_step_scores_follow_the_ema_formulas() {
    let mut tracker = ImportanceTracker::new(&small_spec()).unwrap();
    // Element sensitivities I = |w·∇w| of one step.
    let a = [1.0f32, 2.0, 3.0, 0.0, 0.5, 1.0]; // Q: [2, 3]
    let e = [2.0f32, 4.0]; // λ: [2, 1]
    let b = [1.0f32, 0.0, 3.0, 2.0]; // P: [2, 2], row-major [d_out, r]
    tracker.update_element("t.lora_A.weight", &a);
    tracker.update_element("t.lora_E.weight", &e);
    tracker.update_element("t.lora_B.weight", &b);
    // From zero: Ī = (1−β₁)I, Ū = (1−β₂)|I − Ī| = (1−β₂)β₁I, s = Ī·Ū.
    let s = |i: f32| (1.0 - ADALORA_BETA1) * i * (1.0 - ADALORA_BETA2) * ADALORA_BETA1 * i;
    let mean = |v: &[f32]| v.iter().map(|&i| s(i)).sum::<f32>() / v.len() as f32;
    let expected = [s(e[0]) + mean(&a[0..3]) + mean(&[b[0], b[2]]), s(e[1]) + mean(&a[3..6]) + mean(&[b[1], b[3]])];
    let scores = tracker.scores();
    assert_eq!(scores.len(), 1);
    assert_eq!(scores[0].target, "t");
    for (got, want) in scores[0].scores.iter().zip(expected) {
        assert!((got - want).abs() < 1e-6 * want.max(1.0), "{:?} vs {expected:?}", scores[0].scores);
    }

    // A second step: Ī₂ = β₁Ī₁ + (1−β₁)I₂, Ū₂ = β₂Ū₁ + (1−β₂)|I₂ − Ī₂|.
    let i2 = [1.0f32, 3.0];
    tracker.update_element("t.lora_E.weight", &i2);
    let after = tracker.scores();
    for k in 0..2 {
        let bar1 = (1.0 - ADALORA_BETA1) * e[k];
        let unc1 = (1.0 - ADALORA_BETA2) * (e[k] - bar1).abs();
        let bar2 = ADALORA_BETA1 * bar1 + (1.0 - ADALORA_BETA1) * i2[k];
        let unc2 = ADALORA_BETA2 * unc1 + (1.0 - ADALORA_BETA2) * (i2[k] - bar2).abs();
        let others = expected[k] - s(e[k]);
        let want = bar2 * unc2 + others;
        assert!((after[0].scores[k] - want).abs() < 1e-6, "rank {k}: {} vs {want}", after[0].scores[k]);
    }
}

#[test]
fn training_returns_one_finite_score_per_triplet() {
    let dir = tiny_model_dir(6);
    let model = load(dir.path());
    let options = AdapterOptions { choice: AdapterChoice::AdaLora, rank: 4, ..Default::default() };
    let spec = pool_spec(&BertConfig::tiny(), &options, 2).unwrap();
    let start = AdapterPool::init(&spec, 1).unwrap();
    let examples = separable(32, 2, 3);
    let config = TrainConfig { steps: 3, batch_size: 8, lr: 1e-2, warmup_steps: 0, ..Default::default() };
    let data = TrainData { train: &examples, eval: &[], pad_id: 0 };
    let out = train(&model, &spec, &start, data, &mut QueryCache::new(32), &config, &mut Silent).unwrap();
    assert_eq!(out.importance.len(), spec.targets.len());
    for (imp, target) in out.importance.iter().zip(&spec.targets) {
        assert_eq!(imp.target, target.name);
        assert_eq!(imp.scores.len(), 4);
        assert!(imp.scores.iter().all(|s| s.is_finite() && *s >= 0.0), "{imp:?}");
    }
    assert!(out.importance.iter().flat_map(|i| &i.scores).any(|&s| s > 0.0));
    out.delta.validate(&spec).unwrap();
}

#[test]
fn orthogonality_regulariser_is_zero_for_orthonormal_factors() {
    let spec = small_spec();
    let mut pool = AdapterPool::init(&spec, 1).unwrap();
    // Q = first two rows of I₃ (QQᵀ = I₂); P = a rotation (PᵀP = I₂).
    pool.tensors.insert("t.lora_A.weight".into(), HostTensor::new(vec![2, 3], vec![1., 0., 0., 0., 1., 0.]).unwrap());
    let (c, s) = (0.6f32, 0.8f32);
    pool.tensors.insert("t.lora_B.weight".into(), HostTensor::new(vec![2, 2], vec![c, -s, s, c]).unwrap());
    let reg = orthogonality(&AdapterTensors::from_pool(&spec, &pool, false, &Device::Cpu).unwrap()).unwrap();
    assert!(reg.to_scalar::<f32>().unwrap().abs() < 1e-5);

    // Scaling Q by 2: QQᵀ − I = 3·I₂, ‖·‖_F = 3·√2; P still orthonormal; mean over the 2 matrices.
    pool.tensors.insert("t.lora_A.weight".into(), HostTensor::new(vec![2, 3], vec![2., 0., 0., 0., 2., 0.]).unwrap());
    let reg = orthogonality(&AdapterTensors::from_pool(&spec, &pool, false, &Device::Cpu).unwrap()).unwrap();
    assert!((reg.to_scalar::<f32>().unwrap() - 3.0 * 2f32.sqrt() / 2.0).abs() < 1e-4);
}
