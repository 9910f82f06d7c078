//! Protocol messages: round trips through frames, random bytes never panic a decoder, and an
//! update is validated against its task and the pool spec with the right reject reason.

use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolSpec, SlotUsage, TargetSpec};
use fedpool_common::codec::{decode, encode, CodecConfig, DecodeLimits, EncodedDelta, Quantization};
use fedpool_common::frame::{read_frame, FrameHeader, FrameLimits, MessageKind, HEADER_LEN};
use fedpool_common::wire::*;
use fedpool_common::{BackboneFingerprint, HostTensor, Nonce, Round, Sha256, TaskId};
use proptest::prelude::*;

fn spec() -> PoolSpec {
    let targets = (0..2).map(|i| TargetSpec { name: format!("layer.{i}.query"), dim_in: 16, dim_out: 16 }).collect();
    PoolSpec::ssf_pool(targets, 16, 5, 2, Some(HeadSpec::new(16, 2)))
}

fn task() -> ExpectedTask {
    ExpectedTask { round: Round(3), task_id: TaskId(11), nonce: Nonce::random() }
}

fn honest_update(t: &ExpectedTask, spec: &PoolSpec) -> Update {
    let start = AdapterPool::init(spec, 1).unwrap();
    let mut trained = start.clone();
    trained.tensors.values_mut().for_each(|t| t.data_mut().iter_mut().for_each(|v| *v += 0.01));
    let delta = trained
        .delta_from(&start)
        .unwrap()
        .restrict_to_slots(SlotUsage { slots: vec![0, 3], counts: vec![5, 2] })
        .unwrap();
    let cfg = CodecConfig { top_k: Some(0.5), quantization: Quantization::Int8, ..Default::default() };
    Update {
        round: t.round,
        task_id: t.task_id,
        nonce: t.nonce,
        examples: 7,
        delta: encode(&delta, &cfg, None, 0).unwrap(),
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.8, steps: 10, seconds: 1.0 },
        importance: vec![],
    }
}

fn roundtrip_client(m: &ClientMessage) -> ClientMessage {
    let frame = m.to_frame().unwrap();
    let (kind, body) = read_frame(&mut &frame[..], &FrameLimits::default()).unwrap();
    ClientMessage::decode(kind, &body).unwrap()
}

#[test]
fn every_message_round_trips_through_a_frame() {
    let s = spec();
    let t = task();
    let enroll = ClientMessage::Enroll(Enroll {
        protocol_version: PROTOCOL_VERSION,
        backbone: BackboneFingerprint(Sha256::of(b"minilm")),
        spec_hash: s.hash(),
        declared_upload_bps: Some(1_000_000),
        declared_download_bps: None,
        examples: 100,
        software: "fedpool-client 0.1.0".into(),
    });
    assert_eq!(roundtrip_client(&enroll), enroll);
    let update = ClientMessage::Update(honest_update(&t, &s));
    assert_eq!(roundtrip_client(&update), update);
    let hb = ClientMessage::Heartbeat(Heartbeat { seq: 42 });
    assert_eq!(roundtrip_client(&hb), hb);

    let global = encode(
        &AdapterPool::init(&s, 2).unwrap().delta_from(&AdapterPool::zeros(&s)).unwrap(),
        &CodecConfig::default(),
        None,
        0,
    )
    .unwrap();
    let server = [
        ServerMessage::Welcome(Welcome { client_name: "hospital-a".into(), round: Round(2), heartbeat_secs: 5 }),
        ServerMessage::Task(Box::new(RoundTask {
            round: t.round,
            task_id: t.task_id,
            nonce: t.nonce,
            global,
            rank_budget: vec![TargetBudget { target: "layer.0.query".into(), rank: 4 }],
            local_steps: 20,
            deadline_ms: 60_000,
        })),
        ServerMessage::Ack(Ack { round: t.round, task_id: t.task_id }),
        ServerMessage::Reject(Reject {
            round: None,
            task_id: None,
            reason: RejectReason::BackboneMismatch,
            detail: "expects minilm".into(),
        }),
        ServerMessage::Heartbeat(Heartbeat { seq: 1 }),
    ];
    for m in server {
        let frame = m.to_frame().unwrap();
        let (kind, body) = read_frame(&mut &frame[..], &FrameLimits::default()).unwrap();
        assert_eq!(ServerMessage::decode(kind, &body).unwrap(), m);
    }
}

#[test]
fn a_message_of_the_wrong_direction_is_refused() {
    let frame = ServerMessage::Heartbeat(Heartbeat { seq: 1 }).to_frame().unwrap();
    let (_, body) = read_frame(&mut &frame[..], &FrameLimits::default()).unwrap();
    assert!(ClientMessage::decode(MessageKind::Ack, &body).is_err());
}

