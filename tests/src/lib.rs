//! fedpool-tests: whole-system tests — real QUIC on loopback, real processes, injected faults.
//!
//! Not built yet: the tests arrive with the server and the client daemon.
