//! Codec throughput on a 10 M-parameter delta, next to a plain memcpy of the same bytes measured
//! in the same run. Prints a table: `cargo bench -p fedpool-common --bench codec`.
//!
//! Throughput is fp32 input bytes per second (40 MB per pass); each number is the best of
//! `REPEATS` passes. Size is the exact encoded message size (`EncodedDelta::wire_len`) as a
//! percentage of the fp32 delta.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use fedpool_common::adapter::PoolDelta;
use fedpool_common::codec::{decode, encode, CodecConfig, DecodeLimits, ErrorFeedback, Quantization};
use fedpool_common::{HostTensor, Sha256, SpecHash};
use rand::{Rng, SeedableRng};

const PARAMS: usize = 10_000_000;
const REPEATS: usize = 3;

fn best_of<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..REPEATS {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        out = Some(black_box(v));
    }
    (best, out.expect("REPEATS > 0"))
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// A delta shaped like a real one: 26 tensors of ~385 K values, roughly Gaussian with per-tensor
/// scales spanning two orders of magnitude.
fn delta() -> PoolDelta {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let per = PARAMS / 26;
    let mut tensors = BTreeMap::new();
    let mut left = PARAMS;
    for i in 0..26 {
        let n = if i == 25 { left } else { per };
        left -= n;
        let scale = 10f32.powf(-3.0 + 2.0 * i as f32 / 25.0);
        let data =
            (0..n).map(|_| (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5) * scale).collect();
        tensors.insert(format!("encoder.layer.{i}.ssf_scale"), HostTensor::new(vec![n], data).expect("sizes match"));
    }
    PoolDelta { spec_hash: SpecHash(Sha256::of(b"bench")), slots: None, tensors }
}

fn main() {
    let d = delta();
    let fp32_bytes = PARAMS * 4;
    let flat: Vec<f32> = d.tensors.values().flat_map(|t| t.data().iter().copied()).collect();
    let (memcpy, _) = best_of(|| flat.clone());
    let memcpy_gbps = gbps(fp32_bytes, memcpy);

    let schemes = [
        CodecConfig::default(),
        CodecConfig { zstd_level: Some(3), ..Default::default() },
        CodecConfig { quantization: Quantization::Int8, ..Default::default() },
        CodecConfig { quantization: Quantization::Int4, ..Default::default() },
        CodecConfig { top_k: Some(0.1), quantization: Quantization::Int8, ..Default::default() },
        CodecConfig { top_k: Some(0.1), quantization: Quantization::Int8, zstd_level: Some(3), ..Default::default() },
        CodecConfig { top_k: Some(0.01), quantization: Quantization::Int4, ..Default::default() },
    ];
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("codec benchmark: {PARAMS} parameters ({:.0} MB fp32), best of {REPEATS}", fp32_bytes as f64 / 1e6);
    println!("machine: {cpu}, {cores} cores; command: cargo bench -p fedpool-common --bench codec");
    println!("memcpy of the same bytes: {memcpy_gbps:.2} GB/s\n");
    println!("| scheme | size (% of fp32) | encode GB/s | decode GB/s | encode / memcpy | decode / memcpy |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for cfg in schemes {
        // Error feedback on, as a client would run it (it costs one extra pass over the delta).
        let mut fb = ErrorFeedback::new();
        let (enc_t, enc) = best_of(|| encode(&d, &cfg, Some(&mut fb), 1).expect("encode"));
        let (dec_t, out) =
            best_of(|| decode(&enc, &DecodeLimits { max_values: 1 << 30, max_raw_bytes: 1 << 32 }).expect("decode"));
        assert_eq!(out.num_values(), PARAMS);
        let size = enc.wire_len() as f64 / fp32_bytes as f64 * 100.0;
        let (e, dd) = (gbps(fp32_bytes, enc_t), gbps(fp32_bytes, dec_t));
        println!(
            "| {} | {size:.2}% | {e:.3} | {dd:.3} | {:.3} | {:.3} |",
            cfg.describe(),
            e / memcpy_gbps,
            dd / memcpy_gbps
        );
    }
}
