//! The store's disk: old checkpoints pruned by the retention rule (the newest always kept), the
//! round log append-only (an evaluation is one more line, never a rewrite), one server per state
//! folder (an OS lock naming its holder), and state files readable by their owner only.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolSpec, TargetSpec};
use fedpool_common::checkpoint::{checkpoint_path, list_checkpoints};
use fedpool_common::{BackboneFingerprint, HostTensor, Round, Sha256};
use fedpool_server::round::{Commit, EvalRecord, RoundRecord};
use fedpool_server::store::{read_round_log, server_state_path, Retention, Store, StoreError, LOCK_FILE, ROUND_LOG};

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
        rejected: BTreeMap::new(),
        stragglers: Vec::new(),
        train_loss: Some(0.5),
        train_accuracy: Some(0.75),
        started_at_secs: round as f64 * 10.0,
        committed_at_secs: round as f64 * 10.0 + 7.5,
        recovered: false,
        median_update_norm: None,
        eval: None,
    }
}

/// Round `round`'s commit, with a server state (FedAdam-like moments) that names its round.
fn commit(round: u64) -> Commit {
    let moment = HostTensor::new(vec![2], vec![round as f32, 1.0]).unwrap();
    Commit {
        round: Round(round),
        pool: AdapterPool::init(&spec(), round).unwrap(),
        record: record(round),
        server_state: BTreeMap::from([("fedadam.m.x".to_string(), moment)]),
    }
}

fn eval(accuracy: f64) -> EvalRecord {
    EvalRecord {
        accuracy: Some(accuracy),
        macro_f1: Some(0.5),
        loss: Some(0.4),
        examples: 64,
        clients: vec!["a".into(), "b".into()],
        missing: Vec::new(),
        bytes_down: 4000,
        bytes_up: 100,
        seconds: 1.5,
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, spec(), backbone()).unwrap().0
}

/// A fresh store with `retention`, the initial pool and rounds 1..=n committed.
fn store_with(dir: &Path, retention: Retention, n: u64) -> Store {
    let (store, _, _) = Store::open_or_init(dir, spec(), backbone(), |s| AdapterPool::init(s, 0)).unwrap();
    let mut store = store.with_retention(retention);
    for r in 1..=n {
        store.commit(&commit(r)).unwrap();
    }
    store
}

fn checkpoints(dir: &Path) -> Vec<u64> {
    list_checkpoints(dir).unwrap().into_iter().map(|(r, _)| r.0).collect()
}

fn server_states(dir: &Path) -> Vec<u64> {
    (0..100).filter(|&r| server_state_path(dir, Round(r)).exists()).collect()
}

// --- retention ---------------------------------------------------------------------------------

#[test]
fn retention_keeps_the_newest_keep_last_every_multiple_of_keep_every_and_round_0_and_a_restart_resumes_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), Retention { keep_last: 3, keep_every: 4 }, 13);
    assert_eq!(checkpoints(dir.path()), [0, 4, 8, 11, 12, 13]);
    assert_eq!(server_states(dir.path()), [4, 8, 11, 12, 13], "each state goes with its checkpoint");
    assert_eq!(store.rounds().len(), 13, "the log keeps every round");
    drop(store);
    let (store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest, Some((Round(13), commit(13).pool)));
    assert_eq!(resume.server_state, commit(13).server_state, "the newest round's state is there");
    assert_eq!(store.last_round(), Some(Round(13)));
}

#[test]
fn the_default_retention_keeps_the_last_five_rounds_and_every_tenth() {
    assert_eq!(Retention::default(), Retention { keep_last: 5, keep_every: 10 });
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = Store::open_or_init(dir.path(), spec(), backbone(), |s| AdapterPool::init(s, 0)).unwrap();
    assert_eq!(store.retention(), Retention::default(), "a store prunes unless told otherwise");
    drop(store);
    let mut store = open(dir.path());
    for r in 1..=23 {
        store.commit(&commit(r)).unwrap();
    }
    assert_eq!(checkpoints(dir.path()), [0, 10, 19, 20, 21, 22, 23]);
}

#[test]
fn keep_all_keeps_every_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), Retention::keep_all(), 12));
    assert_eq!(checkpoints(dir.path()), (0..=12).collect::<Vec<_>>());
}

