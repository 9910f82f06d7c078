//! A decoder federation over real QUIC with mutual TLS: two client daemons fine-tune LoRA on a
//! tiny random Llama stored as a GGUF (the server checks the GGUF's fingerprint at enrollment),
//! judged by generation in the federated evaluation; a daemon with another GGUF is refused.

use std::time::Duration;

use fedpool_client::session::{self, DaemonConfig, DaemonOptions};
use fedpool_client::spec::{AdapterChoice, AdapterOptions};
use fedpool_common::checkpoint::{checkpoint_path, read_pool};
use fedpool_common::Round;
use fedpool_server::net::Outcome;
use fedpool_tests::Federation;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_federate_lora_on_a_gguf_decoder() {
    let names = ["ward-a", "ward-b"];
    let options = AdapterOptions {
        choice: AdapterChoice::Lora,
        rank: 4,
        alpha: 8.0,
        lora_modules: vec!["q_proj".into(), "v_proj".into()],
        ..AdapterOptions::default()
    };
    let fed = Federation::decoder(&names, &options);
    fed.write_server_config(3, 2, 2, "60s", "eval_deadline = \"60s\"\nlocal_steps = 12");
    let (server, _) = fed.start_server_in_process().await;
    let (_stop_tx, stop) = watch::channel(false);
    let mut daemons = Vec::new();
    for n in names {
        let path = fed.write_client_config_with(n, "tiny.gguf", "quantization = \"fp32\"", "");
        let text = std::fs::read_to_string(&path).unwrap().replace("lr = 0.01", "lr = 0.01\nmax_len = 32");
        std::fs::write(&path, text).unwrap();
        let config = DaemonConfig::load(&path).expect("client config");
        daemons.push(tokio::spawn(session::run(config, DaemonOptions::default(), stop.clone())));
    }
    let outcome =
        tokio::time::timeout(Duration::from_secs(180), server.wait()).await.expect("in time").expect("server");
    assert_eq!(outcome, Outcome::Finished(Round(3)));
    for d in daemons {
        let r = tokio::time::timeout(Duration::from_secs(30), d).await.expect("client ends").expect("join");
        assert_eq!(r.expect("client ok"), session::Outcome::Finished);
    }
    let rounds = fed.rounds();
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    let accuracy = |r: &serde_json::Value| r["eval"]["accuracy"].as_f64().unwrap_or(-1.0);
    eprintln!("exact match by round: {:?}", rounds.iter().map(accuracy).collect::<Vec<_>>());
    assert!(accuracy(&rounds[2]) >= 0.9, "{:?}", rounds[2]);
    for r in &rounds {
        assert!(r["bytes_up"].as_u64().unwrap_or(0) > 0 && r["bytes_down"].as_u64().unwrap_or(0) > 0, "{r}");
    }
    // The committed pool is a decoder's LoRA (no head), named by HF module paths.
    let (pool, meta) = read_pool(&checkpoint_path(&fed.state(), Round(3))).unwrap();
    assert!(meta.spec.head.is_none());
    assert!(pool.tensors.contains_key("model.layers.1.self_attn.v_proj.lora_B.weight"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_with_another_gguf_is_refused_at_enrollment() {
    let options = AdapterOptions { choice: AdapterChoice::Lora, rank: 4, ..AdapterOptions::default() };
    let options = AdapterOptions { lora_modules: vec!["q_proj".into()], ..options };
    let fed = Federation::decoder(&["other"], &options);
    // The same architecture and tokenizer, other weights: a different file, a different model.
    let config = fedpool_client::model::LlamaConfig { vocab_size: 128, ..fedpool_client::model::LlamaConfig::tiny() };
    let q8 = candle_core::quantized::GgmlDType::Q8_0;
    fedpool_client::model::write_random_gguf(fed.path("other.gguf"), &config, q8, 4).expect("gguf");
    fed.write_server_config(1, 1, 1, "10s", "evaluate = false");
    let (server, _) = fed.start_server_in_process().await;
    let config = DaemonConfig::load(&fed.write_client_config("other", "other.gguf", "")).expect("config");
    let (_tx, stop) = watch::channel(false);
    let r = tokio::time::timeout(Duration::from_secs(60), session::run(config, DaemonOptions::default(), stop))
        .await
        .expect("refused in time");
    match r {
        Err(session::DaemonError::Refused { reason, .. }) => assert_eq!(reason, "BackboneMismatch"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}
