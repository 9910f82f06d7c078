//! A whole round over real QUIC with mutual TLS on loopback, in process: enroll, task, update,
//! commit, and the checkpoint on disk.

use crate::net_support;

use fedpool_common::checkpoint::{checkpoint_path, read_pool};
use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_common::{AdapterPool, Round};
use fedpool_server::config::ServerConfig;
use fedpool_server::metrics::Metrics;
use fedpool_server::net::{close, Outcome, Server};
use net_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(fed: &Federation, toml: &str) -> Server {
    let config = ServerConfig::parse(toml, fed.dir.path()).expect("config");
    let p = config.prepare().expect("prepare");
    Server::start(p.net, p.engine, p.store, Metrics::new()).await.expect("start server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_client_completes_a_round_and_the_checkpoint_holds_global_plus_delta() {
    let fed = Federation::new(&["hospital-a"]);
    let toml = fed.config_toml(1, 2, "3s", "metrics_listen = \"127.0.0.1:0\"");
    let server = start(&fed, &toml).await;
    let mut committed = server.committed();
    let client = TestClient::connect_as(server.local_addr(), &fed, "hospital-a").await;

    match client.enroll().await.expect("enroll") {
        ServerMessage::Welcome(w) => {
            assert_eq!(w.client_name, "hospital-a");
            assert_eq!(w.round, Round(0));
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    match client.heartbeat(41).await.expect("heartbeat") {
        ServerMessage::Heartbeat(h) => assert_eq!(h.seq, 41),
        other => panic!("expected Heartbeat, got {other:?}"),
    }

    let task = client.next_task().await.expect("task");
    assert_eq!(task.round, Round(1));
    let global = task_global(&task);
    assert_eq!(global, AdapterPool::init(&tiny_spec(), 7).expect("init"), "round 1 starts from the seeded pool");

    let delta = trained_delta(1.0);
    match client.exchange(&ClientMessage::Update(update_for(&task, &delta))).await.expect("update") {
        ServerMessage::Ack(a) => assert_eq!((a.round, a.task_id), (task.round, task.task_id)),
        other => panic!("expected Ack, got {other:?}"),
    }
    tokio::time::timeout(WAIT, committed.wait_for(|r| *r >= Round(1))).await.expect("commit in time").expect("commit");

    let (pool, meta) = read_pool(&checkpoint_path(&fed.state(), Round(1))).expect("read round-000001");
    assert_eq!(meta.round, Round(1));
    assert_eq!(meta.backbone, backbone());
    assert_pools_close(&pool, &expected_after(&global, &delta));

    // The next round's task starts from the committed pool, and is only sent after the commit.
    let task2 = client.next_task().await.expect("task of round 2");
    assert_eq!(task2.round, Round(2));
    assert_pools_close(&task_global(&task2), &pool);

    // Metrics: round, connected client, bytes both ways.
    let metrics_addr = server.metrics_addr().expect("metrics enabled");
    let text = http_get(metrics_addr, "/metrics").await;
    assert!(text.contains("\nfedpool_connected_clients 1\n"), "{text}");
    assert!(text.contains("\nfedpool_committed_round 1\n"), "{text}");
    let bytes_in = metric(&text, "fedpool_bytes_in_total");
    let bytes_out = metric(&text, "fedpool_bytes_out_total");
    assert!(bytes_in > 0 && bytes_out > 0, "{text}");

    // Finish round 2: the federation ends and the client is told so.
    let d2 = trained_delta(-0.5);
    let ack = client.exchange(&ClientMessage::Update(update_for(&task2, &d2))).await.expect("update 2");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(2)));
    let err = client.conn.closed().await;
    assert!(
        matches!(&err, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::FINISHED.into()),
        "{err}"
    );
    assert!(read_pool(&checkpoint_path(&fed.state(), Round(2))).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_replaces_its_old_connection_and_gets_its_task_again() {
    let fed = Federation::new(&["lab-b"]);
    let server = start(&fed, &fed.config_toml(1, 1, "5s", "")).await;
    let first = TestClient::connect_as(server.local_addr(), &fed, "lab-b").await;
    assert!(matches!(first.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    let task = first.next_task().await.expect("task");

    let second = TestClient::connect_as(server.local_addr(), &fed, "lab-b").await;
    let err = tokio::time::timeout(WAIT, first.conn.closed()).await.expect("old connection closed");
    assert!(
        matches!(&err, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::REPLACED.into()),
        "{err}"
    );

    assert!(matches!(second.enroll().await.expect("re-enroll"), ServerMessage::Welcome(_)));
    let again = second.next_task().await.expect("task re-sent");
    assert_eq!((again.round, again.task_id, again.nonce), (task.round, task.task_id, task.nonce));
    let ack = second.exchange(&ClientMessage::Update(update_for(&again, &trained_delta(1.0)))).await.expect("update");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
    assert!(checkpoint_path(&fed.state(), Round(1)).exists());
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await.expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}
