//! Crash safety of the real binary: let rounds commit, SIGKILL the server, restart it on the same
//! state folder, and find the committed rounds intact and the next round proceeding.

use crate::net_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedpool_common::checkpoint::{checkpoint_path, read_pool};
use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_common::{AdapterPool, Round};
use net_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_fedpool-server");

/// The server process; killed if the test fails half-way.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn certs_cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("certs").args(args).output().expect("run fedpool-server certs")
}

fn spawn(fed: &Federation, config: &Path, log_name: &str) -> (Proc, std::net::SocketAddr) {
    let addr_file = fed.state().join("listen.addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = fed.dir.path().join(log_name);
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn fedpool-server");
    let mut proc = Proc { child, log };
    let start = Instant::now();
    loop {
        if let Some(addr) = read_addr(&addr_file) {
            return (proc, addr);
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("server exited early ({status}):\n{}", proc.log());
        }
        assert!(start.elapsed() < WAIT, "server did not write {}:\n{}", addr_file.display(), proc.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The rounds in the log (its round lines; evaluation lines merge into them).
fn round_log_lines(fed: &Federation) -> usize {
    fedpool_server::store::read_round_log(&fed.state().join(fedpool_server::store::ROUND_LOG)).map_or(0, |r| r.len())
}

/// Enrolls, trains `rounds` rounds and returns the last task received (of the round after them)
/// and the global pool of each round's task.
async fn train(client: &TestClient, rounds: u64) -> (fedpool_common::wire::RoundTask, Vec<AdapterPool>) {
    let mut globals = Vec::new();
    let mut task = client.next_task().await.expect("task");
    for i in 0..rounds {
        globals.push(task_global(&task));
        let delta = trained_delta(1.0 + i as f32);
        let ack = client.exchange(&ClientMessage::Update(update_for(&task, &delta))).await.expect("update");
        assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
        // The next round's task is sent only after this round's commit is on disk.
        task = client.next_task().await.expect("next task");
    }
    (task, globals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_resumes_with_committed_rounds_intact_and_goes_on() {
    let fed = Federation::new(&[]);
    // Certificates made by the CLI (the federation's own certs are replaced).
    let dir = fed.certs();
    let out = certs_cli(&["init", "--dir", dir.to_str().expect("utf-8 path"), "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = certs_cli(&["issue", "--dir", dir.to_str().expect("utf-8 path"), "--name", "alpha"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = fed.write_config(&fed.config_toml(1, 10, "3s", ""));

    // Run 1: rounds 1 and 2 commit, then SIGKILL during round 3.
    let (mut proc, addr) = spawn(&fed, &config, "run1.log");
    let client = TestClient::connect_as(addr, &fed, "alpha").await;
    assert!(matches!(client.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    let (task3, _) = train(&client, 2).await;
    assert_eq!(task3.round, Round(3), "{}", proc.log());
    let committed: Vec<Vec<u8>> =
        (1..=2).map(|r| std::fs::read(checkpoint_path(&fed.state(), Round(r))).expect("checkpoint written")).collect();
    let (pool2, _) = read_pool(&checkpoint_path(&fed.state(), Round(2))).expect("round 2");
    assert_eq!(round_log_lines(&fed), 2, "{}", proc.log());
    let log = proc.log();
    assert!(log.contains("round 1 committed") && log.contains("round 2 committed"), "a status line per round:\n{log}");
    proc.child.kill().expect("SIGKILL");
    let status = proc.child.wait().expect("wait");
    assert!(!status.success());
    drop(client);

    // Run 2: same state folder.
    let (mut proc, addr) = spawn(&fed, &config, "run2.log");
    for (i, bytes) in committed.iter().enumerate() {
        let path = checkpoint_path(&fed.state(), Round(i as u64 + 1));
        assert_eq!(&std::fs::read(&path).expect("checkpoint kept"), bytes, "{} changed", path.display());
        assert!(read_pool(&path).is_ok());
    }
    assert_eq!(round_log_lines(&fed), 2);
    let log = proc.log();
    assert!(log.contains("round 2"), "the log should say which round it resumed from:\n{log}");

    let client = TestClient::connect_as(addr, &fed, "alpha").await;
    match client.enroll().await.expect("enroll again") {
        ServerMessage::Welcome(w) => assert_eq!(w.round, Round(2)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let task = client.next_task().await.expect("task of round 3");
    assert_eq!(task.round, Round(3));
    assert_pools_close(&task_global(&task), &pool2);
    let delta = trained_delta(3.0);
    let ack = client.exchange(&ClientMessage::Update(update_for(&task, &delta))).await.expect("update");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    let task4 = client.next_task().await.expect("task of round 4");
    assert_eq!(task4.round, Round(4));
    let (pool3, meta3) = read_pool(&checkpoint_path(&fed.state(), Round(3))).expect("round 3 committed");
    assert_eq!(meta3.round, Round(3));
    assert_pools_close(&pool3, &expected_after(&pool2, &delta));
    assert_eq!(round_log_lines(&fed), 3);

    // SIGTERM: a clean shutdown, exit status 0.
    let pid = proc.child.id().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    assert!(st.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = proc.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(start.elapsed() < WAIT, "no exit after SIGTERM:\n{}", proc.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", proc.log());
    let err = tokio::time::timeout(WAIT, client.conn.closed()).await.expect("client told");
    assert!(err.to_string().contains("shutting down") || err.to_string().contains("closed"), "{err}");
}
