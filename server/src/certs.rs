//! The federation's certificates (rcgen): a CA, the server's certificate and one certificate per
//! client, all in one folder, plus the revocation list the server reads on every new connection.
//!
//! Layout of a certificate folder (`fedpool-server certs init --dir DIR`):
//!
//! | file | what | mode |
//! | --- | --- | --- |
//! | `ca.pem`, `ca.key` | the federation CA (ECDSA P-256, self-signed, path length 0) | 0644, 0600 |
//! | `server.pem`, `server.key` | the server's certificate (SANs `localhost`, `127.0.0.1`, `::1` and any `--san`), signed by the CA | 0644, 0600 |
//! | `clients/NAME.pem`, `clients/NAME.key` | a client's certificate (subject CN = NAME, client-auth only), signed by the CA | 0644, 0600 |
//! | `revoked.txt` | revoked client names, one subject CN a line (`#` comments and blank lines ignored) | 0644 |
//!
//! A client's identity in the federation is its certificate's subject common name, so names are
//! restricted to `[A-Za-z0-9._-]`, 1–64 characters, not starting with `.` or `-`: they are also
//! file names. Every file is written atomically (temporary file, fsync, rename, fsync of the
//! folder); private keys are created with mode 0600 and never pass through a wider mode.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA private key's file name.
pub const CA_KEY: &str = "ca.key";
/// The server certificate's file name.
pub const SERVER_CERT: &str = "server.pem";
/// The server private key's file name.
pub const SERVER_KEY: &str = "server.key";
/// The folder of client certificates and keys.
pub const CLIENTS_DIR: &str = "clients";
/// The revocation list's file name.
pub const REVOKED: &str = "revoked.txt";
/// Longest client name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Default validity of the CA certificate: ten years.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Default validity of server and client certificates: two years.
pub const LEAF_VALIDITY_DAYS: u32 = 730;

/// A certificate operation that failed, naming the file or the name concerned.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file would be overwritten without `--force`.
    #[error("{} already exists; pass --force to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The folder holds no CA to sign with.
    #[error(
        "no federation CA in {} ({CA_CERT} and {CA_KEY} are needed): run `fedpool-server certs init --dir {}` first",
        dir.display(),
        dir.display()
    )]
    NoCa {
        /// The certificate folder.
        dir: PathBuf,
    },
    /// A client name that cannot be a certificate subject and a file name.
    #[error("bad client name {name:?}: {why}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The name is on the revocation list: a certificate issued under it would be refused.
    #[error("client name {name:?} is revoked (listed in {}); remove it there first to issue it again", path.display())]
    Revoked {
        /// The name.
        name: String,
        /// The revocation list.
        path: PathBuf,
    },
    /// rcgen could not generate a key or certificate.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A PEM or DER file does not hold what it should.
    #[error("{}: {problem}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A certificate without a usable subject common name.
    #[error("certificate has no usable subject common name: {0}")]
    NoCommonName(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_path_buf(), source }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate { what: what.to_string(), source }
}

/// Options of [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// Extra subject alternative names for the server certificate (DNS names or IP addresses),
    /// beside `localhost`, `127.0.0.1` and `::1`.
    pub sans: Vec<String>,
    /// Overwrite an existing CA and server certificate.
    pub force: bool,
    /// The CA's subject common name.
    pub ca_name: String,
    /// Validity of the server certificate, in days (the CA gets [`CA_VALIDITY_DAYS`]).
    pub server_days: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            sans: Vec::new(),
            force: false,
            ca_name: "fedpool federation CA".into(),
            server_days: LEAF_VALIDITY_DAYS,
        }
    }
}

/// Files written by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// The CA key (0600).
    pub ca_key: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server key (0600).
    pub server_key: PathBuf,
    /// Every subject alternative name of the server certificate.
    pub server_sans: Vec<String>,
}

