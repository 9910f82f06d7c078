//! The federation's certificates (rcgen): a CA, the server's certificate and one certificate per
//! client, all in one folder, a record of every client certificate issued, and the revocation list
//! the server checks at every handshake and pushes to live connections ([`revocation`]).
//!
//! Layout of a certificate folder (`fedpool-server certs init --dir DIR`):
//!
//! | file | what | mode |
//! | --- | --- | --- |
//! | `ca.pem`, `ca.key` | the federation CA (ECDSA P-256, self-signed, path length 0) | 0644, 0600 |
//! | `server.pem`, `server.key` | the server's certificate (SANs `localhost`, `127.0.0.1`, `::1` and any `--san`), signed by the CA | 0644, 0600 |
//! | `clients/NAME.pem` | a client's certificate (subject CN = NAME, client-auth only, a random 128-bit serial), signed by the CA: by `certs issue` (key made here) or `certs sign --csr` (key made on the client by `fedpool-client keygen`) | 0644 |
//! | `clients/NAME.key` | the client's key, only when `certs issue` made it | 0600 |
//! | `issued.jsonl` | every client certificate issued, one JSON object a line: `name`, `serial` (hex), `not_after`, `issued_at` (RFC 3339), `key` (`server` or `client`) — see [`issued`] | 0644 |
//! | `revoked.txt` | the revocation list: `serial:HEX` revokes one certificate; a bare NAME (the older format, still honoured) every certificate with that subject CN; `#` starts a comment — see [`revocation`] | 0644 |
//!
//! Issuing a name again (`certs issue --force`, `certs sign --force`) revokes the serials issued
//! to it before, so an old, possibly stolen, certificate stays refused while the new one works.
//!
//! A client's identity in the federation is its certificate's subject common name, so names are
//! restricted to `[A-Za-z0-9._-]`, 1–64 characters, not starting with `.` or `-`: they are also
//! file names. Every file is written atomically (temporary file, fsync, rename, fsync of the
//! folder); private keys are created with mode 0600 and never pass through a wider mode.

pub mod issued;
pub mod revocation;

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DistinguishedName, DnType,
    DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use issued::{IssuedRecord, KeyOrigin};
pub use revocation::{revoke, revoke_serial, RevocationFile, RevocationList, Revoked, RevokedBy, Serial};

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
/// The record of issued client certificates.
pub const ISSUED: &str = "issued.jsonl";
/// Longest client name accepted.
pub const MAX_NAME_LEN: usize = fedpool_transport::tls::MAX_NAME_LEN;

