//! TLS and QUIC transport configuration: rustls with the ring provider only (never the process
//! default: with both providers compiled in, `ServerConfig::builder()` panics), TLS 1.3 only,
//! mutual TLS against the federation CA, and a transport with an idle timeout and keep-alives so a
//! dead peer is noticed.
//!
//! Also what both ends need of certificates: the client-name rule ([`validate_client_name`]), a
//! client's key and certificate signing request made on the client ([`client_key_request`]), the
//! peer's certificate and its serial ([`peer_certificate`], [`certificate_serial`]: the server
//! revokes by serial), and the TLS alert inside a QUIC close ([`tls_alert`],
//! [`is_certificate_alert`]: the client daemon stops on a refused certificate).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The ALPN protocol both sides must name.
pub const ALPN: &[u8] = b"fedpool/1";

/// Most request streams a client may have open at once.
pub const MAX_CLIENT_STREAMS: u32 = 16;

/// A TLS or transport configuration that could not be built, naming the file or setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or holds nothing usable.
    #[error("{path}: {problem}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration ({what}): {source}")]
    Rustls {
        /// What was being configured.
        what: &'static str,
        /// rustls's error.
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("client certificate verifier from CA {path}: {problem}")]
    Verifier {
        /// The CA file.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// A transport setting is out of range.
    #[error("transport setting {what}: {problem}")]
    Transport {
        /// The setting.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |problem: String| TlsError::Pem { path: path.display().to_string(), problem };
    let bytes = std::fs::read(path).map_err(|e| pem(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes =
        std::fs::read(path).map_err(|e| TlsError::Pem { path: path.display().to_string(), problem: e.to_string() })?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::Pem { path: path.display().to_string(), problem: format!("no usable private key: {e}") })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>], path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).map_err(|e| TlsError::Verifier {
            path: path.display().to_string(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The QUIC transport: idle timeout (a silent peer is dropped after it), keep-alive (sent by this
/// side well within the timeout), and the stream limits of the protocol (clients open
/// bidirectional request streams only).
pub fn transport(
    idle_timeout: Duration,
    keep_alive: Duration,
    side_is_server: bool,
) -> Result<TransportConfig, TlsError> {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(idle_timeout)
        .map_err(|e| TlsError::Transport { what: "idle_timeout", problem: e.to_string() })?;
    t.max_idle_timeout(Some(idle));
    if !keep_alive.is_zero() {
        t.keep_alive_interval(Some(keep_alive));
    }
    if side_is_server {
        t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_CLIENT_STREAMS));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
    } else {
        // The server pushes tasks on unidirectional streams and opens no bidirectional ones.
        t.max_concurrent_bidi_streams(VarInt::from_u32(0));
        t.max_concurrent_uni_streams(VarInt::from_u32(MAX_CLIENT_STREAMS));
    }
    Ok(t)
}

/// The server's QUIC configuration: its certificate chain and key, and a client verifier that
/// accepts only certificates signed by the CA in `ca_cert` (no client certificate: refused).
pub fn server_config(
    ca_cert: &Path,
    server_cert: &Path,
    server_key: &Path,
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let ca = load_certs(ca_cert)?;
    let chain = load_certs(server_cert)?;
    let key = load_key(server_key)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca, ca_cert)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier { path: ca_cert.display().to_string(), problem: e.to_string() })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { what: "TLS 1.3 with ring", source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls { what: "server certificate and key", source })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Transport { what: "QUIC cipher suite", problem: e.to_string() })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A client's QUIC configuration: trusts only the federation CA and presents `cert` + `key`
/// (or no certificate at all with `identity: None`, which the server refuses — for tests).
pub fn client_config(
    ca: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    transport: TransportConfig,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).map_err(|e| TlsError::Verifier { path: "(CA)".into(), problem: e.to_string() })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { what: "TLS 1.3 with ring", source })?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::Rustls { what: "client certificate and key", source })?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Transport { what: "QUIC cipher suite", problem: e.to_string() })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A client configuration from PEM files: the CA, and the client's certificate and key.
pub fn client_config_from_files(
    ca_cert: &Path,
    cert: &Path,
    key: &Path,
    transport: TransportConfig,
) -> Result<quinn::ClientConfig, TlsError> {
    let ca = load_certs(ca_cert)?;
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    client_config(&ca, Some((chain, key)), transport)
}

/// Longest client name accepted (a client's name is its certificate's subject CN and a file name
/// in the server's certificate folder).
pub const MAX_NAME_LEN: usize = 64;

/// Checks that `name` can be a client identity: 1–64 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-`. The one rule for both ends: the client's `keygen` and the server's
/// `certs issue`/`certs sign`.
pub fn validate_client_name(name: &str) -> Result<(), BadClientName> {
    let bad = |why: String| Err(BadClientName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("it is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return bad(format!("it has {} characters, at most {MAX_NAME_LEN} are allowed", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return bad(format!("character {c:?} is not allowed (use letters, digits, '.', '_', '-')"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it must not start with '.' or '-'".into());
    }
    Ok(())
}

/// A client name that cannot be a certificate subject and a file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad client name {name:?}: {why}")]
pub struct BadClientName {
    /// The name given.
    pub name: String,
    /// What is wrong with it.
    pub why: String,
}

