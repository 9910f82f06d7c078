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

/// A merge whose `finish` takes `pause` (a large LoRA SVD, say) around a real aggregator.
struct SlowFinish(fedpool_server::aggregate::Aggregator, std::time::Duration);

impl fedpool_server::aggregate::Merge for SlowFinish {
    fn begin(&mut self, g: &AdapterPool) -> Result<(), fedpool_server::aggregate::AggregateError> {
        self.0.begin(g)
    }
    fn fold(&mut self, d: &fedpool_common::PoolDelta, n: u64) -> Result<(), fedpool_server::aggregate::AggregateError> {
        self.0.fold(d, n)
    }
    fn fold_weighted(
        &mut self,
        d: &fedpool_common::PoolDelta,
        n: u64,
        w: u64,
    ) -> Result<(), fedpool_server::aggregate::AggregateError> {
        self.0.fold_weighted(d, n, w)
    }
    fn finish(&mut self, g: &AdapterPool) -> Result<AdapterPool, fedpool_server::aggregate::AggregateError> {
        std::thread::sleep(self.1);
        self.0.finish(g)
    }
}

/// Issue 16, finding 6: the merge ran inside the engine task, so heartbeats that arrived during a
/// long merge were judged after it and live clients were dropped as idle. Now the engine works on
/// the blocking pool and each message is judged at the time it arrived: a 4 s merge with a 2 s
/// idle timeout drops nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_longer_than_the_idle_timeout_drops_no_live_client() {
    use fedpool_server::aggregate::{AggregateConfig, Aggregator};
    use fedpool_server::round::Engine;
    use std::sync::Arc;
    use std::time::Duration;

    let fed = Federation::new(&["a", "b"]);
    let toml = fed.config_toml(2, 2, "30s", "");
    let config = ServerConfig::parse(&toml, fed.dir.path()).expect("config");
    let p = config.prepare().expect("prepare");
    let mut engine_config = fedpool_server::round::EngineConfig {
        total_rounds: 2,
        clients_per_round: 2,
        quorum: 2,
        over_selection: 1.0,
        min_clients_to_start: 2,
        deadline: Duration::from_secs(30),
        local_steps: 1,
        seed: 7,
        download_codec: Default::default(),
        decode_limits: fedpool_common::codec::DecodeLimits::for_spec(&tiny_spec()),
        backbone: backbone(),
        heartbeat: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(2),
        eval_deadline: None,
        trust: Default::default(),
    };
    engine_config.trust.norm_bound = fedpool_server::round::NormBound::Off;
    let merge =
        SlowFinish(Aggregator::new(tiny_spec(), AggregateConfig::default()).expect("merge"), Duration::from_secs(4));
    let global = AdapterPool::init(&tiny_spec(), 7).expect("init");
    let engine = Engine::new(engine_config, tiny_spec(), Box::new(merge), Round(0), global).expect("engine");
    let server = Server::start(p.net, engine, p.store, Metrics::new()).await.expect("start");

    let mut clients = Vec::new();
    for name in ["a", "b"] {
        let c = Arc::new(TestClient::connect_as(server.local_addr(), &fed, name).await);
        assert!(matches!(c.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
        let beating = c.clone();
        tokio::spawn(async move {
            for seq in 1.. {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if beating.heartbeat(seq).await.is_err() {
                    return;
                }
            }
        });
        clients.push(c);
    }
    let tasks = [clients[0].next_task().await.expect("task a"), clients[1].next_task().await.expect("task b")];
    let (ca, cb) = (clients[0].clone(), clients[1].clone());
    let (ta, tb) = (tasks[0].clone(), tasks[1].clone());
    let ua =
        tokio::spawn(async move { ca.exchange(&ClientMessage::Update(update_for(&ta, &trained_delta(1.0)))).await });
    let ub =
        tokio::spawn(async move { cb.exchange(&ClientMessage::Update(update_for(&tb, &trained_delta(0.5)))).await });
    for u in [ua, ub] {
        let answer = u.await.expect("join").expect("answer");
        assert!(matches!(answer, ServerMessage::Ack(_)), "acknowledged after the 4 s merge: {answer:?}");
    }
    // Both are still there: round 2's tasks reach them, and neither connection was closed.
    for c in &clients {
        let t = c.next_task().await.expect("round 2 task");
        assert_eq!(t.round, Round(2));
        assert!(c.conn.close_reason().is_none(), "{:?}", c.conn.close_reason());
    }
    server.shutdown().await.expect("shutdown");
}
