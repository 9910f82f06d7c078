//! The server optimiser's state (FedAdam's moments) is saved with every committed round and
//! restored on restart: a resumed server continues the same optimisation.

use crate::net_support;

use fedpool_common::checkpoint::read_tensors;
use fedpool_common::wire::{ClientMessage, ServerMessage};
use fedpool_common::Round;
use fedpool_server::aggregate::{FEDADAM_M_PREFIX, FEDADAM_V_PREFIX};
use fedpool_server::config::ServerConfig;
use fedpool_server::metrics::Metrics;
use fedpool_server::net::Server;
use fedpool_server::store::server_state_path;
use net_support::*;

const FEDADAM: &str = "[aggregate]\nstrategy = \"fedadam\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedadam_moments_survive_a_restart_and_a_damaged_state_file_is_named() {
    let fed = Federation::new(&["clinic-a"]);
    let toml = fed.config_toml(1, 3, "5s", FEDADAM);
    let config = ServerConfig::parse(&toml, fed.dir.path()).expect("config");
    let p = config.prepare().expect("prepare");
    let fresh = p.engine.server_state();
    assert!(!fresh.is_empty(), "FedAdam keeps moments");
    let server = Server::start(p.net, p.engine, p.store, Metrics::new()).await.expect("start server");
    let mut committed = server.committed();

    // One round with one client's update.
    let client = TestClient::connect_as(server.local_addr(), &fed, "clinic-a").await;
    assert!(matches!(client.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    let task = client.next_task().await.expect("task");
    let ack = client.exchange(&ClientMessage::Update(update_for(&task, &trained_delta(1.0)))).await.expect("update");
    assert!(matches!(ack, ServerMessage::Ack(_)), "{ack:?}");
    tokio::time::timeout(WAIT, committed.wait_for(|r| *r >= Round(1))).await.expect("commit in time").expect("commit");
    drop(client);
    server.shutdown().await.expect("clean shutdown");

    // The moments after round 1 are on disk beside its checkpoint, and they moved.
    let path = server_state_path(&fed.state(), Round(1));
    let (saved, _) = read_tensors(&path).expect("server state of round 1");
    assert_eq!(saved.keys().collect::<Vec<_>>(), fresh.keys().collect::<Vec<_>>());
    assert!(saved.keys().all(|k| k.starts_with(FEDADAM_M_PREFIX) || k.starts_with(FEDADAM_V_PREFIX)));
    let moved = |prefix: &str| saved.iter().filter(|(k, _)| k.starts_with(prefix)).any(|(k, t)| t != &fresh[k]);
    assert!(moved(FEDADAM_M_PREFIX) && moved(FEDADAM_V_PREFIX), "round 1 moved both moments");

    // A restart resumes round 1 with exactly those moments.
    let resumed = config.prepare().expect("prepare again");
    assert_eq!(resumed.start_round, Round(1));
    assert_eq!(resumed.engine.server_state(), saved);
    drop(resumed);

    // A damaged state file stops the restart with an error naming it (not silently zero moments).
    std::fs::write(&path, b"not safetensors").expect("damage");
    let err = config.prepare().err().expect("a damaged state is an error").to_string();
    assert!(err.contains("server-state-000001.safetensors"), "{err}");
}
