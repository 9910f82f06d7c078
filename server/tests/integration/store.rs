//! The store: a commit puts a checkpoint and a log line on disk; reopening resumes at the newest
//! checkpoint; the traces of a crash (a torn log line, a missing log line, temporary files) are
//! repaired or ignored; a checkpoint of another run is refused by name.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;

use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolSpec, TargetSpec};
use fedpool_common::checkpoint::{checkpoint_path, read_pool, write_pool, CheckpointMeta};
use fedpool_common::{BackboneFingerprint, Round, Sha256};
use fedpool_server::round::{Commit, RoundRecord};
use fedpool_server::store::{Store, StoreError, ROUND_LOG};

fn spec() -> PoolSpec {
    let targets = (0..2).map(|i| TargetSpec { name: format!("layer.{i}.output"), dim_in: 4, dim_out: 4 }).collect();
    PoolSpec::ssf_pool(targets, 4, 3, 1, Some(HeadSpec::new(4, 2)))
}

fn backbone() -> BackboneFingerprint {
    BackboneFingerprint(Sha256::of(b"tiny-bert"))
}

fn record(round: u64) -> RoundRecord {
    RoundRecord {
        round,
        attempt: 1,
        clients: vec!["a".into(), "b".into()],
        examples: 40,
        bytes_up: 1234,
        bytes_down: 5678,
        rejected: BTreeMap::from([("Late".to_string(), 1)]),
        stragglers: vec!["c".into()],
        train_loss: Some(0.5),
        train_accuracy: Some(0.75),
        started_at_secs: round as f64 * 10.0,
        committed_at_secs: round as f64 * 10.0 + 7.5,
        recovered: false,
        median_update_norm: None,
        eval: None,
    }
}

fn commit(round: u64) -> Commit {
    Commit {
        round: Round(round),
        pool: AdapterPool::init(&spec(), round).unwrap(),
        record: record(round),
        server_state: BTreeMap::new(),
    }
}

/// A fresh store with the initial pool and rounds 1..=n committed.
fn store_with(dir: &std::path::Path, n: u64) -> Store {
    let (mut store, round, _) = Store::open_or_init(dir, spec(), backbone(), |s| AdapterPool::init(s, 0)).unwrap();
    assert_eq!(round, Round(0));
    for r in 1..=n {
        store.commit(&commit(r)).unwrap();
    }
    store
}

#[test]
fn a_fresh_folder_resumes_nothing_and_the_initial_pool_is_written_as_round_0() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert!(resume.latest.is_none());
    assert!(store.rounds().is_empty());
    let pool = AdapterPool::init(&spec(), 0).unwrap();
    let path = store.write_initial(&pool).unwrap();
    assert_eq!(path, checkpoint_path(dir.path(), Round(0)));
    assert_eq!(read_pool(&path).unwrap().0, pool);
    assert!(store.write_initial(&pool).is_err(), "only once");
    drop(store);
    let (_, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest, Some((Round(0), pool)));
}

#[test]
fn a_commit_writes_the_checkpoint_and_one_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 0);
    let c = commit(1);
    let path = store.commit(&c).unwrap();
    assert_eq!(path, checkpoint_path(dir.path(), Round(1)));
    let (pool, meta) = read_pool(&path).unwrap();
    assert_eq!(pool, c.pool);
    assert_eq!((meta.round, meta.spec, meta.backbone), (Round(1), spec(), backbone()));
    let log = fs::read_to_string(dir.path().join(ROUND_LOG)).unwrap();
    assert_eq!(log.lines().count(), 1);
    assert!(log.ends_with('\n'));
    assert_eq!(serde_json::from_str::<RoundRecord>(log.trim_end()).unwrap(), c.record);
    assert_eq!(store.rounds(), std::slice::from_ref(&c.record));
    assert_eq!(store.last_round(), Some(Round(1)));
}

#[test]
fn commits_must_come_in_increasing_round_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 2);
    let err = store.commit(&commit(2)).unwrap_err().to_string();
    assert!(err.contains("round 2"), "{err}");
    let mut c = commit(3);
    c.record.round = 4;
    assert!(store.commit(&c).is_err(), "the record must be of the committed round");
}

#[test]
fn reopening_resumes_at_the_newest_checkpoint_with_the_whole_log() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 3));
    let (store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest, Some((Round(3), commit(3).pool)));
    assert_eq!(resume.path, Some(checkpoint_path(dir.path(), Round(3))));
    assert_eq!(store.rounds(), [record(1), record(2), record(3)]);
    // And open_or_init does not initialise over it.
    drop(store);
    let (_, round, pool) = Store::open_or_init(dir.path(), spec(), backbone(), |_| -> Result<AdapterPool, String> {
        panic!("must not initialise a folder with checkpoints")
    })
    .unwrap();
    assert_eq!((round, pool), (Round(3), commit(3).pool));
}

#[test]
fn a_torn_last_log_line_is_truncated_away() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 2));
    let log_path = dir.path().join(ROUND_LOG);
    let good = fs::read(&log_path).unwrap();
    // A crash mid-append of round 3's line: 20 bytes of it and no newline.
    let line = serde_json::to_string(&record(3)).unwrap();
    fs::OpenOptions::new().append(true).open(&log_path).unwrap().write_all(&line.as_bytes()[..20]).unwrap();
    let (mut store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest.unwrap().0, Round(2));
    assert_eq!(fs::read(&log_path).unwrap(), good, "truncated back to the last complete line");
    assert_eq!(store.rounds(), [record(1), record(2)]);
    // Appending after the repair gives a well-formed log.
    store.commit(&commit(3)).unwrap();
    drop(store);
    let (store, _) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(store.rounds(), [record(1), record(2), record(3)]);
}