/// Files written by [`issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedClient {
    /// The client's name (its certificate's subject CN).
    pub name: String,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client key (0600).
    pub key: PathBuf,
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revocation list file.
    pub path: PathBuf,
    /// False when the name was already listed.
    pub newly_added: bool,
    /// False when no certificate of that name was found in the folder (revoked anyway).
    pub was_issued: bool,
}

/// Checks that `name` can be a client identity: 1–64 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-`.
pub fn validate_client_name(name: &str) -> Result<(), CertError> {
    let bad = |why: &str| Err(CertError::BadName { name: name.to_string(), why: why.to_string() });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("it has {} characters, at most {MAX_NAME_LEN} are allowed", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return bad(&format!("character {c:?} is not allowed (use letters, digits, '.', '_', '-')"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it must not start with '.' or '-'");
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Creates the federation CA and the server certificate in `dir` (created if missing).
///
/// Refuses to overwrite an existing CA or server certificate unless `opts.force`: a new CA
/// invalidates every client certificate issued so far.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<InitReport, CertError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let report = InitReport {
        ca_cert: dir.join(CA_CERT),
        ca_key: dir.join(CA_KEY),
        server_cert: dir.join(SERVER_CERT),
        server_key: dir.join(SERVER_KEY),
        server_sans: Vec::new(),
    };
    if !opts.force {
        for p in [&report.ca_cert, &report.ca_key, &report.server_cert, &report.server_key] {
            if p.exists() {
                return Err(CertError::Exists { path: p.clone() });
            }
        }
    }

    let ca_key = KeyPair::generate().map_err(gen_err("the CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, opts.ca_name.as_str());
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca_params, CA_VALIDITY_DAYS);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(gen_err("the CA certificate"))?;

    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for s in &opts.sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let mut server_params =
        CertificateParams::new(sans.clone()).map_err(gen_err(&format!("server certificate names {sans:?}")))?;
    server_params.distinguished_name = DistinguishedName::new();
    server_params.distinguished_name.push(DnType::CommonName, "fedpool server");
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    validity(&mut server_params, opts.server_days);
    let server_key = KeyPair::generate().map_err(gen_err("the server key"))?;
    let server_cert = server_params.signed_by(&server_key, &ca).map_err(gen_err("the server certificate"))?;

    // Keys first: a certificate without its key is useless, a key without its certificate harmless.
    write_private(&report.ca_key, ca.key().serialize_pem().as_bytes())?;
    write_public(&report.ca_cert, ca.pem().as_bytes())?;
    write_private(&report.server_key, server_key.serialize_pem().as_bytes())?;
    write_public(&report.server_cert, server_cert.pem().as_bytes())?;
    Ok(InitReport { server_sans: sans, ..report })
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if !cert_path.is_file() || !key_path.is_file() {
        return Err(CertError::NoCa { dir: dir.to_path_buf() });
    }
    let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| CertError::Parse { path: key_path.clone(), problem: format!("not a private key: {e}") })?;
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| CertError::Parse { path: cert_path, problem: format!("not a CA certificate: {e}") })
}

/// Issues a client certificate and key for `name` (subject CN = `name`), signed by the CA in
/// `dir`, valid for `days`. Refuses to overwrite an existing one unless `force`, and refuses a
/// revoked name.
pub fn issue(dir: &Path, name: &str, days: u32, force: bool) -> Result<IssuedClient, CertError> {
    validate_client_name(name)?;
    let issuer = load_issuer(dir)?;
    let revoked_path = dir.join(REVOKED);
    if RevocationList::load(&revoked_path)?.contains(name) {
        return Err(CertError::Revoked { name: name.to_string(), path: revoked_path });
    }
    let clients = dir.join(CLIENTS_DIR);
    fs::create_dir_all(&clients).map_err(io_err(&clients))?;
    let issued = IssuedClient {
        name: name.to_string(),
        cert: clients.join(format!("{name}.pem")),
        key: clients.join(format!("{name}.key")),
    };
    if !force {
        for p in [&issued.cert, &issued.key] {
            if p.exists() {
                return Err(CertError::Exists { path: p.clone() });
            }
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(gen_err("the client key"))?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err(&format!("the certificate of client {name:?}")))?;
    write_private(&issued.key, key.serialize_pem().as_bytes())?;
    write_public(&issued.cert, cert.pem().as_bytes())?;
    Ok(issued)
}

/// Adds `name` to the revocation list `dir/revoked.txt` (atomically; the file is created if
/// missing). The server refuses the name on its next connection. Revoking a name twice is not an
/// error.
pub fn revoke(dir: &Path, name: &str) -> Result<Revoked, CertError> {
    validate_client_name(name)?;
    if !dir.is_dir() {
        return Err(CertError::NoCa { dir: dir.to_path_buf() });
    }
    let path = dir.join(REVOKED);
    let was_issued = dir.join(CLIENTS_DIR).join(format!("{name}.pem")).exists();
    let existing = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(CertError::Io { path, source: e }),
    };
    if RevocationList::parse(&existing).contains(name) {
        return Ok(Revoked { path, newly_added: false, was_issued });
    }
    let mut text = existing;
    if text.is_empty() {
        text.push_str("# Revoked fedpool client names (certificate subject CN), one a line.\n");
    } else if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(name);
    text.push('\n');
    write_public(&path, text.as_bytes())?;
    Ok(Revoked { path, newly_added: true, was_issued })
}

/// The set of revoked client names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    names: BTreeSet<String>,
}