#[test]
fn an_honest_update_validates_and_decodes() {
    let (s, t) = (spec(), task());
    let delta = honest_update(&t, &s).validate(&t, &s, &DecodeLimits::default()).unwrap();
    assert_eq!(delta.slots.as_ref().unwrap().slots, vec![0, 3]);
}

#[test]
fn bad_updates_get_the_right_reason() {
    let (s, t) = (spec(), task());
    let limits = DecodeLimits::default();
    let reason = |u: &Update| u.validate(&t, &s, &limits).unwrap_err().reason;

    let mut u = honest_update(&t, &s);
    u.nonce = Nonce::random();
    assert_eq!(reason(&u), RejectReason::WrongNonce);

    let mut u = honest_update(&t, &s);
    u.round = Round(2);
    assert_eq!(reason(&u), RejectReason::WrongRound);

    let mut u = honest_update(&t, &s);
    u.task_id = TaskId(12);
    assert_eq!(reason(&u), RejectReason::UnknownTask);

    let mut u = honest_update(&t, &s);
    u.metrics.loss = f32::NAN;
    assert_eq!(reason(&u), RejectReason::NonFinite);

    let mut u = honest_update(&t, &s);
    let mut payload = u.delta.payload.to_vec();
    *payload.last_mut().expect("a non-empty payload") ^= 0xff;
    u.delta.payload = payload.into();
    assert_eq!(reason(&u), RejectReason::Corrupt);

    // A NaN inside the delta, re-encoded so the digest is valid.
    let mut u = honest_update(&t, &s);
    let mut d = decode(&u.delta, &limits).unwrap();
    d.tensors.get_mut("layer.1.query.ssf_shift").unwrap().data_mut()[0] = f32::NAN;
    u.delta = encode(&d, &CodecConfig::default(), None, 0).unwrap();
    let err = u.validate(&t, &s, &limits).unwrap_err();
    assert_eq!(err.reason, RejectReason::NonFinite);
    assert!(err.detail.contains("layer.1.query.ssf_shift"), "{}", err.detail);

    // A wrong shape, re-encoded: the reason names the tensor and both shapes.
    let mut d = decode(&honest_update(&t, &s).delta, &limits).unwrap();
    d.tensors.insert("layer.0.query.ssf_scale".into(), HostTensor::zeros(&[2, 17]));
    let mut u = honest_update(&t, &s);
    u.delta = encode(&d, &CodecConfig::default(), None, 0).unwrap();
    let err = u.validate(&t, &s, &limits).unwrap_err();
    assert_eq!(err.reason, RejectReason::InvalidDelta);
    assert!(err.detail.contains("layer.0.query.ssf_scale") && err.detail.contains("[2, 17]"), "{}", err.detail);

    // Zero examples would give a zero aggregation weight.
    let mut u = honest_update(&t, &s);
    u.examples = 0;
    assert_eq!(reason(&u), RejectReason::InvalidDelta);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512), kind in 1u8..8) {
        let limits = FrameLimits::default();
        let _ = read_frame(&mut &bytes[..], &limits);
        if let Some(kind) = MessageKind::from_byte(kind) {
            let _ = ClientMessage::decode(kind, &bytes);
            let _ = ServerMessage::decode(kind, &bytes);
        }
        if bytes.len() >= HEADER_LEN {
            let _ = FrameHeader::parse(bytes[..HEADER_LEN].try_into().unwrap(), &limits);
        }
        // A codec payload with a valid digest: the body decoder sees the random bytes.
        for config in [CodecConfig::default(), CodecConfig { quantization: Quantization::Int4, zstd_level: Some(1), ..Default::default() }] {
            if let Ok(enc) = EncodedDelta::seal(config, bytes.len() as u64, bytes.clone()) {
                let _ = decode(&enc, &DecodeLimits::default());
            }
        }
    }

    #[test]
    fn mutated_valid_updates_never_panic(pos in any::<prop::sample::Index>(), byte: u8) {
        let (s, t) = (spec(), task());
        let mut frame = ClientMessage::Update(honest_update(&t, &s)).to_frame().unwrap();
        let i = pos.index(frame.len());
        frame[i] = byte;
        if let Ok((kind, body)) = read_frame(&mut &frame[..], &FrameLimits::default()) {
            if let Ok(ClientMessage::Update(u)) = ClientMessage::decode(kind, &body) {
                let _ = u.validate(&t, &s, &DecodeLimits::default());
            }
        }
    }
}