/// Default validity of the CA certificate: ten years.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Default validity of server and client certificates: two years.
pub const LEAF_VALIDITY_DAYS: u32 = 730;
/// Longest validity `--days` accepts for a server or client certificate: ten years, the CA's.
pub const MAX_VALIDITY_DAYS: u32 = 3650;

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
    /// A validity out of range: never a certificate that is already expired, nor one past the CA.
    #[error("--days {days} is out of range: a certificate is valid for 1 to {MAX_VALIDITY_DAYS} days")]
    BadDays {
        /// The days given.
        days: u32,
    },
    /// The name is revoked by name (a bare line of the older format in the revocation list):
    /// every certificate with that subject would be refused.
    #[error(
        "client name {name:?} is revoked by name in {} (a bare name refuses every certificate of that name); \
         delete that line to issue the name again — its earlier certificates revoked by serial stay revoked",
        path.display()
    )]
    Revoked {
        /// The name.
        name: String,
        /// The revocation list.
        path: PathBuf,
    },
    /// `certs revoke NAME` found no certificate of that name.
    #[error(
        "no certificate of client {name:?} was issued from {} (none in {ISSUED} nor {CLIENTS_DIR}/{name}.pem): nothing \
         to revoke; to refuse the name whatever its certificate, add a line `{name}` to {REVOKED}",
        dir.display()
    )]
    NotIssued {
        /// The name.
        name: String,
        /// The certificate folder.
        dir: PathBuf,
    },
    /// rcgen could not generate a key or certificate.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The operating system's random source failed (a certificate serial).
    #[error("cannot draw a random certificate serial: the operating system's random source failed")]
    Random,
    /// A certificate signing request that does not parse or whose signature does not verify.
    #[error("{}: {problem}: {source}", path.display())]
    BadCsr {
        /// The CSR file.
        path: PathBuf,
        /// What is wrong, in words.
        problem: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate signing request whose subject is not a usable client name.
    #[error("{}: the request's subject cannot be a client identity: {why}", path.display())]
    CsrSubject {
        /// The CSR file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A serial number that is not hexadecimal.
    #[error("bad certificate serial {text:?}: {why}")]
    BadSerial {
        /// The text given.
        text: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A line of the revocation list that cannot be read: the list is refused whole (fail closed).
    #[error("{} line {line}: {source}", path.display())]
    RevocationLine {
        /// The revocation list.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong with it.
        #[source]
        source: Box<CertError>,
    },
    /// A line of `issued.jsonl` that does not parse.
    #[error("{} line {line}: {source}", path.display())]
    IssuedLine {
        /// The record file.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A record for `issued.jsonl` that cannot be written as JSON.
    #[error("cannot write a record of {ISSUED}: {0}")]
    IssuedEncode(#[source] serde_json::Error),
    /// A PEM or DER file does not hold what it should.
    #[error("{}: {problem}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A peer's or a file's certificate is missing or does not parse.
    #[error("{}: {source}", path.display())]
    Certificate {
        /// The file, or `(peer)` for a connection's certificate.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: fedpool_transport::tls::PeerCertError,
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

/// What [`issue`] and [`sign`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedClient {
    /// The client's name (its certificate's subject CN).
    pub name: String,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client key (0600), when [`issue`] made it; [`sign`] never sees one.
    pub key: Option<PathBuf>,
    /// The new certificate's serial.
    pub serial: Serial,
    /// The end of its validity (RFC 3339).
    pub not_after: String,
    /// Serials of earlier certificates of the name revoked by this issue.
    pub revoked_previous: Vec<Serial>,
}

/// Checks that `name` can be a client identity: 1–64 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-` ([`fedpool_transport::tls::validate_client_name`], the rule the
/// client's `keygen` applies too).
pub fn validate_client_name(name: &str) -> Result<(), CertError> {
    fedpool_transport::tls::validate_client_name(name).map_err(|e| CertError::BadName { name: e.name, why: e.why })
}

/// Checks a certificate validity given in days: 1 to [`MAX_VALIDITY_DAYS`].
pub fn validate_days(days: u32) -> Result<(), CertError> {
    if (1..=MAX_VALIDITY_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(CertError::BadDays { days })
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// RFC 3339 in UTC, to the second.
fn rfc3339(t: time::OffsetDateTime) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::from(t)).to_string()
}

/// A random positive 128-bit serial whose first byte is never zero (so its DER form and
/// [`Serial`] are the same bytes).
fn random_serial() -> Result<Serial, CertError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).map_err(|_| CertError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(Serial::from_bytes(&bytes))
}

/// Creates the federation CA and the server certificate in `dir` (created if missing).
///
/// Refuses to overwrite an existing CA or server certificate unless `opts.force`: a new CA
/// invalidates every client certificate issued so far.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<InitReport, CertError> {
    validate_days(opts.server_days)?;
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

/// Issues a client certificate and key for `name` (subject CN = `name`, a random serial), signed
/// by the CA in `dir`, valid for `days` (1 to [`MAX_VALIDITY_DAYS`]). Refuses to overwrite an
/// existing one unless `force`; with `force`, every earlier certificate of the name is revoked
/// by serial first. Refuses a name revoked by name (the older format of the list).
///
/// Prefer [`sign`] (the key made on the client): this one makes the client's private key here.
pub fn issue(dir: &Path, name: &str, days: u32, force: bool) -> Result<IssuedClient, CertError> {
    let plan = Planned::new(dir, name, days, force)?;
    let key = KeyPair::generate().map_err(gen_err("the client key"))?;
    let key_path = plan.key.clone();
    let (issued, cert_pem) = plan.finish(&key, KeyOrigin::Server)?;
    // Keys first: a certificate without its key is useless, a key without its certificate harmless.
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&issued.cert, cert_pem.as_bytes())?;
    Ok(IssuedClient { key: Some(key_path), ..issued })
}

/// Signs the certificate signing request in `csr` (made on the client by `fedpool-client
/// keygen`) with the CA in `dir`: subject CN from the request, a random serial, client-auth only,
/// valid for `days` (1 to [`MAX_VALIDITY_DAYS`]); written to `dir/clients/NAME.pem` and recorded
/// in [`ISSUED`]. Refuses to overwrite an existing certificate of the name unless `force`; with
/// `force` the earlier certificates of the name are revoked by serial (and a key `certs issue`
/// left in `clients/` is deleted). Only the request's public key and subject name are used: any
/// extension it asks for is ignored. The coordinator never holds the client's private key.
pub fn sign(dir: &Path, csr: &Path, days: u32, force: bool) -> Result<IssuedClient, CertError> {
    validate_days(days)?;
    let text = fs::read_to_string(csr).map_err(io_err(csr))?;
    let request = CertificateSigningRequestParams::from_pem(&text).map_err(|source| CertError::BadCsr {
        path: csr.to_path_buf(),
        problem: match source {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "the request's signature does not verify with its own public key (signed by another key, or altered)"
            }
            rcgen::Error::CouldNotParseCertificationRequest => "not a PEM certificate signing request",
            _ => "unusable certificate signing request",
        },
        source,
    })?;
    let subject = |why: String| CertError::CsrSubject { path: csr.to_path_buf(), why };
    let name = match request.params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
        Some(DnValue::Ia5String(s)) => s.as_str().to_string(),
        Some(other) => return Err(subject(format!("its common name is not a UTF-8 or ASCII string: {other:?}"))),
        None => return Err(subject("it has no common name (CN)".into())),
    };
    fedpool_transport::tls::validate_client_name(&name).map_err(|e| subject(e.to_string()))?;
    let plan = Planned::new(dir, &name, days, force)?;
    let stale_key = plan.key.clone();
    let (issued, cert_pem) = plan.finish(&request.public_key, KeyOrigin::Client)?;
    if force {
        // A key `certs issue` made here belongs to a certificate that is now revoked.
        match fs::remove_file(&stale_key) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CertError::Io { path: stale_key, source: e }),
        }
    }
    write_public(&issued.cert, cert_pem.as_bytes())?;
    Ok(issued)
}

