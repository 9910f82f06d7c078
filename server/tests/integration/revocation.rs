//! Revocation by certificate serial, over real QUIC on loopback with certificates from the
//! `certs` module: issuing a name again revokes its old certificate; a certificate revoked while
//! its client is connected is closed with REVOKED within the poll interval; an unreadable list
//! refuses newcomers and keeps live connections checked; client keys made on the client and
//! signed from their request (`certs sign`); `--days` checked.

use crate::net_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fedpool_common::wire::{ServerMessage, Welcome};
use fedpool_server::certs::{self, CertError, InitOptions, RevocationList, Serial};
use fedpool_server::config::ServerConfig;
use fedpool_server::metrics::Metrics;
use fedpool_server::net::{close, tls, Server, REVOCATION_POLL};
use net_support::*;
use rustls::pki_types::pem::PemObject;

const BIN: &str = env!("CARGO_BIN_EXE_fedpool-server");

/// The bound this suite holds the server to: a revoked live connection is closed this soon.
const REVOKED_WITHIN: Duration = Duration::from_secs(2);

async fn start(fed: &Federation) -> Server {
    // Three clients per round and at most two connected: no round starts, connections stay idle.
    let config = ServerConfig::parse(&fed.config_toml(3, 1, "30s", ""), fed.dir.path()).expect("config");
    let p = config.prepare().expect("prepare");
    Server::start(p.net, p.engine, p.store, Metrics::new()).await.expect("start server")
}

/// The close of a connection whose first exchange failed.
async fn refusal(client: &TestClient) -> quinn::ApplicationClose {
    let r = client.enroll().await;
    assert!(r.is_err(), "a refused client got an answer: {r:?}");
    match tokio::time::timeout(WAIT, client.conn.closed()).await.expect("closed in time") {
        quinn::ConnectionError::ApplicationClosed(c) => c,
        other => panic!("expected an application close, got {other}"),
    }
}

