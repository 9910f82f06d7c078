//! Rank budgets over real QUIC with mutual TLS: two LoRA clients that declare different upload
//! bandwidths get different ranks from the server's importance budgets, their uploads differ in
//! size by exactly the triplets they were not granted, the slow one's upload fits its bandwidth ×
//! deadline, and the committed global is the exact merge of what the two sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedpool_client::model::BertConfig;
use fedpool_client::session::{self, DaemonConfig, DaemonOptions, FrameTap};
use fedpool_client::spec::{AdapterChoice, AdapterOptions};
use fedpool_common::checkpoint::{checkpoint_path, read_pool};
use fedpool_common::codec::{self, CodecConfig, DecodeLimits};
use fedpool_common::frame::{FrameHeader, FrameLimits, HEADER_LEN};
use fedpool_common::wire::{ClientMessage, Update};
use fedpool_common::Round;
use fedpool_server::aggregate::{AggregateConfig, Aggregator, Merge};
use fedpool_server::budget::TripletCosts;
use fedpool_server::net::Outcome;
use fedpool_tests::Federation;
use tokio::sync::watch;

type Frames = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

const DEADLINE_S: f64 = 30.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_with_different_bandwidth_get_different_ranks_and_the_global_is_their_exact_merge() {
    let options = AdapterOptions {
        choice: AdapterChoice::AdaLora,
        rank: 4,
        alpha: 8.0,
        lora_modules: vec!["attention.self.query".into(), "attention.self.value".into()],
        ..AdapterOptions::default()
    };
    let names = ["fast", "slow"];
    let fed = Federation::with_options(&names, &BertConfig::tiny(), &options);
    let targets = fed.spec.targets.len();
    assert_eq!(targets, 4, "q and v of two layers");

    // The slow client's link carries rank 2 on every target within the deadline, not more.
    let costs = TripletCosts::measure(&fed.spec, &CodecConfig::default(), 0).expect("costs");
    // (Whole bytes per second, as `client.toml` declares them, rounded up.)
    let slow_bps = (costs.bytes(&vec![2; targets]) + 1).div_ceil(DEADLINE_S as u64) as f64;
    let budget = "[budget]\npolicy = \"importance\"\nsafety_margin = 1.0\nexpected_compute_s = 0.0\n\
                  init_rank = 4\ntarget_rank = 4";
    fed.write_server_config(1, 2, 2, &format!("{DEADLINE_S}s"), &format!("evaluate = false\n{budget}"));
    let (server, _) = fed.start_server_in_process().await;

    let frames: Frames = Arc::default();
    let (_stop_tx, stop) = watch::channel(false);
    for (name, bps) in [("fast", 1e9), ("slow", slow_bps)] {
        let top = format!("declared_upload_bps = {}", bps as u64);
        let path = fed.write_client_config_with(name, "model", "quantization = \"fp32\"", &top);
        let config = DaemonConfig::load(&path).expect("client config");
        let (who, sink) = (name.to_string(), frames.clone());
        let tap: FrameTap = Arc::new(move |b: &[u8]| sink.lock().expect("lock").push((who.clone(), b.to_vec())));
        let options = DaemonOptions { tap: Some(tap), ..DaemonOptions::default() };
        tokio::spawn(session::run(config, options, stop.clone()));
    }
    let outcome =
        tokio::time::timeout(Duration::from_secs(120), server.wait()).await.expect("in time").expect("server");
    assert_eq!(outcome, Outcome::Finished(Round(1)));

    let limits = DecodeLimits { max_values: fed.spec.num_params() as u64, max_raw_bytes: 1 << 30 };
    let mut sent: BTreeMap<String, (Update, usize)> = BTreeMap::new();
    for (who, bytes) in frames.lock().expect("lock").iter() {
        let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("header");
        let h = FrameHeader::parse(&header, &FrameLimits::default()).expect("header");
        if let ClientMessage::Update(u) = ClientMessage::decode(h.kind, &bytes[HEADER_LEN..]).expect("decode") {
            sent.insert(who.clone(), (u, bytes.len()));
        }
    }
    let ranks = |who: &str| {
        let delta = codec::decode(&sent[who].0.delta, &limits).expect("decode");
        delta.lora_ranks(&fed.spec).into_values().collect::<Vec<_>>()
    };
    assert_eq!(ranks("fast"), vec![4; targets], "the fast client trains every triplet");
    assert_eq!(ranks("slow"), vec![2; targets], "the slow client trains what its link carries");

    // The sizes differ by the 8 triplets the slow client was not granted, and its upload fits.
    let (fast_bytes, slow_bytes) = (sent["fast"].1 as f64, sent["slow"].1 as f64);
    let eight_triplets: f64 = costs.per_triplet().iter().map(|c| 2.0 * c).sum();
    assert!(
        ((fast_bytes - slow_bytes) - eight_triplets).abs() <= 64.0,
        "{fast_bytes} − {slow_bytes} vs {eight_triplets}"
    );
    assert!(slow_bytes <= slow_bps * DEADLINE_S, "{slow_bytes} bytes > the link's {}", slow_bps * DEADLINE_S);

    // The checkpoint is the exact merge of the two heterogeneous-rank updates.
    let start = read_pool(&checkpoint_path(&fed.state(), Round(0))).expect("round 0").0;
    let got = read_pool(&checkpoint_path(&fed.state(), Round(1))).expect("round 1").0;
    let mut merge = Aggregator::new(fed.spec.clone(), AggregateConfig::default()).expect("merge");
    merge.begin(&start).expect("begin");
    for (u, _) in sent.values() {
        merge.fold(&codec::decode(&u.delta, &limits).expect("decode"), u.examples).expect("fold");
    }
    let want = merge.finish(&start).expect("finish");
    for (name, t) in &want.tensors {
        let g = &got.tensors[name];
        let diff = t.data().iter().zip(g.data()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "{name}: the checkpoint differs from the exact merge by {diff}");
    }
    assert_ne!(got.tensors, start.tensors, "the round changed the global");
}
