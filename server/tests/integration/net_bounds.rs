//! Every resource a client can make the server hold is bounded (`NetBounds`): the time to enroll,
//! the time for a control frame, an upload's progress, the bytes of uploads in flight, the
//! connections open, the pushes queued per connection — and each bound closes or refuses only the
//! client that exceeds it, over real QUIC, while honest clients complete their rounds.

use std::time::{Duration, Instant};

use crate::net_support;

use fedpool_common::frame::{MessageKind, HEADER_LEN};
use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_common::Round;
use fedpool_server::net::{close, Outcome};
use net_support::*;

fn reason(c: &quinn::ApplicationClose) -> String {
    String::from_utf8_lossy(&c.reason).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_enrolls_is_closed_after_enroll_timeout_while_an_enrolled_one_stays() {
    let fed = Federation::new(&["lurker", "honest"]);
    let server = start_server(&fed, &fed.config_toml(2, 1, "30s", "enroll_timeout = \"700ms\"")).await;
    let addr = server.local_addr();
    let started = Instant::now();
    let lurker = TestClient::connect_as(addr, &fed, "lurker").await;
    let honest = TestClient::connect_as(addr, &fed, "honest").await;
    assert!(matches!(honest.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));

    let c = server_close(&lurker.conn).await;
    let waited = started.elapsed();
    assert_eq!(c.error_code, close::PROTOCOL.into(), "{}", reason(&c));
    assert!(reason(&c).contains("no Enroll within 700ms (enroll_timeout)"), "{}", reason(&c));
    assert!(waited >= Duration::from_millis(700), "closed after {waited:?}, before the timeout");
    eprintln!("a connection that never enrolled was closed after {waited:?}: {}", reason(&c));

    // Well past the timeout, the enrolled connection still works.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(matches!(honest.heartbeat(7).await, Ok(ServerMessage::Heartbeat(_))));
    assert_eq!(server.metrics().closed("enroll_timeout"), 1);
    assert_eq!(server.shutdown().await.expect("shutdown"), Outcome::ShutDown(Round(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_past_upload_stall_timeout_is_cut_while_an_honest_clients_round_commits() {
    let fed = Federation::new(&["dribbler", "honest"]);
    let toml = fed.config_toml(1, 1, "20s", "upload_stall_timeout = \"500ms\"");
    let server = start_server(&fed, &toml).await;
    let addr = server.local_addr();
    let honest = TestClient::connect_as(addr, &fed, "honest").await;
    assert!(matches!(honest.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    let task = honest.next_task().await.expect("task");

    // An update's header and its first 100 bytes, then nothing: the body stalls.
    let dribbler = TestClient::connect_as(addr, &fed, "dribbler").await;
    let started = Instant::now();
    let partial = [&header(MessageKind::Update as u8, 5000)[..], &[0u8; 100]].concat();
    let _stream = dribbler.send_partial(&partial).await;
    let c = server_close(&dribbler.conn).await;
    let waited = started.elapsed();
    let text = reason(&c);
    assert_eq!(c.error_code, close::PROTOCOL.into(), "{text}");
    assert!(text.contains("stalled at 100 of 5000 bytes") && text.contains("upload_stall_timeout"), "{text}");
    assert!(waited >= Duration::from_millis(500) && waited < WAIT, "closed after {waited:?}");
    eprintln!("a stalled upload was cut after {waited:?}: {text}");

    // The honest client's upload pauses 300 ms between its header and its body: slow, but under
    // the stall time.
    let frame = ClientMessage::Update(update_for(&task, &trained_delta(1.0))).to_frame().expect("frame");
    let ack = honest.paced_exchange(&frame, HEADER_LEN, Duration::from_millis(300)).await.expect("update");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    let metrics = server.metrics();
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
    assert_eq!(metrics.closed("upload_stalled"), 1);
    assert_eq!(metrics.upload_bytes_in_flight(), 0, "the stalled upload's budget was given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_frame_slower_than_control_timeout_is_refused_while_a_slower_upload_is_acked() {
    let fed = Federation::new(&["slowpoke", "honest"]);
    let toml = fed.config_toml(1, 1, "20s", "control_timeout = \"400ms\"\nupload_stall_timeout = \"5s\"");
    let server = start_server(&fed, &toml).await;
    let addr = server.local_addr();
    let honest = TestClient::connect_as(addr, &fed, "honest").await;
    assert!(matches!(honest.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    let task = honest.next_task().await.expect("task");

    // An Enroll whose body comes 1 s after its header: over the control timeout.
    let slowpoke = TestClient::connect_as(addr, &fed, "slowpoke").await;
    let enroll = ClientMessage::Enroll(enroll_msg()).to_frame().expect("frame");
    let started = Instant::now();
    let r = slowpoke.paced_exchange(&enroll, HEADER_LEN + 3, Duration::from_secs(1)).await;
    assert!(r.is_err(), "a slow control frame got an answer: {r:?}");
    let c = server_close(&slowpoke.conn).await;
    let text = reason(&c);
    assert_eq!(c.error_code, close::PROTOCOL.into(), "{text}");
    assert!(text.contains("Enroll frame") && text.contains("within 400ms (control_timeout)"), "{text}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400), "closed after {waited:?}");

    // The same pause inside an upload is fine: bulk frames are timed by their progress.
    let frame = ClientMessage::Update(update_for(&task, &trained_delta(1.0))).to_frame().expect("frame");
    let ack = honest.paced_exchange(&frame, HEADER_LEN, Duration::from_secs(1)).await.expect("update");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    let metrics = server.metrics();
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
    assert_eq!(metrics.closed("control_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused_while_the_open_ones_complete_their_round() {
    let fed = Federation::new(&["a", "b", "c"]);
    let server = start_server(&fed, &fed.config_toml(2, 1, "20s", "max_connections = 2")).await;
    let addr = server.local_addr();
    let a = TestClient::connect_as(addr, &fed, "a").await;
    let b = TestClient::connect_as(addr, &fed, "b").await;
    for c in [&a, &b] {
        assert!(matches!(c.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    }
    let tasks = [a.next_task().await.expect("task a"), b.next_task().await.expect("task b")];

    for attempt in 0..3 {
        let third = TestClient::connect(addr, &fed, Some(identity(&fed, "c"))).await;
        let e = third.err().unwrap_or_else(|| panic!("attempt {attempt}: a third connection was accepted"));
        assert!(e.to_string().contains("refused"), "attempt {attempt}: {e}");
        if attempt == 0 {
            eprintln!("the third connection, as its client sees it: {e}");
        }
    }
    assert_eq!(server.metrics().refused("too_many_connections"), 3);

    for c in [&a, &b] {
        assert!(matches!(c.heartbeat(1).await, Ok(ServerMessage::Heartbeat(_))));
    }
    let (ua, ub) = (
        ClientMessage::Update(update_for(&tasks[0], &trained_delta(1.0))),
        ClientMessage::Update(update_for(&tasks[1], &trained_delta(2.0))),
    );
    let (ra, rb) = tokio::join!(a.exchange(&ua), b.exchange(&ub));
    assert!(matches!(ra, Ok(ServerMessage::Ack(_))), "{ra:?}");
    assert!(matches!(rb, Ok(ServerMessage::Ack(_))), "{rb:?}");
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retry_above_handshakes_zero_every_client_is_address_validated_by_a_quic_retry_and_completes() {
    let fed = Federation::new(&["honest"]);
    let server = start_server(&fed, &fed.config_toml(1, 1, "20s", "retry_above_handshakes = 0")).await;
    let honest = TestClient::connect_as(server.local_addr(), &fed, "honest").await;
    assert!(matches!(honest.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    let task = honest.next_task().await.expect("task");
    let ack = honest.exchange(&ClientMessage::Update(update_for(&task, &trained_delta(1.0)))).await;
    assert!(matches!(ack, Ok(ServerMessage::Ack(_))), "{ack:?}");
    let metrics = server.metrics();
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
    assert_eq!(metrics.quic_retries(), 1, "one Retry, then the validated connection is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_the_byte_budget_wait_and_all_complete_without_the_budget_ever_being_exceeded() {
    const CLIENTS: usize = 6;
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("c{i}")).collect();
    let fed = Federation::new(&names.iter().map(String::as_str).collect::<Vec<_>>());
    // Room for one update body at a time (1.5 × the longest one).
    let longest = max_update_body_len();
    let budget = longest * 3 / 2;
    let toml = fed.config_toml(CLIENTS, 1, "20s", &format!("max_upload_bytes_in_flight = {budget}"));
    let server = start_server(&fed, &toml).await;
    let addr = server.local_addr();
    let metrics = server.metrics();
    let mut clients = Vec::new();
    for n in &names {
        let c = TestClient::connect_as(addr, &fed, n).await;
        assert!(matches!(c.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
        clients.push(c);
    }
    let mut uploads = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let task = c.next_task().await.expect("task");
        let update = ClientMessage::Update(update_for(&task, &trained_delta(1.0 + i as f32)));
        // Every update at once; each is acknowledged only once the round commits, which needs all
        // six: the budget must be given back when the engine has handled an update, not at its Ack.
        uploads.push(tokio::spawn(async move {
            let r = c.exchange(&update).await;
            (c, r)
        }));
    }
    for u in uploads {
        let (_c, r) = u.await.expect("upload task");
        assert!(matches!(r, Ok(ServerMessage::Ack(_))), "{r:?}");
    }
    let outcome = tokio::time::timeout(WAIT, server.wait()).await.expect("server ends").expect("server ok");
    assert_eq!(outcome, Outcome::Finished(Round(1)));
    let peak = metrics.upload_bytes_in_flight_max();
    eprintln!("upload bodies of at most {longest} bytes, budget {budget}: peak in flight {peak} bytes");
    assert!(peak as usize <= budget, "the budget was exceeded: {peak} > {budget}");
    assert!(peak as usize >= longest - 32, "the budget was never used: {peak}");
    assert_eq!(metrics.upload_bytes_in_flight(), 0, "every byte given back");
    assert!(metrics.render().contains("\nfedpool_upload_bytes_in_flight 0\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_no_pushes_never_has_more_than_one_in_flight_and_is_closed_once_its_queue_is_full() {
    let fed = Federation::new(&["deaf"]);
    // A round that retries every 150 ms: each attempt pushes the only client a new task (about
    // 20 tasks before the queue is full), and the client never accepts a push stream.
    let toml = fed.config_toml(1, 1, "150ms", "max_queued_pushes = 3\nupload_stall_timeout = \"30s\"");
    let server = start_server(&fed, &toml).await;
    let deaf = TestClient::connect_as(server.local_addr(), &fed, "deaf").await;
    assert!(matches!(deaf.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    let beat = {
        let conn = deaf.conn.clone();
        tokio::spawn(async move {
            // Heartbeats keep the client alive for the engine, on request streams of its own.
            for seq in 0.. {
                let Ok((mut s, _r)) = conn.open_bi().await else { return };
                let hb = ClientMessage::Heartbeat(fedpool_common::wire::Heartbeat { seq });
                let _ = s.write_all(&hb.to_frame().expect("frame")).await;
                let _ = s.finish();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let c = server_close(&deaf.conn).await;
    beat.abort();
    let text = reason(&c);
    assert_eq!(c.error_code, close::PROTOCOL.into(), "{text}");
    assert!(text.contains("more than 3 pushes waiting (max_queued_pushes)"), "{text}");
    let metrics = server.metrics();
    eprintln!("closed: {text}; pushes in flight at most {}", metrics.pushes_in_flight_max());
    assert_eq!(metrics.pushes_in_flight_max(), 1, "one push at a time per connection");
    assert_eq!(metrics.closed("push_queue_full"), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metrics.pushes_in_flight(), 0, "the closed connection's push writer is gone");
    assert_eq!(server.shutdown().await.expect("shutdown"), Outcome::ShutDown(Round(0)));
}
