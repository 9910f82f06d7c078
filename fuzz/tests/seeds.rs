//! The seeds reach deep: every committed seed is accepted all the way by its target (a seed
//! refused at the first check would leave the fuzzer to rediscover the format), and the helpers
//! the targets rely on agree with the crates (`cd fuzz && cargo test --no-default-features`;
//! with the default features the config seeds are run too).

use std::path::{Path, PathBuf};

use fedpool_common::adapter::AdapterPool;
use fedpool_common::checkpoint;
use fedpool_common::codec::{encode, CodecConfig, Quantization};
use fedpool_fuzz::*;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    let seeds: Vec<_> = read_seeds(&dir).into_iter().collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn all_accepted(target: &str, fuzz: fn(&[u8]) -> bool) {
    for (name, bytes) in seeds(target) {
        assert!(fuzz(&bytes), "{target}: seed {name} is not accepted all the way");
    }
}

#[test]
fn frame_seeds_decode_and_validate() {
    for (name, bytes) in seeds("frame") {
        // Control messages have nothing to validate beyond their decode.
        let deep = fuzz_frame(&bytes);
        let bulk = name.starts_with("update") || name.starts_with("task") || name.starts_with("eval");
        assert_eq!(deep, bulk, "frame: seed {name}");
    }
}

#[test]
fn codec_seeds_decode() {
    all_accepted("codec_decode", fuzz_codec);
}

#[test]
fn checkpoint_seeds_read_as_pools() {
    for (name, bytes) in seeds("checkpoint") {
        // The residual is a plain tensor file: it reads as tensors, not as a pool.
        let path = Path::new(&name);
        assert!(checkpoint::tensors_from_bytes(path, &bytes).is_ok(), "{name}");
        assert_eq!(fuzz_checkpoint(&bytes), name.starts_with("round-"), "checkpoint: seed {name}");
    }
}

#[cfg(feature = "config")]
#[test]
fn config_seeds_parse() {
    all_accepted("server_config", fuzz_server_config);
    all_accepted("client_config", fuzz_client_config);
}

#[test]
fn codec_input_reads_back_what_codec_seed_writes() {
    let [ssf, _] = specs();
    let delta = AdapterPool::init(&ssf, 1).unwrap().to_transfer(&ssf).unwrap();
    for cfg in [
        CodecConfig::default(),
        CodecConfig {
            top_k: Some(0.25),
            quantization: Quantization::Int4,
            block_size: 3,
            zstd_level: Some(5),
            ..CodecConfig::default()
        },
    ] {
        let enc = encode(&delta, &cfg, None, 0).unwrap();
        assert_eq!(codec_input(&codec_seed(&enc)).unwrap(), enc);
    }
}

#[test]
fn resealing_a_real_checkpoint_keeps_it_valid() {
    // The target's digest formula is the checkpoint module's: a real file stays readable.
    for spec in specs() {
        let bytes = checkpoint_bytes(&AdapterPool::init(&spec, 3).unwrap(), &spec, 2);
        let sealed = reseal_checkpoint(&bytes).unwrap();
        let path = Path::new("sealed");
        assert_eq!(
            checkpoint::pool_from_bytes(path, &sealed).unwrap(),
            checkpoint::pool_from_bytes(path, &bytes).unwrap()
        );
    }
}