/// A client's new private key and its certificate signing request, both PEM.
pub struct ClientKeyRequest {
    /// The private key (PKCS#8 PEM, ECDSA P-256): it never leaves the client.
    pub key_pem: String,
    /// The certificate signing request (PEM, subject CN = the client's name, self-signed by the
    /// key), for the coordinator's `fedpool-server certs sign --csr`.
    pub csr_pem: String,
}

impl std::fmt::Debug for ClientKeyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key.
        f.debug_struct("ClientKeyRequest").field("csr_pem", &self.csr_pem).finish_non_exhaustive()
    }
}

/// Why a client key and its request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyRequestError {
    /// The name cannot be a client identity.
    #[error(transparent)]
    Name(#[from] BadClientName),
    /// rcgen could not generate the key or the request.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// The key or the request.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// Generates a client's private key (ECDSA P-256) and a certificate signing request for it with
/// subject CN = `name`: the client keeps the key, the coordinator signs the request
/// (`fedpool-server certs sign`) and so never holds a client's private key.
pub fn client_key_request(name: &str) -> Result<ClientKeyRequest, KeyRequestError> {
    validate_client_name(name)?;
    let generate = |what| move |source| KeyRequestError::Generate { what, source };
    let key = rcgen::KeyPair::generate().map_err(generate("the client key"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let csr = params.serialize_request(&key).map_err(generate("the certificate signing request"))?;
    let csr_pem = csr.pem().map_err(generate("the certificate signing request's PEM"))?;
    Ok(ClientKeyRequest { key_pem: key.serialize_pem(), csr_pem })
}

/// A peer certificate that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PeerCertError {
    /// The peer presented no certificate (or not an X.509 chain).
    #[error("no certificate presented: {0}")]
    Missing(&'static str),
    /// The certificate's DER does not parse.
    #[error("unparsable certificate: {0}")]
    Unparsable(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
}

/// The first certificate the peer of an established connection presented (its own).
pub fn peer_certificate(conn: &quinn::Connection) -> Result<CertificateDer<'static>, PeerCertError> {
    let identity = conn.peer_identity().ok_or(PeerCertError::Missing("the handshake carried none"))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PeerCertError::Missing("the peer identity is not an X.509 chain"))?;
    chain.first().cloned().ok_or(PeerCertError::Missing("the certificate chain is empty"))
}

/// A certificate's serial number as big-endian bytes without leading zero bytes (DER adds a zero
/// byte before a serial whose first bit is set; this form is the same either way).
pub fn certificate_serial(der: &[u8]) -> Result<Vec<u8>, PeerCertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)?;
    Ok(strip_leading_zeros(cert.raw_serial()))
}

/// `bytes` without its leading zero bytes (at least one byte is kept).
pub fn strip_leading_zeros(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].to_vec()
}

/// The TLS alert a QUIC connection was closed with, if its code is a crypto error (QUIC carries a
/// TLS alert as transport error `0x100 + alert`, RFC 9001 §4.8).
pub fn tls_alert(code: quinn::TransportErrorCode) -> Option<rustls::AlertDescription> {
    let code = u64::from(code);
    (0x100..0x200).contains(&code).then(|| rustls::AlertDescription::from((code & 0xff) as u8))
}

/// True for the TLS alerts that mean a certificate was refused (bad, unsupported, revoked,
/// expired, unknown, from an unknown CA, missing, access denied): retrying with the same
/// certificate cannot succeed.
pub fn is_certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::BadCertificateStatusResponse
    )
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::CertificateSigningRequestDer;
    use x509_parser::prelude::FromDer;

    use super::*;

    #[test]
    fn a_key_request_carries_the_name_and_hides_the_key() {
        let r = client_key_request("hospital-a").expect("request");
        assert!(r.key_pem.contains("PRIVATE KEY") && r.csr_pem.contains("CERTIFICATE REQUEST"));
        assert!(!format!("{r:?}").contains("PRIVATE KEY"), "Debug must not print the key");
        let der = CertificateSigningRequestDer::from_pem_slice(r.csr_pem.as_bytes()).expect("pem");
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).expect("der");
        let cn = csr.certification_request_info.subject.iter_common_name().next().expect("CN");
        assert_eq!(cn.as_str().expect("utf-8"), "hospital-a");
        assert!(matches!(client_key_request("a/b"), Err(KeyRequestError::Name(_))));
    }

    #[test]
    fn crypto_close_codes_map_to_certificate_alerts() {
        let code = |alert: u8| quinn::TransportErrorCode::crypto(alert);
        for (alert, certificate) in
            [(42, true), (44, true), (45, true), (46, true), (48, true), (116, true), (40, false), (80, false)]
        {
            let a = tls_alert(code(alert)).expect("a crypto code");
            assert_eq!(is_certificate_alert(a), certificate, "alert {alert}: {a:?}");
        }
        assert_eq!(tls_alert(quinn::TransportErrorCode::PROTOCOL_VIOLATION), None);
    }

    #[test]
    fn serials_lose_their_leading_zeros_only() {
        assert_eq!(strip_leading_zeros(&[0, 0x80, 1]), vec![0x80, 1]);
        assert_eq!(strip_leading_zeros(&[0x40, 0]), vec![0x40, 0]);
        assert_eq!(strip_leading_zeros(&[0, 0]), vec![0]);
        assert_eq!(strip_leading_zeros(&[]), Vec::<u8>::new());
    }
}
