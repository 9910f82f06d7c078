//! Bad peers against a running federation (in process, real QUIC with mutual TLS): a client on
//! another backbone is refused at enrollment with the server's words; a client that sends NaN,
//! wrong-shape and replayed updates gets a reject with the reason each time (and, at the third,
//! is quarantined), and every round still commits with the honest clients.

use std::time::Duration;

use fedpool_client::session::connection::{Dialer, Faults};
use fedpool_client::session::{self, DaemonConfig, DaemonError, DaemonOptions};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits};
use fedpool_common::wire::{
    ClientMessage, Enroll, RejectReason, RoundTask, ServerMessage, TrainMetrics, Update, PROTOCOL_VERSION,
};
use fedpool_common::{AdapterPool, BackboneFingerprint, HostTensor, PoolDelta, SlotUsage};
use fedpool_tests::Federation;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_on_another_backbone_is_refused_naming_the_expected_model() {
    let fed = Federation::new(&["honest", "other"]);
    fedpool_client::testkit::write_tiny_model(&fed.path("model2"), 2).expect("second model");
    fed.write_server_config(1, 1, 1, "10s", "evaluate = false");
    let (server, _) = fed.start_server_in_process().await;
    let config = DaemonConfig::load(&fed.write_client_config("other", "model2", "")).expect("config");
    let (_tx, stop) = watch::channel(false);
    let r = tokio::time::timeout(Duration::from_secs(60), session::run(config, DaemonOptions::default(), stop))
        .await
        .expect("refused in time");
    match r {
        Err(DaemonError::Refused { reason, detail }) => {
            assert_eq!(reason, "BackboneMismatch");
            let expected = BackboneFingerprint::of_model_dir(&fed.path("model")).expect("fp").to_string();
            assert!(detail.contains("expects model") && detail.contains(&expected[..16]), "{detail}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}

/// A delta of the task's pool with every value moved, restricted to slot 0.
fn delta_of(task: &RoundTask, fed: &Federation, value: f32) -> PoolDelta {
    let limits = DecodeLimits { max_values: 1 << 24, max_raw_bytes: 1 << 28 };
    let global =
        AdapterPool::from_transfer(&codec::decode(&task.global, &limits).expect("global"), &fed.spec).expect("pool");
    let mut moved = global.clone();
    moved.tensors.values_mut().for_each(|t| t.data_mut().iter_mut().for_each(|v| *v += value));
    moved
        .delta_from(&global)
        .expect("delta")
        .restrict_to_slots(SlotUsage { slots: vec![0], counts: vec![10] })
        .expect("slots")
}

fn update(task: &RoundTask, delta: &PoolDelta) -> Update {
    Update {
        round: task.round,
        task_id: task.task_id,
        nonce: task.nonce,
        examples: 10,
        delta: codec::encode(delta, &CodecConfig::default(), None, 1).expect("encode"),
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.5, steps: 1, seconds: 0.1 },
        importance: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nan_wrong_shape_and_replayed_updates_are_rejected_and_rounds_commit_with_the_honest() {
    let fed = Federation::new(&["h1", "h2", "mallory"]);
    fed.write_server_config(3, 3, 2, "20s", "evaluate = false");
    let (server, _) = fed.start_server_in_process().await;
    let (_tx, stop) = watch::channel(false);
    let mut honest = Vec::new();
    for n in ["h1", "h2"] {
        let config = DaemonConfig::load(&fed.write_client_config(n, "model", "")).expect("config");
        honest.push(tokio::spawn(session::run(config, DaemonOptions::default(), stop.clone())));
    }

    let dialer = Dialer::new(
        &fed.path("certs/ca.pem"),
        &fed.path("certs/clients/mallory.pem"),
        &fed.path("certs/clients/mallory.key"),
        "localhost",
        Duration::from_secs(10),
    )
    .expect("dialer");
    let conn = dialer.connect(server.local_addr(), None, Faults::default()).await.expect("connect");
    let enroll = Enroll {
        protocol_version: PROTOCOL_VERSION,
        backbone: BackboneFingerprint::of_model_dir(&fed.path("model")).expect("fp"),
        spec_hash: fed.spec.hash(),
        declared_upload_bps: None,
        declared_download_bps: None,
        examples: 10,
        software: "mallory".into(),
    };
    assert!(matches!(conn.exchange(&ClientMessage::Enroll(enroll)).await, Ok(ServerMessage::Welcome(_))));

    let next_task = || async {
        loop {
            match tokio::time::timeout(Duration::from_secs(60), conn.next_push()).await.expect("a task").expect("push")
            {
                ServerMessage::Task(t) => return *t,
                _ => continue,
            }
        }
    };
    let reject_reason = |m: ServerMessage| match m {
        ServerMessage::Reject(r) => r.reason,
        other => panic!("expected a reject, got {other:?}"),
    };

    // Round 1: a NaN.
    let t1 = next_task().await;
    let mut nan = delta_of(&t1, &fed, 0.01);
    if let Some(t) = nan.tensors.values_mut().next() {
        t.data_mut()[0] = f32::NAN;
    }
    let honest_looking = update(&t1, &delta_of(&t1, &fed, 0.01));
    let r = conn.exchange(&ClientMessage::Update(update(&t1, &nan))).await.expect("answer");
    assert_eq!(reject_reason(r), RejectReason::NonFinite);

    // Round 2: a tensor of the wrong shape; then the round-1 update replayed as is.
    let t2 = next_task().await;
    let mut wrong = delta_of(&t2, &fed, 0.01);
    if let Some(t) = wrong.tensors.values_mut().next() {
        *t = HostTensor::new(vec![1, 3], vec![0.1, 0.2, 0.3]).expect("tensor");
    }
    let r = conn.exchange(&ClientMessage::Update(update(&t2, &wrong))).await.expect("answer");
    assert_eq!(reject_reason(r), RejectReason::InvalidDelta);

    // Round 3: round 1's update spliced onto round 3's task (its old nonce): a replay.
    let t3 = next_task().await;
    let replay = Update { round: t3.round, task_id: t3.task_id, ..honest_looking.clone() };
    let r = conn.exchange(&ClientMessage::Update(replay)).await.expect("answer");
    assert_eq!(reject_reason(r), RejectReason::WrongNonce);
    // That was mallory's third refusal (default strikes = 3): it is quarantined and dropped.
    drop(honest_looking);
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.quic().closed()).await.expect("closed");
    assert!(closed.to_string().contains("quarantined"), "{closed}");

    let outcome =
        tokio::time::timeout(Duration::from_secs(120), server.wait()).await.expect("in time").expect("server");
    assert_eq!(outcome, fedpool_server::net::Outcome::Finished(fedpool_common::Round(3)));
    for h in honest {
        assert_eq!(h.await.expect("join").expect("honest client"), session::Outcome::Finished);
    }
    let rounds = fed.rounds();
    assert_eq!(rounds.len(), 3);
    for (i, reason) in ["NonFinite", "InvalidDelta", "WrongNonce"].iter().enumerate() {
        assert_eq!(rounds[i]["clients"], serde_json::json!(["h1", "h2"]), "{:?}", rounds[i]);
        assert!(rounds[i]["rejected"][reason].as_u64().unwrap_or(0) >= 1, "round {}: {:?}", i + 1, rounds[i]);
    }
}
