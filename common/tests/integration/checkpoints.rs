//! Checkpoints: bit-exact round trips, corrupted or truncated files refused by name, leftovers of
//! interrupted writes ignored.

use std::collections::BTreeMap;
use std::fs;

use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolSpec, TargetSpec};
use fedpool_common::checkpoint::*;
use fedpool_common::{BackboneFingerprint, HostTensor, Round, Sha256};

fn spec() -> PoolSpec {
    let targets = vec![
        TargetSpec { name: "encoder.layer.0.attention.self.query".into(), dim_in: 32, dim_out: 32 },
        TargetSpec { name: "encoder.layer.0.attention.self.value".into(), dim_in: 32, dim_out: 32 },
    ];
    PoolSpec::adalora(targets, 4, 8.0, Some(HeadSpec::new(32, 3)))
}

fn meta(round: u64) -> CheckpointMeta {
    CheckpointMeta::now(Round(round), spec(), BackboneFingerprint(Sha256::of(b"tiny-bert")))
}

fn pool() -> AdapterPool {
    let mut p = AdapterPool::init(&spec(), 5).unwrap();
    // Values that are not round numbers, including subnormals and negative zero.
    let e = p.tensors.get_mut("encoder.layer.0.attention.self.query.lora_E.weight").unwrap();
    e.data_mut().copy_from_slice(&[1e-40, -0.0, std::f32::consts::PI, -1.0e30]);
    p
}

#[test]
fn write_then_read_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint_path(dir.path(), Round(7));
    assert!(path.ends_with("round-000007.safetensors"));
    let (p, m) = (pool(), meta(7));
    write_pool(&path, &p, &m).unwrap();
    let (p2, m2) = read_pool(&path).unwrap();
    assert_eq!(m2, m);
    assert_eq!(p2.spec_hash, p.spec_hash);
    for (name, t) in &p.tensors {
        let bits = |t: &HostTensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p2.tensors[name]), bits(t), "{name}");
        assert_eq!(p2.tensors[name].shape(), t.shape());
    }
}

#[test]
fn a_flipped_byte_anywhere_is_refused_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint_path(dir.path(), Round(1));
    write_pool(&path, &pool(), &meta(1)).unwrap();
    let good = fs::read(&path).unwrap();
    // One position in the header, a few in the tensor data.
    for pos in [20, good.len() / 2, good.len() - 1, good.len() - 300] {
        let mut bad = good.clone();
        bad[pos] ^= 0x10;
        fs::write(&path, &bad).unwrap();
        let err = read_pool(&path).unwrap_err().to_string();
        assert!(err.contains("round-000001.safetensors"), "byte {pos}: {err}");
    }
}

#[test]
fn a_truncated_file_is_refused_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint_path(dir.path(), Round(2));
    write_pool(&path, &pool(), &meta(2)).unwrap();
    let good = fs::read(&path).unwrap();
    for len in [0, 4, 100, good.len() - 1] {
        fs::write(&path, &good[..len]).unwrap();
        let err = read_pool(&path).unwrap_err().to_string();
        assert!(err.contains("round-000002.safetensors"), "length {len}: {err}");
    }
}

#[test]
fn leftover_temp_files_are_ignored_and_corrupt_newest_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_pool(&checkpoint_path(dir.path(), Round(1)), &pool(), &meta(1)).unwrap();
    write_pool(&checkpoint_path(dir.path(), Round(2)), &pool(), &meta(2)).unwrap();
    // An interrupted write of round 3: only its temp file exists, half written.
    let good = fs::read(checkpoint_path(dir.path(), Round(2))).unwrap();
    fs::write(dir.path().join(".round-000003.safetensors.tmp.4242"), &good[..good.len() / 2]).unwrap();
    fs::write(dir.path().join("rounds.jsonl"), b"{}\n").unwrap();
    let listed: Vec<u64> = list_checkpoints(dir.path()).unwrap().iter().map(|(r, _)| r.0).collect();
    assert_eq!(listed, vec![1, 2]);
    let latest = latest_valid_pool(dir.path()).unwrap();
    assert_eq!(latest.checkpoint.unwrap().meta.round, Round(2));
    assert!(latest.skipped.is_empty());

    // A corrupted newest checkpoint is skipped (and reported), the previous one is used.
    let p3 = checkpoint_path(dir.path(), Round(3));
    fs::write(&p3, &good[..good.len() - 10]).unwrap();
    let latest = latest_valid_pool(dir.path()).unwrap();
    assert_eq!(latest.checkpoint.unwrap().meta.round, Round(2));
    assert_eq!(latest.skipped.len(), 1);
    assert!(latest.skipped[0].to_string().contains("round-000003"), "{}", latest.skipped[0]);
}

#[test]
fn atomic_write_replaces_whole_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    atomic_write(&path, b"first").unwrap();
    atomic_write(&path, b"second").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"second");
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn generic_tensors_round_trip_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("residual.safetensors");
    let tensors = BTreeMap::from([("a#3".to_string(), HostTensor::new(vec![2], vec![0.5, -0.25]).unwrap())]);
    write_tensors(&path, &tensors, BTreeMap::from([("round".into(), "4".into())])).unwrap();
    let (t2, m2) = read_tensors(&path).unwrap();
    assert_eq!(t2, tensors);
    assert_eq!(m2["round"], "4");
}

#[test]
fn a_pool_that_does_not_fit_its_spec_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint_path(dir.path(), Round(1));
    let mut p = pool();
    p.tensors.insert("classifier.bias".into(), HostTensor::zeros(&[4]));
    let err = write_pool(&path, &p, &meta(1)).unwrap_err().to_string();
    assert!(err.contains("classifier.bias"), "{err}");
    assert!(!path.exists());
}
