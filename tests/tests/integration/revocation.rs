//! Client keys made on the client and revocation that reaches live connections, whole-system:
//! `fedpool-client keygen` (the real binary) makes the key and request, the coordinator signs it
//! (`certs::sign`), the real daemon joins over QUIC with mutual TLS on loopback, and revoking its
//! certificate while it is connected stops it with the server's REVOKED close within 2 s.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use fedpool_client::session::{self, DaemonConfig, DaemonError, DaemonOptions};
use fedpool_server::certs;
use fedpool_tests::{binary, Federation};
use tokio::sync::watch;

/// How soon a revoked, connected client must be closed (the server polls every 0.5 s).
const REVOKED_WITHIN: Duration = Duration::from_secs(2);

fn keygen(fed: &Federation, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("fedpool-client"))
        .arg("keygen")
        .args(args)
        .current_dir(fed.dir.path())
        .output()
        .expect("run fedpool-client keygen");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keygen_key_signed_from_its_request_joins_and_its_revocation_stops_the_connected_daemon() {
    let fed = Federation::new(&[]);
    // A certificate the coordinator made (key and all), to be replaced by one from a request.
    fed.add_client("clinic", 100);
    let old_serial = certs::issued::serials_of(&fed.path("certs"), "clinic").expect("issued");

    let (ok, out) = keygen(&fed, &["--name", "clinic", "--out", "clinic-keys"]);
    assert!(ok, "{out}");
    let key = fed.path("clinic-keys/client.key");
    assert_eq!(std::fs::metadata(&key).expect("key").permissions().mode() & 0o777, 0o600);
    let signed = certs::sign(&fed.path("certs"), &fed.path("clinic-keys/client.csr"), 30, true).expect("sign");
    assert_eq!(signed.revoked_previous, old_serial, "the coordinator-made certificate is revoked");
    assert!(!fed.path("certs/clients/clinic.key").exists(), "no client key left with the coordinator");

    // Two clients per round, one connected: the client enrolls and waits.
    fed.write_server_config(1, 2, 2, "30s", "min_clients_to_start = 2\nevaluate = false");
    let (server, _) = fed.start_server_in_process().await;
    let toml = fed.write_client_config("clinic", "model", "");
    let text =
        std::fs::read_to_string(&toml).expect("toml").replace("certs/clients/clinic.key", "clinic-keys/client.key");
    std::fs::write(&toml, text).expect("toml");
    let (_stop_tx, stop) = watch::channel(false);
    let daemon = tokio::spawn(session::run(DaemonConfig::load(&toml).expect("config"), DaemonOptions::default(), stop));

    let metrics = server.metrics();
    let t = Instant::now();
    while !metrics.render().contains("fedpool_connected_clients 1") {
        assert!(t.elapsed() < Duration::from_secs(60), "the daemon never connected:\n{}", metrics.render());
        assert!(!daemon.is_finished(), "the daemon stopped before connecting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Enrolled by now (one exchange on loopback), and still connected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!daemon.is_finished() && metrics.render().contains("fedpool_connected_clients 1"));

    let t = Instant::now();
    let r = certs::revoke(&fed.path("certs"), "clinic").expect("revoke");
    assert!(r.serials.contains(&signed.serial), "{r:?}");
    let ended = tokio::time::timeout(Duration::from_secs(20), daemon).await.expect("daemon ends").expect("join");
    let latency = t.elapsed();
    match ended {
        Err(DaemonError::Refused { reason, detail }) => {
            assert_eq!(reason, "certificate");
            assert!(
                detail.contains("revoked while connected") && detail.contains(&signed.serial.to_string()),
                "{detail}"
            );
        }
        other => panic!("expected the daemon to stop, refused: {other:?}"),
    }
    eprintln!("connected daemon stopped {:.0} ms after `certs revoke`", latency.as_secs_f64() * 1e3);
    assert!(latency < REVOKED_WITHIN, "stopped after {latency:?}");
    server.shutdown().await.expect("shutdown");
}

#[test]
fn keygen_refuses_a_bad_name_and_an_overwrite_without_force() {
    let fed = Federation::new(&[]);
    let (ok, out) = keygen(&fed, &["--name", "../etc", "--out", "k"]);
    assert!(!ok && out.contains("bad client name") && !out.contains("panicked"), "{out}");
    assert!(!fed.path("k/client.key").exists());
    let (ok, out) = keygen(&fed, &["--name", "lab", "--out", "k"]);
    assert!(ok && out.contains("certs sign"), "{out}");
    let before = std::fs::read(fed.path("k/client.key")).expect("key");
    let (ok, out) = keygen(&fed, &["--name", "lab", "--out", "k"]);
    assert!(!ok && out.contains("already exists") && out.contains("--force"), "{out}");
    assert_eq!(std::fs::read(fed.path("k/client.key")).expect("key"), before, "the key is untouched");
    let (ok, out) = keygen(&fed, &["--name", "lab", "--out", "k", "--force"]);
    assert!(ok, "{out}");
    assert_ne!(std::fs::read(fed.path("k/client.key")).expect("key"), before);
}
