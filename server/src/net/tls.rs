//! TLS and QUIC transport configuration, from [`fedpool_transport::tls`] (shared with the client
//! daemon), plus what only the server needs: the identity of a connected client.

pub use fedpool_transport::tls::*;
use rustls::pki_types::CertificateDer;

use crate::certs::{self, CertError};

/// The client identity of an established connection: the subject CN of the first certificate
/// the peer presented.
pub fn peer_name(conn: &quinn::Connection) -> Result<String, CertError> {
    let identity = conn.peer_identity().ok_or_else(|| CertError::NoCommonName("no certificate presented".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| CertError::NoCommonName("peer identity is not an X.509 chain".into()))?;
    let first = chain.first().ok_or_else(|| CertError::NoCommonName("empty certificate chain".into()))?;
    certs::subject_common_name(first)
}
