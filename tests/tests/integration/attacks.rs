//! The attack suite of issue 16 ("the coordinator decides what an update weighs"): each test is
//! one finding of the review, tried over real QUIC with mutual TLS against a running federation
//! (honest daemons beside a hand-driven attacker, "mallory", who speaks the protocol directly),
//! or with real processes killed at the worst moment. Each checks what the server does: a clear
//! refusal naming the reason, the round still committing with the honest clients, nothing
//! committed lost.

use std::time::Duration;

use fedpool_client::model::BertConfig;
use fedpool_client::session::connection::{Connection, Dialer, Faults};
use fedpool_client::session::{self, DaemonConfig, DaemonOptions};
use fedpool_common::checkpoint::{checkpoint_path, read_tensors};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits};
use fedpool_common::wire::{
    ClientMessage, Enroll, EvalMetrics, EvalReport, RejectReason, RoundTask, ServerMessage, TrainMetrics, Update,
    PROTOCOL_VERSION,
};
use fedpool_common::{AdapterPool, BackboneFingerprint, PoolDelta, Round, SlotUsage};
use fedpool_tests::{binary, Federation, Proc};
use tokio::sync::watch;

const LONG: Duration = Duration::from_secs(120);

/// Dials as mallory (its certificate is genuine: the attacks are in what it sends).
fn mallory_dialer(fed: &Federation) -> Dialer {
    Dialer::new(
        &fed.path("certs/ca.pem"),
        &fed.path("certs/clients/mallory.pem"),
        &fed.path("certs/clients/mallory.key"),
        "localhost",
        Duration::from_secs(10),
    )
    .expect("dialer")
}

/// Mallory's connection, enrolled claiming `examples`.
async fn mallory(fed: &Federation, server: std::net::SocketAddr, examples: u64) -> Connection {
    let conn = mallory_dialer(fed).connect(server, None, Faults::default()).await.expect("connect");
    let welcome = conn.exchange(&ClientMessage::Enroll(enroll(fed, examples))).await;
    assert!(matches!(welcome, Ok(ServerMessage::Welcome(_))), "{welcome:?}");
    conn
}

fn enroll(fed: &Federation, examples: u64) -> Enroll {
    Enroll {
        protocol_version: PROTOCOL_VERSION,
        backbone: BackboneFingerprint::of_model_dir(&fed.path("model")).expect("fp"),
        spec_hash: fed.spec.hash(),
        declared_upload_bps: None,
        declared_download_bps: None,
        examples,
        software: "mallory".into(),
    }
}

/// The next message the server pushes that `pick` takes.
async fn next_push<T>(conn: &Connection, mut pick: impl FnMut(ServerMessage) -> Option<T>) -> T {
    loop {
        let m = tokio::time::timeout(LONG, conn.next_push()).await.expect("a push in time").expect("push");
        if let Some(t) = pick(m) {
            return t;
        }
    }
}

async fn next_task(conn: &Connection) -> RoundTask {
    next_push(conn, |m| match m {
        ServerMessage::Task(t) => Some(*t),
        _ => None,
    })
    .await
}

/// The task's global pool with every value moved by `value` (slot 0, `count` examples).
fn moved(task: &RoundTask, fed: &Federation, value: f32, count: u64) -> PoolDelta {
    let limits = DecodeLimits::for_spec(&fed.spec);
    let global =
        AdapterPool::from_transfer(&codec::decode(&task.global, &limits).expect("global"), &fed.spec).expect("pool");
    let mut trained = global.clone();
    trained.tensors.values_mut().for_each(|t| t.data_mut().iter_mut().for_each(|v| *v += value));
    trained
        .delta_from(&global)
        .expect("delta")
        .restrict_to_slots(SlotUsage { slots: vec![0], counts: vec![count] })
        .expect("slots")
}

fn update(task: &RoundTask, delta: &PoolDelta, examples: u64) -> Update {
    Update {
        round: task.round,
        task_id: task.task_id,
        nonce: task.nonce,
        examples,
        delta: codec::encode(delta, &CodecConfig::default(), None, 1).expect("encode"),
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.5, steps: 1, seconds: 0.1 },
        importance: vec![],
    }
}