#[test]
fn with_corrupt_newer_files_the_newest_valid_checkpoint_survives_pruning() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), Retention::keep_all(), 5));
    // Rounds 4 and 5 damaged: the store resumes at 3.
    for r in [4, 5] {
        let path = checkpoint_path(dir.path(), Round(r));
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x10;
        fs::write(&path, bytes).unwrap();
    }
    let (store, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest.as_ref().map(|(r, _)| *r), Some(Round(3)));
    let mut store = store.with_retention(Retention { keep_last: 1, keep_every: 0 });
    store.commit(&commit(4)).unwrap();
    // 3 may go once 4 is on disk; 5 (above the newest, unverified) waits for its round.
    assert_eq!(checkpoints(dir.path()), [0, 4, 5]);
    drop(store);
    let (_, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest, Some((Round(4), commit(4).pool)), "the newest valid checkpoint is there");
}

#[test]
fn a_checkpoint_that_cannot_be_deleted_is_kept_and_the_commit_still_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), Retention { keep_last: 2, keep_every: 0 }, 2);
    // Something in the way that `remove_file` refuses: a folder under round 1's name.
    let path = checkpoint_path(dir.path(), Round(1));
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    fs::write(path.join("keep"), b"x").unwrap();
    store.commit(&commit(3)).unwrap();
    store.commit(&commit(4)).unwrap();
    assert!(path.is_dir(), "the failed deletion is logged and skipped");
    assert_eq!(checkpoints(dir.path()), [0, 1, 3, 4]);
}

// --- the append-only round log -----------------------------------------------------------------

#[test]
fn record_eval_appends_one_line_and_leaves_the_earlier_bytes_and_the_file_itself_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), Retention::default(), 3);
    let log = dir.path().join(ROUND_LOG);
    let before = fs::read(&log).unwrap();
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&log).unwrap());
    store.record_eval(Round(2), &eval(0.8125)).unwrap();
    let after = fs::read(&log).unwrap();
    assert!(after.len() > before.len() && after.starts_with(&before), "only appended to");
    let added = std::str::from_utf8(&after[before.len()..]).unwrap();
    assert_eq!(added.lines().count(), 1, "{added}");
    assert!(added.starts_with("{\"eval_of\":2,") && added.ends_with('\n'), "{added}");
    #[cfg(unix)]
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&fs::metadata(&log).unwrap()), inode, "not replaced by a rename");
    // Read back merged, by the store and by the one reader.
    assert_eq!(store.rounds()[1].eval, Some(eval(0.8125)));
    let read = read_round_log(&log).unwrap();
    assert_eq!(read, store.rounds());
    assert_eq!((read[0].eval.as_ref(), read[2].eval.as_ref()), (None, None));
    drop(store);
    assert_eq!(open(dir.path()).rounds(), read, "and after a reopen");
}

#[test]
fn a_later_evaluation_of_the_same_round_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), Retention::default(), 2);
    store.record_eval(Round(1), &eval(0.25)).unwrap();
    store.record_eval(Round(1), &eval(0.75)).unwrap();
    assert_eq!(store.rounds()[0].eval, Some(eval(0.75)));
    drop(store);
    assert_eq!(open(dir.path()).rounds()[0].eval, Some(eval(0.75)));
}

#[test]
fn an_old_log_with_the_evaluation_inside_the_round_line_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), Retention::default(), 2));
    // The format before evaluation lines: round 1's line rewritten with its `eval` inside.
    let mut old = record(1);
    old.eval = Some(eval(0.5));
    let text = format!("{}\n{}\n", serde_json::to_string(&old).unwrap(), serde_json::to_string(&record(2)).unwrap());
    assert!(text.lines().next().unwrap().contains("\"eval\":{"), "{text}");
    let log = dir.path().join(ROUND_LOG);
    fs::write(&log, &text).unwrap();
    assert_eq!(read_round_log(&log).unwrap(), [old.clone(), record(2)]);
    let mut store = open(dir.path());
    assert_eq!(store.rounds(), [old.clone(), record(2)]);
    // New evaluation lines mix with it.
    store.record_eval(Round(2), &eval(0.625)).unwrap();
    drop(store);
    let rounds = open(dir.path()).rounds().to_vec();
    assert_eq!((rounds[0].eval.clone(), rounds[1].eval.clone()), (Some(eval(0.5)), Some(eval(0.625))));
}

