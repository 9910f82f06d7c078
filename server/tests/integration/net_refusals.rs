//! Who is refused, and that a refusal touches only the refused connection: clients without a
//! federation certificate or with a revoked one, and connections that send bad frames — while an
//! honest client on another connection completes its round.

use crate::net_support;

use fedpool_common::checkpoint::{checkpoint_path, read_pool};
use fedpool_common::frame::MessageKind;
use fedpool_common::wire::{ClientMessage, ServerMessage, Welcome};
use fedpool_common::Round;
use fedpool_server::certs;
use fedpool_server::config::ServerConfig;
use fedpool_server::metrics::Metrics;
use fedpool_server::net::{close, Outcome, Server};
use net_support::*;

async fn start(fed: &Federation, toml: &str) -> Server {
    let config = ServerConfig::parse(toml, fed.dir.path()).expect("config");
    let p = config.prepare().expect("prepare");
    Server::start(p.net, p.engine, p.store, Metrics::new()).await.expect("start server")
}

/// The first exchange of a refused client fails; returns the error's text.
async fn refused(addr: std::net::SocketAddr, fed: &Federation, identity: Option<Identity>) -> String {
    let client = match TestClient::connect(addr, fed, identity).await {
        Err(e) => return e.to_string(),
        Ok(c) => c,
    };
    match client.enroll().await {
        Ok(answer) => panic!("a refused client got an answer: {answer:?}"),
        // The exchange fails; the connection's close says why.
        Err(e) => format!("{e}; connection: {}", client.conn.closed().await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_or_with_a_revoked_certificate_are_refused_while_an_honest_client_completes() {
    let fed = Federation::new(&["honest", "mallory"]);
    let server = start(&fed, &fed.config_toml(1, 1, "5s", "")).await;
    let addr = server.local_addr();

    // Revoked after the server started: the list is re-read on every new connection.
    let r = certs::revoke(&fed.certs(), "mallory").expect("revoke");
    assert!(r.newly_added);

    // The honest client is mid-round while the others are refused.
    let honest = TestClient::connect_as(addr, &fed, "honest").await;
    assert!(matches!(honest.enroll().await.expect("enroll"), ServerMessage::Welcome(Welcome { .. })));
    let task = honest.next_task().await.expect("task");

    let no_cert = refused(addr, &fed, None).await;
    assert!(no_cert.contains("handshake failed") && no_cert.contains("no certificates"), "no certificate: {no_cert}");

    let forged = refused(addr, &fed, Some(self_signed("honest"))).await;
    assert!(forged.contains("handshake failed"), "self-signed: {forged}");

    let other = Federation::new(&["honest"]);
    let foreign = refused(addr, &fed, Some(identity(&other, "honest"))).await;
    assert!(foreign.contains("handshake failed"), "foreign CA: {foreign}");
    eprintln!("refusals as the clients see them:\n  no certificate: {no_cert}\n  self-signed: {forged}\n  foreign CA: {foreign}");

    let revoked = refused(addr, &fed, Some(identity(&fed, "mallory"))).await;
    assert!(revoked.contains("revoked") && revoked.contains("mallory"), "revoked: {revoked}");

    let ack = honest.exchange(&ClientMessage::Update(update_for(&task, &trained_delta(1.0)))).await.expect("update");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
    assert!(read_pool(&checkpoint_path(&fed.state(), Round(1))).is_ok());
}

/// Sends `bytes` as a request on a fresh connection of `name`; returns the close the server
/// answered with.
async fn bad_frame(addr: std::net::SocketAddr, fed: &Federation, name: &str, bytes: &[u8]) -> quinn::ApplicationClose {
    let client = TestClient::connect_as(addr, fed, name).await;
    let r = client.raw_exchange(bytes).await;
    assert!(r.is_err(), "a bad frame got an answer: {r:?}");
    match tokio::time::timeout(WAIT, client.conn.closed()).await.expect("closed in time") {
        quinn::ConnectionError::ApplicationClosed(c) => c,
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_truncated_and_garbage_frames_close_only_their_connection() {
    let fed = Federation::new(&["honest", "noisy"]);
    let toml = fed.config_toml(1, 1, "5s", "max_frame_bytes = 1000000");
    let server = start(&fed, &toml).await;
    let addr = server.local_addr();
    let honest = TestClient::connect_as(addr, &fed, "honest").await;
    assert!(matches!(honest.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // An update claiming 2 GiB: refused from the header alone, nothing allocated.
        ("oversized update", header(MessageKind::Update as u8, 1 << 31).to_vec(), "exceeds"),
        // A control message over the 64 KiB control cap.
        ("oversized heartbeat", header(MessageKind::Heartbeat as u8, 1 << 20).to_vec(), "exceeds"),
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "not a fedpool frame"),
        ("truncated", [&header(MessageKind::Enroll as u8, 100)[..], &[0u8; 10]].concat(), "truncated"),
        ("malformed body", [&header(MessageKind::Enroll as u8, 16)[..], &[0xffu8; 16]].concat(), "malformed"),
        ("unknown kind", header(99, 0).to_vec(), "unknown message kind"),
        (
            "server-only kind",
            ServerMessage::Welcome(Welcome { client_name: "x".into(), round: Round(0), heartbeat_secs: 1 })
                .to_frame()
                .expect("frame"),
            "unexpected",
        ),
    ];
    for (what, bytes, reason) in &cases {
        let c = bad_frame(addr, &fed, "noisy", bytes).await;
        let text = String::from_utf8_lossy(&c.reason).to_string();
        assert_eq!(c.error_code, close::PROTOCOL.into(), "{what}: {text}");
        assert!(text.contains(reason), "{what}: close reason {text:?} should mention {reason:?}");
        // The honest connection is untouched.
        assert!(matches!(honest.heartbeat(1).await, Ok(ServerMessage::Heartbeat(_))), "after {what}");
    }

    let task = honest.next_task().await.expect("task");
    let ack = honest.exchange(&ClientMessage::Update(update_for(&task, &trained_delta(1.0)))).await.expect("update");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    let metrics = server.metrics();
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
    let text = metrics.render();
    assert!(
        text.contains(&format!("fedpool_updates_rejected_total{{reason=\"protocol\"}} {}\n", cases.len())),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_for_another_backbone_is_rejected_and_the_connection_dropped() {
    let fed = Federation::new(&["stranger"]);
    let server = start(&fed, &fed.config_toml(1, 1, "5s", "")).await;
    let client = TestClient::connect_as(server.local_addr(), &fed, "stranger").await;
    let mut enroll = enroll_msg();
    enroll.backbone = fedpool_common::BackboneFingerprint(fedpool_common::Sha256::of(b"another model"));
    match client.exchange(&ClientMessage::Enroll(enroll)).await.expect("an answer") {
        ServerMessage::Reject(r) => {
            assert_eq!(r.reason, fedpool_common::wire::RejectReason::BackboneMismatch, "{}", r.detail)
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    match tokio::time::timeout(WAIT, client.conn.closed()).await.expect("closed in time") {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, close::DROPPED.into()),
        other => panic!("expected an application close, got {other}"),
    }
    let text = server.metrics().render();
    assert!(text.contains("fedpool_updates_rejected_total{reason=\"backbone_mismatch\"} 1"), "{text}");
    assert_eq!(server.shutdown().await.expect("shutdown"), Outcome::ShutDown(Round(0)));
}