/// Starts the honest daemons `names`.
fn honest(fed: &Federation, names: &[&str], stop: &watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    names
        .iter()
        .map(|n| {
            let config = DaemonConfig::load(&fed.write_client_config(n, "model", "")).expect("config");
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ = session::run(config, DaemonOptions::default(), stop).await;
            })
        })
        .collect()
}

/// The largest change of any value between the checkpoints of rounds `a` and `b`.
fn largest_move(fed: &Federation, a: u64, b: u64) -> f32 {
    let (x, _) = read_tensors(&checkpoint_path(&fed.state(), Round(a))).expect("checkpoint a");
    let (y, _) = read_tensors(&checkpoint_path(&fed.state(), Round(b))).expect("checkpoint b");
    x.iter().flat_map(|(n, t)| t.data().iter().zip(y[n].data()).map(|(p, q)| (p - q).abs())).fold(0.0f32, f32::max)
}

/// Finding 1: the aggregation weight was the client's own claim. Mallory claims 10^15 examples
/// and moves every value by 0.5; the roster caps it at 10 examples, so the global moves by a
/// fraction of that (the two honest clients hold ~50 examples each), and the log's examples are
/// the coordinator's weights, not the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_1_a_client_claiming_1e15_examples_does_not_take_over_the_global() {
    let fed = Federation::with_model(&["h1", "h2", "mallory"], &BertConfig::tiny(), 1, 1);
    fed.write_server_config(1, 3, 3, "60s", "evaluate = false\n[clients]\nmallory = { max_examples = 10 }");
    let (server, _) = fed.start_server_in_process().await;
    let (_tx, stop) = watch::channel(false);
    let _honest = honest(&fed, &["h1", "h2"], &stop);
    let claim = 1_000_000_000_000_000u64;
    let conn = mallory(&fed, server.local_addr(), claim).await;
    let task = next_task(&conn).await;
    let answer = conn.exchange(&ClientMessage::Update(update(&task, &moved(&task, &fed, 0.5, 10), claim))).await;
    assert!(matches!(answer, Ok(ServerMessage::Ack(_))), "accepted, weighed by the roster: {answer:?}");
    let rounds = fed.wait_rounds(1, false, LONG);
    let examples = rounds[0]["examples"].as_u64().expect("examples");
    assert!(examples < 1000, "the round's weight is the coordinator's ({examples}), not 10^15");
    let moved_by = largest_move(&fed, 0, 1);
    assert!(moved_by < 0.25, "mallory moved the global by {moved_by} (0.5 if it had its claimed weight)");
    let _ = tokio::time::timeout(LONG, server.wait()).await;
}