#[test]
fn a_missing_log_line_for_the_newest_checkpoint_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 2));
    // A crash between round 3's checkpoint and its log line.
    let meta = CheckpointMeta::now(Round(3), spec(), backbone());
    write_pool(&checkpoint_path(dir.path(), Round(3)), &commit(3).pool, &meta).unwrap();
    let (store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest.unwrap().0, Round(3));
    let rounds = store.rounds();
    assert_eq!(rounds.len(), 3);
    assert_eq!(rounds[2].round, 3);
    assert!(rounds[2].recovered, "{:?}", rounds[2]);
    let log = fs::read_to_string(dir.path().join(ROUND_LOG)).unwrap();
    assert!(log.lines().last().unwrap().contains("\"recovered\":true"), "{log}");
    // Recovered once, not at every open.
    drop(store);
    let (store, _) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(store.rounds().len(), 3);
}

#[test]
fn a_checkpoint_of_another_spec_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 1));
    let mut other = spec();
    other.pool_size = 4;
    let meta = CheckpointMeta::now(Round(1), other.clone(), backbone());
    // An older round of another run: still refused (the folder must not mix runs).
    let path = checkpoint_path(dir.path(), Round(0));
    write_pool(&path, &AdapterPool::init(&other, 0).unwrap(), &CheckpointMeta { round: Round(0), ..meta }).unwrap();
    let err = Store::open(dir.path(), spec(), backbone()).unwrap_err();
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("round-000000.safetensors") && msg.contains("spec"), "{msg}");
}

#[test]
fn a_checkpoint_of_another_backbone_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 1));
    let other = BackboneFingerprint(Sha256::of(b"bert-large"));
    let err = Store::open(dir.path(), spec(), other).unwrap_err().to_string();
    assert!(err.contains("round-00000") && err.contains("backbone"), "{err}");
}

#[test]
fn temporary_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 2));
    // Leftovers of interrupted atomic writes of round 3, and an unrelated file.
    fs::write(dir.path().join(".round-000003.safetensors.tmp.4242"), b"half a checkpoint").unwrap();
    fs::write(dir.path().join("round-000003.safetensors.tmp"), b"junk").unwrap();
    fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    let (mut store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest.unwrap().0, Round(2));
    assert!(resume.skipped.is_empty());
    assert_eq!(store.rounds().len(), 2);
    // Round 3 commits over the leftovers' name without trouble.
    store.commit(&commit(3)).unwrap();
    assert_eq!(read_pool(&checkpoint_path(dir.path(), Round(3))).unwrap().0, commit(3).pool);
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_and_its_round_committed_again() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 3));
    let path = checkpoint_path(dir.path(), Round(3));
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    fs::write(&path, bytes).unwrap();
    let (mut store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest.unwrap().0, Round(2));
    assert_eq!(resume.skipped.len(), 1);
    assert!(resume.skipped[0].contains("round-000003.safetensors"), "{:?}", resume.skipped);
    store.commit(&commit(3)).unwrap();
    assert_eq!(read_pool(&path).unwrap().0, commit(3).pool);
}

#[test]
fn a_garbled_log_line_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 1));
    let log_path = dir.path().join(ROUND_LOG);
    fs::OpenOptions::new().append(true).open(&log_path).unwrap().write_all(b"{not json}\n").unwrap();
    let err = Store::open(dir.path(), spec(), backbone()).unwrap_err().to_string();
    assert!(err.contains(ROUND_LOG) && err.contains("line 2"), "{err}");
}

#[test]
fn a_folder_whose_only_checkpoints_are_corrupt_is_refused_not_restarted() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 0));
    let path = checkpoint_path(dir.path(), Round(0));
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    let err = Store::open(dir.path(), spec(), backbone()).unwrap_err();
    assert!(matches!(err, StoreError::NoValidCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains("round-000000.safetensors"), "{err}");
}

#[test]
fn the_store_can_move_to_a_blocking_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
}

#[test]
fn an_evaluation_is_merged_into_its_round_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 2);
    let eval = fedpool_server::round::EvalRecord {
        accuracy: Some(0.75),
        macro_f1: Some(0.7),
        loss: Some(0.5),
        examples: 300,
        clients: vec!["a".into(), "b".into()],
        missing: vec![],
        bytes_down: 1000,
        bytes_up: 120,
        seconds: 2.5,
    };
    store.record_eval(Round(1), &eval).unwrap();
    assert!(store.record_eval(Round(9), &eval).is_err(), "no line for round 9");
    store.commit(&commit(3)).unwrap();
    drop(store);
    let text = fs::read_to_string(dir.path().join(ROUND_LOG)).unwrap();
    assert_eq!(text.lines().count(), 4, "three round lines and one evaluation line: {text}");
    assert!(text.lines().nth(2).unwrap().starts_with("{\"eval_of\":1,"), "{text}");
    let (store, _) = Store::open(dir.path(), spec(), backbone()).unwrap();
    let rounds = store.rounds();
    assert_eq!(rounds[0].eval.as_ref(), Some(&eval));
    assert_eq!((rounds[1].eval.as_ref(), rounds[2].round), (None, 3));
    assert_eq!(rounds[1], record(2), "other lines unchanged");
}
