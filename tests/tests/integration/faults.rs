//! Faults with real processes: the `fedpool-server` and `fedpool-client` binaries on loopback,
//! killed with SIGKILL at the worst moments.

use std::time::Duration;

use fedpool_common::checkpoint::{checkpoint_path, read_tensors};
use fedpool_common::Round;
use fedpool_tests::{binary, Federation, Proc};

const LONG: Duration = Duration::from_secs(120);

fn start_server(fed: &Federation, log: &str) -> Proc {
    let _ = std::fs::remove_file(fed.state().join("listen.addr"));
    let server =
        Proc::start(&binary("fedpool-server"), &["run", "--config", "server.toml"], fed.dir.path(), fed.path(log), &[]);
    let t = std::time::Instant::now();
    while !fed.state().join("listen.addr").exists() {
        assert!(t.elapsed() < LONG, "server did not start:\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn start_client(fed: &Federation, name: &str, log: &str, env: &[(&str, &str)]) -> Proc {
    let config = format!("{name}.toml");
    Proc::start(&binary("fedpool-client"), &["run", "--config", &config], fed.dir.path(), fed.path(log), env)
}

/// The L2 norm of a residual file's tensors.
fn residual_l2(path: &std::path::Path) -> f64 {
    let (tensors, _) = read_tensors(path).expect("residual");
    tensors.values().flat_map(|t| t.data().iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

#[test]
fn a_client_killed_during_upload_the_round_commits_without_it_and_it_rejoins_with_its_residual() {
    let names = ["c1", "c2", "c3"];
    let fed = Federation::new(&names);
    fed.write_server_config(3, 3, 2, "4s", "min_clients_to_start = 3\neval_deadline = \"3s\"");
    for n in names {
        // top-k keeps half the values: the other half waits in the residual.
        fed.write_client_config(n, "model", "quantization = \"int8\"\ntop_k = 0.5");
    }
    let mut server = start_server(&fed, "server.log");
    let _c1 = start_client(&fed, "c1", "c1.log", &[]);
    let _c2 = start_client(&fed, "c2", "c2.log", &[]);
    let stall = [("FEDPOOL_FAULT_STALL_UPLOAD", "60s"), ("FEDPOOL_FAULT_STALL_ROUND", "2")];
    let mut c3 = start_client(&fed, "c3", "c3-first.log", &stall);

    c3.wait_log("upload stalled", LONG);
    let residual = fed.path("client-c3/residual.safetensors");
    let before = std::fs::read(&residual).expect("c3 saved a residual after round 1's ack");
    let l2 = residual_l2(&residual);
    assert!(l2 > 0.0);
    c3.kill9();

    // Round 2 commits by its deadline with the two others; c3 is a straggler.
    let rounds = fed.wait_rounds(2, false, LONG);
    assert_eq!(rounds[0]["clients"], serde_json::json!(names));
    assert_eq!(rounds[1]["clients"], serde_json::json!(["c1", "c2"]), "{:?}", rounds[1]);
    assert_eq!(rounds[1]["stragglers"], serde_json::json!(["c3"]));
    assert_eq!(std::fs::read(&residual).expect("residual"), before, "the killed upload left the residual as it was");

    // Restarted, it restores the same residual and takes part in round 3.
    let c3 = start_client(&fed, "c3", "c3-second.log", &[]);
    c3.wait_log("error-feedback residual restored", LONG);
    let log = c3.log_text();
    let logged: f64 = log
        .split("l2=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no l2 in the log:\n{log}"));
    assert!((logged - l2).abs() <= 1e-6 * l2.max(1.0), "restored residual norm {logged} vs saved {l2}");
    let rounds = fed.wait_rounds(3, false, LONG);
    assert_eq!(rounds[2]["clients"], serde_json::json!(names), "c3 is back in round 3: {:?}", rounds[2]);
    assert!(server.wait_exit(LONG), "server finished cleanly:\n{}", server.log_text());
    assert_ne!(std::fs::read(&residual).expect("residual"), before, "round 3's ack saved a new residual");
}

#[test]
fn the_server_killed_mid_round_restarts_and_the_clients_come_back_by_themselves() {
    let names = ["c1", "c2", "c3"];
    let fed = Federation::new(&names);
    fed.write_server_config(4, 3, 2, "10s", "local_steps = 60\neval_deadline = \"10s\"");
    for n in names {
        fed.write_client_config(n, "model", "quantization = \"fp32\"");
    }
    let mut server = start_server(&fed, "server-first.log");
    let mut clients: Vec<Proc> = names.iter().map(|n| start_client(&fed, n, &format!("{n}.log"), &[])).collect();

    fed.wait_rounds(2, false, LONG);
    server.wait_log("round started round=3", LONG);
    server.kill9();
    let committed: Vec<Vec<u8>> = (0..=2)
        .map(|r| std::fs::read(checkpoint_path(&fed.state(), Round(r))).expect("committed checkpoint"))
        .collect();
    assert!(!checkpoint_path(&fed.state(), Round(3)).exists() || fed.rounds().len() >= 3);

    let mut server = start_server(&fed, "server-second.log");
    assert!(server.wait_exit(LONG), "the restarted server finished:\n{}", server.log_text());
    let rounds = fed.rounds();
    let numbers: Vec<u64> = rounds.iter().map(|r| r["round"].as_u64().expect("round")).collect();
    assert_eq!(numbers, [1, 2, 3, 4], "every round once, none lost: {rounds:?}");
    for (r, bytes) in committed.iter().enumerate() {
        let now = std::fs::read(checkpoint_path(&fed.state(), Round(r as u64))).expect("checkpoint");
        assert_eq!(&now, bytes, "checkpoint of round {r} unchanged by the crash");
    }
    for c in clients.iter_mut() {
        assert!(c.wait_exit(LONG), "client finished:\n{}", c.log_text());
        assert!(c.log_text().contains("reconnecting"), "it reconnected by itself:\n{}", c.log_text());
    }
}

#[test]
fn sigterm_during_an_upload_stops_the_client_cleanly_and_keeps_its_residual() {
    let fed = Federation::new(&["c1", "c2"]);
    fed.write_server_config(3, 2, 2, "30s", "eval_deadline = \"5s\"");
    for n in ["c1", "c2"] {
        fed.write_client_config(n, "model", "quantization = \"int8\"\ntop_k = 0.5");
    }
    let _server = start_server(&fed, "server.log");
    let _c1 = start_client(&fed, "c1", "c1.log", &[]);
    let stall = [("FEDPOOL_FAULT_STALL_UPLOAD", "60s"), ("FEDPOOL_FAULT_STALL_ROUND", "2")];
    let mut c2 = start_client(&fed, "c2", "c2.log", &stall);
    c2.wait_log("upload stalled", LONG);
    let residual = fed.path("client-c2/residual.safetensors");
    let before = std::fs::read(&residual).expect("round 1's residual");

    let t = std::time::Instant::now();
    let status = std::process::Command::new("kill").args(["-TERM", &c2.child.id().to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -TERM");
    assert!(c2.wait_exit(Duration::from_secs(10)), "exit status 0 on SIGTERM:\n{}", c2.log_text());
    assert!(t.elapsed() < Duration::from_secs(10), "it did not wait out the 60 s stall");
    assert!(c2.log_text().contains("upload in flight is abandoned"), "{}", c2.log_text());
    assert_eq!(std::fs::read(&residual).expect("residual"), before, "the abandoned upload left the residual as it was");
}
