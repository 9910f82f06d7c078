//! TLS and QUIC transport configuration, from [`fedpool_transport::tls`] (shared with the client
//! daemon), plus what only the server needs: the identity of a connected client.

pub use fedpool_transport::tls::*;

use crate::certs::{self, CertError, Serial};

/// Who a connection's client is: its certificate's subject CN (the identity in the federation)
/// and the certificate's serial (what revocation lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject CN.
    pub name: String,
    /// The certificate's serial.
    pub serial: Serial,
}

/// The client identity of an established connection, from the first certificate the peer
/// presented.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, CertError> {
    let peer = |source| CertError::Certificate { path: "(peer)".into(), source };
    let leaf = peer_certificate(conn).map_err(peer)?;
    let name = certs::subject_common_name(&leaf)?;
    let serial = certificate_serial(&leaf).map_err(peer)?;
    Ok(PeerIdentity { name, serial: Serial::from_bytes(&serial) })
}

/// The client identity of an established connection: the subject CN of the first certificate
/// the peer presented.
pub fn peer_name(conn: &quinn::Connection) -> Result<String, CertError> {
    peer_identity(conn).map(|p| p.name)
}
