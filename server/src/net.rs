//! The QUIC endpoint (quinn, rustls with ring, mutual TLS) feeding the round engine. Not built yet.
