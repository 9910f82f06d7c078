//! Property tests of the delta codec: quantization error bounds, unbiased stochastic rounding,
//! exact error feedback, round trips, and digest checks.

use std::collections::BTreeMap;

use fedpool_common::adapter::{PoolDelta, SlotUsage};
use fedpool_common::codec::{decode, encode, CodecConfig, CodecError, DecodeLimits, ErrorFeedback, Quantization};
use fedpool_common::{HostTensor, Sha256, SpecHash};
use proptest::prelude::*;

fn spec_hash() -> SpecHash {
    SpecHash(Sha256::of(b"test spec"))
}

fn one_tensor(values: Vec<f32>) -> PoolDelta {
    let n = values.len();
    let tensors = BTreeMap::from([("w".to_string(), HostTensor::new(vec![n], values).unwrap())]);
    PoolDelta { spec_hash: spec_hash(), slots: None, tensors }
}

fn quantized(q: Quantization, block: u32) -> CodecConfig {
    CodecConfig { quantization: q, block_size: block, ..Default::default() }
}

/// Values with a wide dynamic range, including exact zeros and a few large outliers.
fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(prop_oneof![4 => -1.0f32..1.0, 1 => Just(0.0f32), 1 => -100.0f32..100.0], 1..max_len)
}

fn check_block_error(q: Quantization, levels: f32, v: &[f32], block: u32, seed: u64) {
    let d = one_tensor(v.to_vec());
    let out = decode(&encode(&d, &quantized(q, block), None, seed).unwrap(), &DecodeLimits::default()).unwrap();
    let got = out.tensors["w"].data();
    for (b, (orig, dec)) in v.chunks(block as usize).zip(got.chunks(block as usize)).enumerate() {
        let absmax = orig.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let bound = absmax / levels * (1.0 + 1e-5) + f32::MIN_POSITIVE;
        for (i, (o, x)) in orig.iter().zip(dec).enumerate() {
            assert!((o - x).abs() <= bound, "block {b} elem {i}: |{o} - {x}| > absmax {absmax} / {levels}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn int8_error_is_at_most_block_absmax_over_127(v in values(600), block in prop::sample::select(vec![1u32, 7, 64, 256]), seed: u64) {
        check_block_error(Quantization::Int8, 127.0, &v, block, seed);
    }

    #[test]
    fn int4_error_is_at_most_block_absmax_over_7(v in values(600), block in prop::sample::select(vec![1u32, 7, 64, 256]), seed: u64) {
        check_block_error(Quantization::Int4, 7.0, &v, block, seed);
    }

    #[test]
    fn encode_decode_round_trips_names_shapes_and_slots(
        rows in 1usize..6, width in 1usize..40, ntensors in 1usize..5, seed: u64,
        q in prop::sample::select(vec![Quantization::F32, Quantization::Int8, Quantization::Int4]),
        top_k in prop::option::of(0.05f32..1.0), zstd in prop::option::of(1i32..5),
    ) {
        let mut tensors = BTreeMap::new();
        for t in 0..ntensors {
            let data = (0..rows * width).map(|i| ((i * 31 + t * 7) % 17) as f32 - 8.0).collect();
            tensors.insert(format!("layer.{t}.ssf_scale"), HostTensor::new(vec![rows, width], data).unwrap());
        }
        let slots = SlotUsage { slots: (0..rows as u32).map(|s| s * 2).collect(), counts: vec![3; rows] };
        let d = PoolDelta { spec_hash: spec_hash(), slots: Some(slots), tensors };
        let cfg = CodecConfig { top_k, quantization: q, zstd_level: zstd, ..Default::default() };
        let out = decode(&encode(&d, &cfg, None, seed).unwrap(), &DecodeLimits::default()).unwrap();
        prop_assert_eq!(&out.slots, &d.slots);
        prop_assert_eq!(out.spec_hash, d.spec_hash);
        prop_assert_eq!(out.tensors.keys().collect::<Vec<_>>(), d.tensors.keys().collect::<Vec<_>>());
        for (name, t) in &d.tensors {
            prop_assert_eq!(out.tensors[name].shape(), t.shape());
        }
        if q == Quantization::F32 && top_k.is_none() {
            prop_assert_eq!(out, d);
        }
    }

    #[test]
    fn top_k_with_error_feedback_transmits_everything_eventually(
        rounds in prop::collection::vec(values(200), 1..8),
        frac in 0.01f32..0.5,
        q in prop::sample::select(vec![Quantization::F32, Quantization::Int8, Quantization::Int4]),
        seed: u64,
    ) {
        // Each round's delta has the first round's length (the tensor's shape is stable).
        let n = rounds[0].len();
        let cfg = CodecConfig { top_k: Some(frac), quantization: q, ..Default::default() };
        let mut fb = ErrorFeedback::new();
        let mut true_sum = vec![0.0f64; n];
        let mut sent_sum = vec![0.0f64; n];
        for (r, v) in rounds.iter().enumerate() {
            let v: Vec<f32> = (0..n).map(|i| v.get(i).copied().unwrap_or(0.25)).collect();
            v.iter().enumerate().for_each(|(i, x)| true_sum[i] += f64::from(*x));
            let enc = encode(&one_tensor(v), &cfg, Some(&mut fb), seed.wrapping_add(r as u64)).unwrap();
            let sent = decode(&enc, &DecodeLimits::default()).unwrap();
            sent.tensors["w"].data().iter().enumerate().for_each(|(i, x)| sent_sum[i] += f64::from(*x));
        }
        let residual = fb.tensors()["w"].data();
        for i in 0..n {
            let lhs = sent_sum[i] + f64::from(residual[i]);
            let scale = true_sum[i].abs().max(1.0) * rounds.len() as f64;
            prop_assert!((lhs - true_sum[i]).abs() <= 1e-4 * scale, "elem {}: sent {} + residual {} != true {}", i, sent_sum[i], residual[i], true_sum[i]);
        }
    }

    #[test]
    fn a_flipped_payload_byte_is_caught_by_the_digest(v in values(300), pos in any::<prop::sample::Index>(), bit in 0u8..8, zstd in prop::option::of(1i32..4)) {
        let cfg = CodecConfig { quantization: Quantization::Int8, zstd_level: zstd, ..Default::default() };
        let mut enc = encode(&one_tensor(v), &cfg, None, 1).unwrap();
        let i = pos.index(enc.payload.len());
        let mut payload = enc.payload.to_vec();
        payload[i] ^= 1 << bit;
        enc.payload = payload.into();
        prop_assert!(matches!(decode(&enc, &DecodeLimits::default()), Err(CodecError::DigestMismatch)));
    }
}

#[test]
fn stochastic_rounding_is_unbiased() {
    // One value at 0.3 of a quantization step, rounded under 4,000 seeds: the mean of the decoded
    // values converges to the true value (standard error ≈ step·0.46/√4000 ≈ 0.0073 step).
    let block = vec![1.0f32, 0.3 / 127.0, -0.77 / 127.0, 0.5 / 127.0];
    let seeds = 4000;
    let mut sums = [0.0f64; 4];
    for seed in 0..seeds {
        let out = decode(
            &encode(&one_tensor(block.clone()), &quantized(Quantization::Int8, 64), None, seed).unwrap(),
            &DecodeLimits::default(),
        )
        .unwrap();
        out.tensors["w"].data().iter().enumerate().for_each(|(i, x)| sums[i] += f64::from(*x));
    }
    let step = 1.0 / 127.0;
    for (i, want) in block.iter().enumerate() {
        let mean = sums[i] / seeds as f64;
        let err_in_steps = (mean - f64::from(*want)).abs() / step;
        assert!(err_in_steps < 0.04, "value {i}: mean {mean} vs {want}, bias {err_in_steps:.4} steps");
    }
    // Deterministic rounding would be biased by 0.3 step on the second value.
}

#[test]
fn stochastic_rounding_depends_on_the_seed_only() {
    let d = one_tensor((0..500).map(|i| (i as f32 * 0.37).sin()).collect());
    let cfg = quantized(Quantization::Int4, 64);
    assert_eq!(encode(&d, &cfg, None, 9).unwrap(), encode(&d, &cfg, None, 9).unwrap());
    assert_ne!(encode(&d, &cfg, None, 9).unwrap().payload, encode(&d, &cfg, None, 10).unwrap().payload);
}

#[test]
fn tampered_scheme_or_length_is_caught_by_the_digest() {
    let mut enc = encode(&one_tensor(vec![1.0, 2.0, 3.0]), &CodecConfig::default(), None, 0).unwrap();
    enc.config.zstd_level = Some(3);
    assert!(matches!(decode(&enc, &DecodeLimits::default()), Err(CodecError::DigestMismatch)));
    let mut enc = encode(&one_tensor(vec![1.0, 2.0, 3.0]), &CodecConfig::default(), None, 0).unwrap();
    enc.raw_len += 1;
    assert!(matches!(decode(&enc, &DecodeLimits::default()), Err(CodecError::DigestMismatch)));
}