/// Finding 2: finite but absurd values (10^30) passed every check. Now they are refused, naming
/// the bound, and the round commits with the honest clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_2_an_update_of_huge_finite_values_is_refused_and_the_round_commits() {
    let fed = Federation::new(&["h1", "h2", "mallory"]);
    fed.write_server_config(1, 3, 2, "20s", "evaluate = false");
    let (server, _) = fed.start_server_in_process().await;
    let (_tx, stop) = watch::channel(false);
    let _honest = honest(&fed, &["h1", "h2"], &stop);
    let conn = mallory(&fed, server.local_addr(), 10).await;
    let task = next_task(&conn).await;
    let answer = conn.exchange(&ClientMessage::Update(update(&task, &moved(&task, &fed, 1e30, 10), 10))).await;
    match answer {
        Ok(ServerMessage::Reject(r)) => {
            assert_eq!(r.reason, RejectReason::InvalidDelta);
            assert!(r.detail.contains("max_abs_value"), "{}", r.detail);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let rounds = fed.wait_rounds(1, false, LONG);
    assert_eq!(rounds[0]["clients"], serde_json::json!(["h1", "h2"]));
    assert!(largest_move(&fed, 0, 1) < 10.0, "the committed global is the honest clients'");
    let _ = tokio::time::timeout(LONG, server.wait()).await;
}

/// Finding 3: a second `Enroll` on a live connection re-sent the whole model each time. Now it
/// is a protocol error: refused, the connection closed, no second welcome or task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_3_a_second_enroll_on_a_live_connection_is_refused_and_closes_it() {
    let fed = Federation::new(&["h1", "h2", "mallory"]);
    fed.write_server_config(1, 2, 2, "20s", "evaluate = false\nmin_clients_to_start = 2");
    let (server, _) = fed.start_server_in_process().await;
    let conn = mallory(&fed, server.local_addr(), 10).await;
    match conn.exchange(&ClientMessage::Enroll(enroll(&fed, 10))).await {
        Ok(ServerMessage::Reject(r)) => {
            assert_eq!(r.reason, RejectReason::Protocol);
            assert!(r.detail.contains("already enrolled on a live connection"), "{}", r.detail);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.quic().closed()).await;
    assert!(closed.is_ok(), "the server closes the connection");
    server.shutdown().await.expect("shutdown");
}

/// Finding 10: a bad update cost the client nothing. Mallory's third refused update (default
/// `strikes = 3`) quarantines it: refused with `Quarantined`, dropped, and refused again when it
/// comes back; the round commits with the honest clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_10_a_client_refused_three_times_is_quarantined_for_the_run() {
    let fed = Federation::new(&["h1", "h2", "mallory"]);
    fed.write_server_config(1, 3, 2, "30s", "evaluate = false");
    let (server, _) = fed.start_server_in_process().await;
    let (_tx, stop) = watch::channel(false);
    let _honest = honest(&fed, &["h1", "h2"], &stop);
    let conn = mallory(&fed, server.local_addr(), 10).await;
    let task = next_task(&conn).await;
    let forged = Update { nonce: fedpool_common::Nonce([7; 16]), ..update(&task, &moved(&task, &fed, 0.01, 10), 10) };
    for _ in 0..2 {
        let r = conn.exchange(&ClientMessage::Update(forged.clone())).await.expect("answer");
        assert!(matches!(r, ServerMessage::Reject(ref r) if r.reason == RejectReason::WrongNonce), "{r:?}");
    }
    // The third strike: its own refusal answers the upload; the quarantine comes pushed or
    // closes the connection.
    let third = conn.exchange(&ClientMessage::Update(forged)).await;
    assert!(matches!(third, Ok(ServerMessage::Reject(ref r)) if r.reason == RejectReason::WrongNonce), "{third:?}");
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.quic().closed()).await.expect("closed");
    assert!(format!("{closed}").contains("quarantined"), "{closed}");
    // Back on a new connection: refused at enrollment.
    let again = mallory_dialer(&fed).connect(server.local_addr(), None, Faults::default()).await.expect("connect");
    match again.exchange(&ClientMessage::Enroll(enroll(&fed, 10))).await {
        Ok(ServerMessage::Reject(r)) => assert_eq!(r.reason, RejectReason::Quarantined, "{}", r.detail),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let rounds = fed.wait_rounds(1, false, LONG);
    assert_eq!(rounds[0]["clients"], serde_json::json!(["h1", "h2"]));
    assert_eq!(rounds[0]["rejected"]["WrongNonce"], serde_json::json!(3));
    let _ = tokio::time::timeout(LONG, server.wait()).await;
}

