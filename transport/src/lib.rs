//! fedpool's QUIC plumbing, shared by the coordinator (`fedpool-server`) and the client daemon
//! (`fedpool-client run`): the TLS and transport configuration both ends must agree on ([`tls`]),
//! frames over async streams ([`framing`]), and the application close codes ([`close`]).
//!
//! `fedpool-common` stays free of tokio and quinn (ARCHITECTURE.md, "Dependency direction"); this crate is the one place where
//! the protocol meets the transport, so the two ends cannot drift apart.

pub mod framing;
pub mod tls;

/// QUIC application error codes the server closes connections with (the client reads them to
/// decide whether to reconnect).
pub mod close {
    /// Normal end.
    pub const NORMAL: u32 = 0;
    /// A bad frame: oversized, truncated, garbage, wrong kind, or too slow.
    pub const PROTOCOL: u32 = 1;
    /// The client's certificate is revoked (its serial, or its name in the older list format): at
    /// the handshake, or while connected.
    pub const REVOKED: u32 = 2;
    /// The client's certificate has no usable subject CN.
    pub const NO_IDENTITY: u32 = 3;
    /// A newer connection with the same identity took over.
    pub const REPLACED: u32 = 4;
    /// The round engine dropped the client.
    pub const DROPPED: u32 = 5;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 6;
    /// The federation has run all its rounds.
    pub const FINISHED: u32 = 7;
    /// The server failed (e.g. it cannot read the revocation list or write a checkpoint).
    pub const INTERNAL: u32 = 8;
}
