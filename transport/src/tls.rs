//! TLS and QUIC transport configuration: rustls with the ring provider only (never the process
//! default: with both providers compiled in, `ServerConfig::builder()` panics), TLS 1.3 only,
//! mutual TLS against the federation CA, and a transport with an idle timeout and keep-alives so a
//! dead peer is noticed.

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