/// Finding 10: the evaluation weight was unbounded (an accuracy of more than 1 could be
/// reported). Mallory reports a perfect score on u64::MAX examples; it weighs the cap
/// (`max_examples_per_update`), and the round's accuracy stays a mean in [0, 1].
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_10_an_evaluation_report_weighs_no_more_than_the_cap() {
    let fed = Federation::new(&["h1", "h2", "mallory"]);
    let extra = "eval_deadline = \"30s\"\nmin_clients_to_start = 3\nmax_examples_per_update = 100";
    // Mallory leaves its training task unanswered: the round commits at its deadline with the others.
    fed.write_server_config(1, 3, 2, "8s", extra);
    let (server, _) = fed.start_server_in_process().await;
    let (_tx, stop) = watch::channel(false);
    let _honest = honest(&fed, &["h1", "h2"], &stop);
    let conn = mallory(&fed, server.local_addr(), 10).await;
    // Mallory stays connected (heartbeats) while leaving its training task unanswered.
    let beating = conn.clone();
    let _heartbeats = tokio::spawn(async move {
        for seq in 1.. {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = beating.exchange(&ClientMessage::Heartbeat(fedpool_common::wire::Heartbeat { seq })).await;
        }
    });
    let eval = next_push(&conn, |m| match m {
        ServerMessage::EvalTask(t) => Some(*t),
        _ => None,
    })
    .await;
    let metrics = EvalMetrics { accuracy: 1.0, macro_f1: 1.0, loss: 0.0, examples: u64::MAX };
    let report = EvalReport { round: eval.round, task_id: eval.task_id, metrics };
    assert!(matches!(conn.exchange(&ClientMessage::EvalReport(report)).await, Ok(ServerMessage::Ack(_))));
    let rounds = fed.wait_rounds(1, true, LONG);
    let e = &rounds[0]["eval"];
    let examples = e["examples"].as_u64().expect("examples");
    assert!(examples <= 300, "each report weighs at most the cap of 100: {e}");
    let accuracy = e["accuracy"].as_f64().expect("accuracy");
    assert!((0.0..=1.0).contains(&accuracy), "{e}");
    let _ = tokio::time::timeout(LONG, server.wait()).await;
}

/// Finding 8: the server acknowledged an update when it folded it, before the round was on disk,
/// and the client advanced its residual on that ack. A SIGKILL between the two lost
/// acknowledged work. Now the ack comes only after the commit: killed in between, the client
/// has no ack and no saved residual; after the restart the round is redone and the ack saves it.
#[test]
fn finding_8_an_update_folded_but_not_committed_is_not_acknowledged() {
    let fed = Federation::new(&["c1", "c2"]);
    fed.write_server_config(1, 2, 2, "60s", "min_clients_to_start = 2\nevaluate = false");
    for n in ["c1", "c2"] {
        fed.write_client_config(n, "model", "quantization = \"int8\"\ntop_k = 0.5");
    }
    let start_server = |log: &str| {
        let _ = std::fs::remove_file(fed.state().join("listen.addr"));
        let server = Proc::start(
            &binary("fedpool-server"),
            &["run", "--config", "server.toml"],
            fed.dir.path(),
            fed.path(log),
            &[],
        );
        let t = std::time::Instant::now();
        while !fed.state().join("listen.addr").exists() {
            assert!(t.elapsed() < LONG, "server did not start:\n{}", server.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    };
    let client = |name: &str, env: &[(&str, &str)]| {
        let config = format!("{name}.toml");
        let log = fed.path(&format!("{name}.log"));
        Proc::start(&binary("fedpool-client"), &["run", "--config", &config], fed.dir.path(), log, env)
    };
    let mut server = start_server("server-first.log");
    let c1 = client("c1", &[]);
    let stall = [("FEDPOOL_FAULT_STALL_UPLOAD", "6s"), ("FEDPOOL_FAULT_STALL_ROUND", "1")];
    let c2 = client("c2", &stall);
    // c1's update is folded while c2's upload is stalled: the round cannot commit yet.
    server.wait_log("update folded", LONG);
    c2.wait_log("upload stalled", LONG);
    server.kill9();
    let residual = fed.path("client-c1/residual.safetensors");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!residual.exists(), "no ack before the commit, so no residual saved:\n{}", c1.log_text());
    assert!(!c1.log_text().contains("update committed"), "{}", c1.log_text());

    // Restarted, the server redoes round 1; its commit acknowledges c1, which saves its residual.
    let mut server = start_server("server-second.log");
    let rounds = fed.wait_rounds(1, false, LONG);
    assert_eq!(rounds[0]["clients"], serde_json::json!(["c1", "c2"]), "{rounds:?}");
    assert!(server.wait_exit(LONG), "server finished:\n{}", server.log_text());
    let t = std::time::Instant::now();
    while !residual.exists() {
        assert!(t.elapsed() < LONG, "c1 saved its residual after the ack:\n{}", c1.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c1.log_text().contains("update committed"));
}