/// A client certificate about to be issued: everything checked, nothing written yet.
struct Planned {
    dir: PathBuf,
    name: String,
    days: u32,
    issuer: Issuer<'static, KeyPair>,
    cert: PathBuf,
    key: PathBuf,
}

impl Planned {
    /// Checks the name, the days, the CA, the older name list and the files to be written.
    fn new(dir: &Path, name: &str, days: u32, force: bool) -> Result<Self, CertError> {
        validate_client_name(name)?;
        validate_days(days)?;
        let issuer = load_issuer(dir)?;
        let revoked_path = dir.join(REVOKED);
        if RevocationList::load(&revoked_path)?.contains(name) {
            return Err(CertError::Revoked { name: name.to_string(), path: revoked_path });
        }
        let clients = dir.join(CLIENTS_DIR);
        fs::create_dir_all(&clients).map_err(io_err(&clients))?;
        let cert = clients.join(format!("{name}.pem"));
        let key = clients.join(format!("{name}.key"));
        if !force {
            for p in [&cert, &key] {
                if p.exists() {
                    return Err(CertError::Exists { path: p.clone() });
                }
            }
        }
        Ok(Self { dir: dir.to_path_buf(), name: name.to_string(), days, issuer, cert, key })
    }

    /// Signs the certificate for `public_key`, revokes the earlier serials of the name and records
    /// the new one (in that order: a crash leaves old certificates revoked, never a new one
    /// unrecorded). Returns the certificate's PEM for the caller to write.
    fn finish(self, public_key: &impl PublicKeyData, origin: KeyOrigin) -> Result<(IssuedClient, String), CertError> {
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, self.name.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
        validity(&mut params, self.days);
        let not_after = rfc3339(params.not_after);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(gen_err(&format!("the certificate of client {:?}", self.name)))?;
        let revoked_previous = revocation::revoke_name(&self.dir, &self.name, "issued again")?.serials;
        let record = IssuedRecord {
            name: self.name.clone(),
            serial: serial.clone(),
            not_after: not_after.clone(),
            issued_at: rfc3339(time::OffsetDateTime::now_utc()),
            key: origin,
        };
        issued::append(&self.dir, &record)?;
        let issued = IssuedClient { name: self.name, cert: self.cert, key: None, serial, not_after, revoked_previous };
        Ok((issued, cert.pem()))
    }
}

/// The serial of the certificate in the PEM file `path`, if the file exists and holds one with
/// subject CN `name` (a certificate issued before [`ISSUED`] was kept is found this way).
fn serial_of_file(path: &Path, name: &str) -> Result<Option<Serial>, CertError> {
    if !path.is_file() {
        return Ok(None);
    }
    let certs = load_certs(path)?;
    let Some(first) = certs.first() else { return Ok(None) };
    if subject_common_name(first).ok().as_deref() != Some(name) {
        return Ok(None);
    }
    let serial = fedpool_transport::tls::certificate_serial(first)
        .map_err(|source| CertError::Certificate { path: path.to_path_buf(), source })?;
    Ok(Some(Serial::from_bytes(&serial)))
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
    fedpool_common::checkpoint::atomic_write_private(path, bytes).map_err(io_err(path))
}

/// Writes a certificate or list (the default mode: readable by others).
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    fedpool_common::checkpoint::atomic_write(path, bytes).map_err(io_err(path))
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
    fn days_outside_one_to_ten_years_are_refused() {
        for bad in [0, MAX_VALIDITY_DAYS + 1, 3_000_000, u32::MAX] {
            let e = validate_days(bad).unwrap_err();
            assert!(matches!(e, CertError::BadDays { days } if days == bad), "{bad}: {e}");
            assert!(e.to_string().contains("1 to 3650 days"), "{e}");
        }
        for ok in [1, LEAF_VALIDITY_DAYS, MAX_VALIDITY_DAYS] {
            assert!(validate_days(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn random_serials_are_positive_16_bytes_and_differ() {
        let a = random_serial().expect("serial");
        let b = random_serial().expect("serial");
        assert_ne!(a, b);
        for s in [a, b] {
            assert_eq!(s.as_bytes().len(), 16);
            assert!(s.as_bytes()[0] & 0x80 == 0 && s.as_bytes()[0] != 0, "{s}");
        }
    }
}