impl RevocationList {
    /// Parses the file format: one name a line, surrounding whitespace trimmed, blank lines and
    /// lines starting with `#` ignored.
    pub fn parse(text: &str) -> Self {
        let names =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
        Self { names }
    }

    /// Reads the list at `path`; a missing file is an empty list, any other read error is an
    /// error (the caller should refuse connections rather than ignore revocations).
    pub fn load(path: &Path) -> Result<Self, CertError> {
        match fs::read_to_string(path) {
            Ok(s) => Ok(Self::parse(&s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CertError::Io { path: path.to_path_buf(), source: e }),
        }
    }

    /// True when `name` is revoked.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Number of names listed.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The subject common name of a DER certificate: the client's identity.
pub fn subject_common_name(der: &[u8]) -> Result<String, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::NoCommonName(format!("unparsable: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| CertError::NoCommonName(format!("subject {:?} has no CN", cert.subject().to_string())))?;
    let cn = cn.as_str().map_err(|e| CertError::NoCommonName(format!("CN is not a string: {e}")))?;
    validate_client_name(cn).map_err(|e| CertError::NoCommonName(e.to_string()))?;
    Ok(cn.to_string())
}

/// Reads every certificate of a PEM file (see [`fedpool_transport::tls::load_certs`]).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    fedpool_transport::tls::load_certs(path).map_err(|e| pem_error(path, e))
}

/// Reads the first private key of a PEM file (see [`fedpool_transport::tls::load_key`]).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    fedpool_transport::tls::load_key(path).map_err(|e| pem_error(path, e))
}

fn pem_error(path: &Path, e: fedpool_transport::tls::TlsError) -> CertError {
    let problem = match e {
        fedpool_transport::tls::TlsError::Pem { problem, .. } => problem,
        other => other.to_string(),
    };
    CertError::Parse { path: path.to_path_buf(), problem }
}

/// Writes a private key: created with mode 0600 (never readable by others, not even briefly).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    atomic_write_mode(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    atomic_write_mode(path, bytes, 0o644)
}

/// Temporary file created with `mode`, fsync, rename over `path`, fsync of the folder.
fn atomic_write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_names_are_checked() {
        for ok in ["hospital-a", "bank_1", "lab.eu", "A"] {
            assert!(validate_client_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(matches!(validate_client_name(bad), Err(CertError::BadName { .. })), "{bad:?}");
        }
    }

    #[test]
    fn revocation_list_ignores_comments_and_blanks() {
        let l = RevocationList::parse("# header\n\n  alice \nbob\n#carol\n");
        assert!(l.contains("alice") && l.contains("bob") && !l.contains("carol"));
        assert_eq!(l.len(), 2);
    }
}
