//! `fedpool-server certs ...`: the CA, server and client certificates, key permissions,
//! revocation, and clear errors — through the library and through the binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use fedpool_server::certs::{self, CertError, InitOptions, RevocationList};

const BIN: &str = env!("CARGO_BIN_EXE_fedpool-server");

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).arg("certs").args(args).output().expect("run fedpool-server");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn private_keys_are_written_with_mode_0600_and_certificates_carry_the_names() {
    let dir = tempfile::tempdir().expect("temp");
    let d = dir.path().join("certs");
    let opts = InitOptions { sans: vec!["fed.example.org".into(), "10.1.2.3".into()], ..Default::default() };
    let r = certs::init(&d, &opts).expect("init");
    assert_eq!(mode(&r.ca_key), 0o600);
    assert_eq!(mode(&r.server_key), 0o600);
    assert_eq!(mode(&r.ca_cert), 0o644);
    assert!(r.server_sans.iter().any(|s| s == "fed.example.org") && r.server_sans.iter().any(|s| s == "localhost"));

    let c = certs::issue(&d, "hospital-a", 30, false).expect("issue");
    assert_eq!(mode(c.key.as_ref().expect("issue makes a key")), 0o600);
    assert_eq!(mode(&c.cert), 0o644);
    let der = certs::load_certs(&c.cert).expect("load");
    assert_eq!(certs::subject_common_name(&der[0]).expect("CN"), "hospital-a");
    assert!(certs::load_key(c.key.as_ref().expect("key")).is_ok());

    // Through the binary too.
    let (ok, out, err) = cli(&["issue", "--dir", d.to_str().expect("utf-8"), "--name", "bank-b"]);
    assert!(ok, "{out}{err}");
    assert_eq!(mode(&d.join("clients/bank-b.key")), 0o600);
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .expect("read dir")
        .chain(std::fs::read_dir(d.join("clients")).expect("read dir"))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn an_existing_ca_or_client_is_not_overwritten_without_force() {
    let dir = tempfile::tempdir().expect("temp");
    let d = dir.path();
    certs::init(d, &InitOptions::default()).expect("init");
    let before = std::fs::read(d.join(certs::CA_CERT)).expect("ca");
    let e = certs::init(d, &InitOptions::default()).unwrap_err();
    assert!(matches!(e, CertError::Exists { .. }) && e.to_string().contains("--force"), "{e}");
    assert_eq!(std::fs::read(d.join(certs::CA_CERT)).expect("ca"), before);
    certs::init(d, &InitOptions { force: true, ..Default::default() }).expect("forced init");
    assert_ne!(std::fs::read(d.join(certs::CA_CERT)).expect("ca"), before);

    certs::issue(d, "lab", 30, false).expect("issue");
    let e = certs::issue(d, "lab", 30, false).unwrap_err();
    assert!(e.to_string().contains("already exists") && e.to_string().contains("--force"), "{e}");
    certs::issue(d, "lab", 30, true).expect("forced issue");

    let (ok, _, err) = cli(&["init", "--dir", d.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("already exists"), "{err}");
}

#[test]
fn issue_without_a_ca_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp");
    let e = certs::issue(dir.path(), "hospital-a", 30, false).unwrap_err();
    assert!(matches!(e, CertError::NoCa { .. }), "{e}");
    assert!(e.to_string().contains("certs init"), "{e}");

    let (ok, _, err) = cli(&["issue", "--dir", dir.path().to_str().expect("utf-8"), "--name", "hospital-a"]);
    assert!(!ok, "issue without a CA must fail");
    assert!(err.contains("no federation CA") && err.contains("certs init --dir"), "{err}");
    assert!(!dir.path().join("clients").exists());
}

#[test]
fn bad_names_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("temp");
    certs::init(dir.path(), &InitOptions::default()).expect("init");
    for (name, why) in
        [("", "empty"), ("../etc", "'/'"), ("a b", "' '"), ("-rf", "start with"), (&"x".repeat(65)[..], "65")]
    {
        let e = certs::issue(dir.path(), name, 30, false).unwrap_err();
        assert!(matches!(e, CertError::BadName { .. }), "{name:?}: {e}");
        assert!(e.to_string().contains(why), "{name:?}: {e}");
    }
    let (ok, _, err) = cli(&["issue", "--dir", dir.path().to_str().expect("utf-8"), "--name", "a/b"]);
    assert!(!ok && err.contains("bad client name"), "{err}");
}

#[test]
fn revoke_lists_every_serial_of_a_name_once_and_issuing_the_name_again_needs_no_unrevoking() {
    let dir = tempfile::tempdir().expect("temp");
    let d = dir.path();
    certs::init(d, &InitOptions::default()).expect("init");
    let first = certs::issue(d, "mallory", 30, false).expect("issue");
    let r = certs::revoke(d, "mallory").expect("revoke");
    assert!(r.newly_added && r.was_issued);
    assert_eq!(r.serials, vec![first.serial.clone()]);
    let again = certs::revoke(d, "mallory").expect("revoke again");
    assert!(!again.newly_added && again.already == vec![first.serial.clone()]);
    // A name never issued here: nothing to revoke, and the error says how to refuse the name.
    let (ok, out, err) = cli(&["revoke", "--dir", d.to_str().expect("utf-8"), "--name", "eve"]);
    assert!(!ok && err.contains("nothing to revoke") && err.contains("revoked.txt"), "{out}{err}");
    let list = RevocationList::load(&d.join(certs::REVOKED)).expect("load");
    assert!(list.contains_serial(&first.serial) && !list.contains("mallory") && !list.contains("eve"));
    assert_eq!(list.len(), 1);
    // Issuing the name again works (over the old files with --force) and the old serial stays revoked.
    let second = certs::issue(d, "mallory", 30, true).expect("issue again");
    let list = RevocationList::load(&d.join(certs::REVOKED)).expect("load");
    assert!(list.contains_serial(&first.serial) && !list.contains_serial(&second.serial));
    // One certificate by serial, through the binary.
    let (ok, out, err) = cli(&["revoke", "--dir", d.to_str().expect("utf-8"), "--serial", &second.serial.to_string()]);
    assert!(ok && out.contains(&second.serial.to_string()), "{out}{err}");
    assert!(RevocationList::load(&d.join(certs::REVOKED)).expect("load").contains_serial(&second.serial));
    let (ok, _, err) = cli(&["revoke", "--dir", d.to_str().expect("utf-8"), "--serial", "xyz"]);
    assert!(!ok && err.contains("not hexadecimal"), "{err}");
    // A missing list revokes nobody.
    assert!(RevocationList::load(&d.join("nope.txt")).expect("missing is empty").is_empty());
}

#[test]
fn a_certificate_issued_before_issued_jsonl_existed_is_still_revoked_by_name() {
    let dir = tempfile::tempdir().expect("temp");
    let d = dir.path();
    certs::init(d, &InitOptions::default()).expect("init");
    let old = certs::issue(d, "legacy", 30, false).expect("issue");
    std::fs::remove_file(d.join(certs::ISSUED)).expect("forget the record");
    let r = certs::revoke(d, "legacy").expect("revoke from clients/legacy.pem");
    assert_eq!(r.serials, vec![old.serial]);
}