fn serial_of(path: &Path) -> Serial {
    let der = certs::load_certs(path).expect("cert");
    Serial::from_bytes(&tls::certificate_serial(&der[0]).expect("serial"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuing_a_name_again_revokes_its_old_certificate_which_is_refused_while_the_new_one_is_admitted() {
    let fed = Federation::new(&["lab"]);
    let old = identity(&fed, "lab");
    let old_serial = serial_of(&fed.client_cert("lab").0);

    let again = certs::issue(&fed.certs(), "lab", 30, true).expect("issue again");
    assert_eq!(again.revoked_previous, vec![old_serial.clone()]);
    assert_ne!(again.serial, old_serial);
    let list = RevocationList::load(&fed.certs().join(certs::REVOKED)).expect("list");
    assert!(list.contains_serial(&old_serial) && !list.contains_serial(&again.serial) && !list.contains("lab"));
    // Both are recorded as issued to "lab".
    let issued = certs::issued::serials_of(&fed.certs(), "lab").expect("issued");
    assert_eq!(issued, vec![old_serial.clone(), again.serial.clone()]);

    let server = start(&fed).await;
    let addr = server.local_addr();
    let stolen = TestClient::connect(addr, &fed, Some(old)).await.expect("handshake");
    let c = refusal(&stolen).await;
    let reason = String::from_utf8_lossy(&c.reason).to_string();
    assert_eq!(c.error_code, close::REVOKED.into(), "{reason}");
    assert!(reason.contains("\"lab\"") && reason.contains(&old_serial.to_string()), "{reason}");

    let new = TestClient::connect_as(addr, &fed, "lab").await;
    assert!(matches!(new.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_client_whose_certificate_is_revoked_is_closed_with_revoked_within_the_poll_interval() {
    let fed = Federation::new(&["mallory", "honest"]);
    let server = start(&fed).await;
    let addr = server.local_addr();
    let mallory = TestClient::connect_as(addr, &fed, "mallory").await;
    let honest = TestClient::connect_as(addr, &fed, "honest").await;
    for c in [&mallory, &honest] {
        assert!(matches!(c.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    }
    let serial = serial_of(&fed.client_cert("mallory").0);
    // Let the list's file age past its settle time, as a long-running server's would have.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let t = Instant::now();
    let r = certs::revoke(&fed.certs(), "mallory").expect("revoke");
    assert_eq!(r.serials, vec![serial.clone()]);
    let closed = tokio::time::timeout(WAIT, mallory.conn.closed()).await.expect("closed");
    let latency = t.elapsed();
    let quinn::ConnectionError::ApplicationClosed(c) = closed else {
        panic!("expected an application close: {closed}")
    };
    let reason = String::from_utf8_lossy(&c.reason).to_string();
    assert_eq!(c.error_code, close::REVOKED.into(), "{reason}");
    assert!(reason.contains("revoked while connected") && reason.contains("mallory"), "{reason}");
    assert!(reason.contains(&serial.to_string()), "{reason}");
    eprintln!(
        "revoked live connection closed {:.0} ms after `certs revoke` (poll {REVOCATION_POLL:?})",
        latency.as_secs_f64() * 1e3
    );
    assert!(latency < REVOKED_WITHIN, "closed after {latency:?}");

    // The other client is untouched, and the revoked certificate cannot come back.
    assert!(matches!(honest.heartbeat(1).await, Ok(ServerMessage::Heartbeat(_))));
    let back = TestClient::connect_as(addr, &fed, "mallory").await;
    assert_eq!(refusal(&back).await.error_code, close::REVOKED.into());
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_one_serial_closes_that_certificate_only_and_a_bare_name_still_revokes_by_name() {
    let fed = Federation::new(&["a", "b"]);
    let server = start(&fed).await;
    let addr = server.local_addr();
    let a = TestClient::connect_as(addr, &fed, "a").await;
    let b = TestClient::connect_as(addr, &fed, "b").await;
    for c in [&a, &b] {
        assert!(matches!(c.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    }
    let r = certs::revoke_serial(&fed.certs(), &serial_of(&fed.client_cert("a").0)).expect("revoke serial");
    assert!(r.newly_added && r.was_issued);
    match tokio::time::timeout(REVOKED_WITHIN, a.conn.closed()).await.expect("a closed in time") {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, close::REVOKED.into()),
        other => panic!("{other}"),
    }
    assert!(matches!(b.heartbeat(1).await, Ok(ServerMessage::Heartbeat(_))), "b is untouched");

    // The older format: a bare name, added by hand, revokes every certificate of it.
    let path = fed.certs().join(certs::REVOKED);
    let mut text = std::fs::read_to_string(&path).expect("list");
    text.push_str("b\n");
    std::fs::write(&path, text).expect("write");
    match tokio::time::timeout(REVOKED_WITHIN, b.conn.closed()).await.expect("b closed in time") {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close::REVOKED.into());
            assert!(String::from_utf8_lossy(&c.reason).contains("the name is revoked"));
        }
        other => panic!("{other}"),
    }
    // Issuing that name is refused while the bare name is listed.
    let e = certs::issue(&fed.certs(), "b", 30, true).unwrap_err();
    assert!(matches!(e, CertError::Revoked { .. }) && e.to_string().contains("delete that line"), "{e}");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_revocation_list_refuses_new_connections_and_live_ones_stay_checked_against_the_last_list() {
    let fed = Federation::new(&["live", "late"]);
    let server = start(&fed).await;
    let addr = server.local_addr();
    let live = TestClient::connect_as(addr, &fed, "live").await;
    assert!(matches!(live.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    // A folder where the list should be: it cannot be read (even by root).
    let path = fed.certs().join(certs::REVOKED);
    std::fs::create_dir(&path).expect("dir in the list's place");
    let late = TestClient::connect_as(addr, &fed, "late").await;
    let c = refusal(&late).await;
    assert_eq!(c.error_code, close::INTERNAL.into());
    assert!(String::from_utf8_lossy(&c.reason).contains("cannot check revocations"));
    tokio::time::sleep(REVOCATION_POLL * 3).await;
    assert!(matches!(live.heartbeat(1).await, Ok(ServerMessage::Heartbeat(_))), "the live one stays");
    // Readable again: newcomers are admitted.
    std::fs::remove_dir(&path).expect("rmdir");
    let late = TestClient::connect_as(addr, &fed, "late").await;
    assert!(matches!(late.enroll().await.expect("enroll"), ServerMessage::Welcome(_)));
    server.shutdown().await.expect("shutdown");
}

/// A key whose public half is `public` but whose signatures are made by `signer`: a request
/// "signed by someone else".
struct Forged {
    public: rcgen::KeyPair,
    signer: rcgen::KeyPair,
}

impl rcgen::PublicKeyData for Forged {
    fn der_bytes(&self) -> &[u8] {
        self.public.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.public.algorithm()
    }
}

impl rcgen::SigningKey for Forged {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.signer.sign(msg)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_made_on_the_client_is_signed_and_its_certificate_admitted_and_a_bad_request_is_named() {
    let fed = Federation::new(&[]);
    let request = tls::client_key_request("clinic").expect("key request");
    let csr = fed.dir.path().join("clinic.csr");
    std::fs::write(&csr, &request.csr_pem).expect("csr");
    let signed = certs::sign(&fed.certs(), &csr, 30, false).expect("sign");
    assert_eq!(signed.name, "clinic");
    assert_eq!(signed.key, None);
    assert!(!fed.certs().join("clients/clinic.key").exists(), "the coordinator holds no client key");
    assert_eq!(serial_of(&signed.cert), signed.serial);
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(request.key_pem.as_bytes()).expect("key");

    let server = start(&fed).await;
    let client =
        TestClient::connect(server.local_addr(), &fed, Some((certs::load_certs(&signed.cert).expect("c"), key)))
            .await
            .expect("handshake");
    assert!(
        matches!(client.enroll().await.expect("enroll"), ServerMessage::Welcome(Welcome { client_name, .. }) if client_name == "clinic")
    );
    server.shutdown().await.expect("shutdown");

    // Signing a new request for the name (with --force) revokes the first certificate.
    let again = tls::client_key_request("clinic").expect("key request");
    std::fs::write(&csr, &again.csr_pem).expect("csr");
    let e = certs::sign(&fed.certs(), &csr, 30, false).unwrap_err();
    assert!(matches!(e, CertError::Exists { .. }), "{e}");
    let second = certs::sign(&fed.certs(), &csr, 30, true).expect("sign again");
    assert_eq!(second.revoked_previous, vec![signed.serial]);

    // A request whose signature is not by its own key.
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "clinic");
    let forged =
        Forged { public: rcgen::KeyPair::generate().expect("k"), signer: rcgen::KeyPair::generate().expect("k") };
    let forged_csr = fed.dir.path().join("forged.csr");
    std::fs::write(&forged_csr, params.serialize_request(&forged).expect("csr").pem().expect("pem")).expect("write");
    let e = certs::sign(&fed.certs(), &forged_csr, 30, true).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, CertError::BadCsr { .. }), "{text}");
    assert!(text.contains("forged.csr") && text.contains("signature does not verify"), "{text}");

    // Garbage, a certificate instead of a request, a bad subject.
    let garbage = fed.dir.path().join("garbage.csr");
    std::fs::write(&garbage, "hello\n").expect("write");
    let e = certs::sign(&fed.certs(), &garbage, 30, false).unwrap_err();
    assert!(
        e.to_string().contains("garbage.csr") && e.to_string().contains("not a PEM certificate signing request"),
        "{e}"
    );
    let e = certs::sign(&fed.certs(), &fed.certs().join(certs::CA_CERT), 30, false).unwrap_err();
    assert!(matches!(e, CertError::BadCsr { .. }) && e.to_string().contains(certs::CA_CERT), "{e}");
    let mut bad = rcgen::CertificateParams::default();
    bad.distinguished_name.push(rcgen::DnType::CommonName, "../etc");
    let key = rcgen::KeyPair::generate().expect("k");
    let bad_csr = fed.dir.path().join("bad-name.csr");
    std::fs::write(&bad_csr, bad.serialize_request(&key).expect("csr").pem().expect("pem")).expect("write");
    let e = certs::sign(&fed.certs(), &bad_csr, 30, false).unwrap_err();
    assert!(matches!(e, CertError::CsrSubject { .. }) && e.to_string().contains("bad-name.csr"), "{e}");
    let missing = fed.dir.path().join("missing.csr");
    let e = certs::sign(&fed.certs(), &missing, 30, false).unwrap_err();
    assert!(matches!(e, CertError::Io { .. }) && e.to_string().contains("missing.csr"), "{e}");

    // Through the binary.
    let third = tls::client_key_request("clinic2").expect("key request");
    std::fs::write(&csr, &third.csr_pem).expect("csr");
    let out = Command::new(BIN)
        .args(["certs", "sign", "--dir"])
        .arg(fed.certs())
        .arg("--csr")
        .arg(&csr)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("\"clinic2\"") && stdout.contains("serial"), "{stdout}");
    let out = Command::new(BIN)
        .args(["certs", "sign", "--dir"])
        .arg(fed.certs())
        .arg("--csr")
        .arg(&garbage)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("garbage.csr"), "{stderr}");
}

#[test]
fn days_zero_and_three_million_are_clear_errors_never_a_panic_nor_an_expired_certificate() {
    let dir = tempfile::tempdir().expect("temp");
    let d = dir.path();
    for days in [0u32, 3_000_000] {
        let e = certs::init(d, &InitOptions { server_days: days, ..Default::default() }).unwrap_err();
        assert!(matches!(e, CertError::BadDays { .. }), "init --days {days}: {e}");
    }
    certs::init(d, &InitOptions::default()).expect("init");
    let request = tls::client_key_request("x").expect("request");
    let csr = d.join("x.csr");
    std::fs::write(&csr, &request.csr_pem).expect("csr");
    for days in [0u32, 3_000_000, certs::MAX_VALIDITY_DAYS + 1] {
        let e = certs::issue(d, "x", days, false).unwrap_err();
        assert!(matches!(e, CertError::BadDays { .. }) && e.to_string().contains("1 to 3650 days"), "{days}: {e}");
        let e = certs::sign(d, &csr, days, false).unwrap_err();
        assert!(matches!(e, CertError::BadDays { .. }), "sign {days}: {e}");
    }
    assert!(!d.join("clients/x.pem").exists() && !d.join(certs::ISSUED).exists(), "nothing written");
    let ok = certs::issue(d, "x", certs::MAX_VALIDITY_DAYS, false).expect("the longest allowed");
    let not_after = humantime::parse_rfc3339(&ok.not_after).expect("RFC 3339");
    let days = not_after.duration_since(std::time::SystemTime::now()).expect("in the future").as_secs() / 86_400;
    assert_eq!(days, u64::from(certs::MAX_VALIDITY_DAYS) - 1, "{}", ok.not_after);
    for days in ["0", "3000000"] {
        let out = Command::new(BIN)
            .args(["certs", "issue", "--dir"])
            .arg(d)
            .args(["--name", "y", "--days", days])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("out of range") && !stderr.contains("panicked"), "{stderr}");
    }
}