#[test]
fn a_torn_evaluation_line_is_ignored_by_the_reader_and_truncated_away_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), Retention::default(), 2);
    store.record_eval(Round(1), &eval(0.5)).unwrap();
    drop(store);
    let log = dir.path().join(ROUND_LOG);
    let good = fs::read(&log).unwrap();
    // A crash mid-append of round 2's evaluation: part of the line, no newline.
    let line = serde_json::json!({"eval_of": 2, "accuracy": 0.9}).to_string();
    fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(&line.as_bytes()[..15]).unwrap();
    let torn = fs::read(&log).unwrap();
    // The reader (`report`, tests) skips it and leaves the file alone: a server may be appending.
    let read = read_round_log(&log).unwrap();
    assert_eq!((read.len(), read[0].eval.clone(), read[1].eval.clone()), (2, Some(eval(0.5)), None));
    assert_eq!(fs::read(&log).unwrap(), torn, "the reader does not modify the log");
    // The store cuts it away at open, and appends cleanly after.
    let mut store = open(dir.path());
    assert_eq!(fs::read(&log).unwrap(), good, "truncated back to the last complete line");
    store.record_eval(Round(2), &eval(0.9)).unwrap();
    drop(store);
    let rounds = read_round_log(&log).unwrap();
    assert_eq!((rounds[0].eval.clone(), rounds[1].eval.clone()), (Some(eval(0.5)), Some(eval(0.9))));
}

// --- one server per folder ---------------------------------------------------------------------

#[test]
fn a_second_open_of_the_same_folder_fails_naming_the_holder_and_opens_once_the_first_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let first = store_with(dir.path(), Retention::default(), 1);
    assert_eq!(first.lock_path(), dir.path().join(LOCK_FILE));
    // The first server is mid-append: the second must not "repair" its log.
    let log = dir.path().join(ROUND_LOG);
    fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(b"{\"round\":2,").unwrap();
    let in_flight = fs::read(&log).unwrap();

    let err = Store::open(dir.path(), spec(), backbone()).unwrap_err();
    let StoreError::Locked { path, holder } = &err else { panic!("expected Locked, got {err}") };
    assert_eq!(path, &dir.path().join(LOCK_FILE));
    assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}");
    assert!(holder.contains("since "), "{holder}");
    let msg = err.to_string();
    assert!(msg.contains("LOCK") && msg.contains(holder.as_str()) && msg.contains("state_dir"), "{msg}");
    assert_eq!(fs::read(&log).unwrap(), in_flight, "the refused open touched nothing");

    drop(first);
    let (second, resume) = Store::open(dir.path(), spec(), backbone()).unwrap();
    assert_eq!(resume.latest.map(|(r, _)| r), Some(Round(1)));
    assert_eq!(second.rounds().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_travels_with_the_store_to_a_blocking_thread_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), Retention::default(), 1);
    // As the server's engine task does for each commit.
    let path = dir.path().to_path_buf();
    let (mut store, refused) = tokio::task::spawn_blocking(move || {
        let refused = matches!(Store::open(&path, spec(), backbone()), Err(StoreError::Locked { .. }));
        (store, refused)
    })
    .await
    .unwrap();
    assert!(refused, "locked while on the blocking thread");
    store.commit(&commit(2)).unwrap();
    assert!(matches!(Store::open(dir.path(), spec(), backbone()), Err(StoreError::Locked { .. })), "and back");
    drop(store);
    assert!(Store::open(dir.path(), spec(), backbone()).is_ok());
}

#[test]
fn a_lock_file_left_by_a_dead_server_holds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), Retention::default(), 1));
    let lock = dir.path().join(LOCK_FILE);
    fs::write(&lock, "pid 999999 on gone-host since 2020-01-01T00:00:00Z\n").unwrap();
    let store = open(dir.path());
    let text = fs::read_to_string(&lock).unwrap();
    assert!(text.starts_with(&format!("pid {} ", std::process::id())), "the new holder's name: {text}");
    assert!(!text.contains("gone-host"), "{text}");
    drop(store);
}

// --- file modes --------------------------------------------------------------------------------

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[test]
fn state_files_are_0600_and_the_state_folder_0700() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    let mut store = store_with(&dir, Retention::default(), 1);
    store.record_eval(Round(1), &eval(0.5)).unwrap();
    assert_eq!(mode(&dir), 0o700, "the folder");
    for file in [
        checkpoint_path(&dir, Round(0)),
        checkpoint_path(&dir, Round(1)),
        server_state_path(&dir, Round(1)),
        dir.join(ROUND_LOG),
        dir.join(LOCK_FILE),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[cfg(unix)]
#[test]
fn an_older_runs_readable_files_and_folder_are_made_private_at_open() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), Retention::default(), 1));
    let files =
        [checkpoint_path(dir.path(), Round(1)), server_state_path(dir.path(), Round(1)), dir.path().join(ROUND_LOG)];
    for f in &files {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
    }
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let notes = dir.path().join("notes.txt");
    fs::write(&notes, b"not the store's").unwrap();
    fs::set_permissions(&notes, fs::Permissions::from_mode(0o644)).unwrap();
    let store = open(dir.path());
    assert_eq!(mode(dir.path()), 0o700);
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&notes), 0o644, "files that are not the store's are left alone");
    drop(store);
}
